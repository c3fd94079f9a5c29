"""The one-pass Walsh-Hadamard kernel (qat::fwht) vs float64, under TRITON_INTERPRET=1.

The exact value is z = scale * x H_n^T (or x H_n) with H_n = kron(H_K, Syl_P) built here from
``small_hadamard`` and a Sylvester matrix, in float64 from the input's own (16-bit or fp32)
values, so the only error is the kernel's arithmetic.

Tolerance, u = 2^-24 (fp32 unit roundoff). Each output is a signed sum sum_i +-x_i: the kernel
reaches it through m = log2 P butterfly levels (one fp32 addition per level), then for K > 1 a
K-term fp32 dot with +-1 entries (products exact, at most K - 1 additions on any path), then one
multiply by the scale. Along every path from an input to an output there are at most
d = m + K + 1 roundings, so (Higham's bound for sums) |err| <= d u |scale| sum_i |x_i| (+ O(u^2)),
plus half an ulp of a 16-bit output. The tests use it with a factor 2 margin.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (see test_triton_interpret)
pytest.importorskip("triton", reason="triton is not installed (pip install 'qat[triton]')")
from qat.kernels import hadamard_kernels as HK  # noqa: E402
from qat.kernels import triton_common  # noqa: E402

from qat.adapters import WHTAdapter  # noqa: E402
from qat.hadamard import factor, small_hadamard  # noqa: E402
from qat.config import LayerSpec  # noqa: E402
from qat.kernels import dispatch, ops, support  # noqa: E402
from qat.quant_linear import QuantLinear  # noqa: E402
from tests.kernels.helpers import layer_step  # noqa: E402

if not triton_common.INTERPRETED:
    pytest.skip("qat.kernels.triton_kernels was imported before this module, without "
                "TRITON_INTERPRET=1: run this file on its own", allow_module_level=True)

U = 2.0**-24
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _dense_h(n: int) -> torch.Tensor:
    """H_n [n, n] float64 = kron(H_K, Syl_P), independent of qat.hadamard's transform."""
    k, p = factor(n)
    syl = torch.ones(1, 1, dtype=torch.float64)
    while syl.shape[0] < p:
        syl = torch.cat([torch.cat([syl, syl], 1), torch.cat([syl, -syl], 1)], 0)
    return torch.kron(small_hadamard(k), syl)


def _depth(n: int) -> int:
    """Roundings on the kernel's path from an input to an output: m butterflies, K - 1 dot
    additions (K > 1) and the scale (see the module docstring)."""
    k, p = factor(n)
    return (p.bit_length() - 1) + (k - 1 if k > 1 else 0) + 1


def _check(got, x, n, transpose, scale, out_dtype):
    h = _dense_h(n)
    x64 = x.double().reshape(-1, n)
    want = scale * (x64 @ (h if transpose else h.t()))                 # [T, n]
    tol = 2 * _depth(n) * U * abs(scale) * x64.abs().sum(1, keepdim=True)  # [T, 1]
    if out_dtype != torch.float32:
        tol = tol + want.abs() * torch.finfo(out_dtype).eps           # 16-bit output rounding, 2x
    err = (got.double().reshape(-1, n) - want).abs()
    assert got.dtype == out_dtype and got.shape == x.shape
    assert (err <= tol).all(), f"n={n} T={x64.shape[0]}: worst err/tol {(err / tol).max():.2f}"


# n = K * P: Sylvester only (16, 64, 256), K = 12 with P = 1, 2, 8 (H_12 is not symmetric, so
# the two transposes differ) and K = 20 (padded to 32) with P = 8.
WIDTHS = [16, 64, 256, 12, 24, 96, 160]


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_fwht_kernel_vs_float64(n, dtype):
    """Odd row counts (1, 5, 13; partial row blocks), both transposes, a scale, leading dims."""
    g = torch.Generator().manual_seed(n)
    for rows, transpose in ((1, False), (5, True), (13, False), (13, True)):
        x = torch.randn(rows, n, generator=g).to(dtype)
        _check(HK.launch_fwht(x, transpose), x, n, transpose, 1.0, dtype)
    x = torch.randn(2, 3, n, generator=g).to(dtype)
    _check(HK.launch_fwht(x, True, scale=0.37, out_dtype=torch.float32), x, n, True, 0.37, torch.float32)


def test_fwht_kernel_strided_rows_and_dtypes():
    """Rows with a stride (a column slice of a wider tensor) are read in place; bf16 in with
    fp32 out (the adapter's case) and fp32 in with bf16 out; explicit small row blocks."""
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(7, 200, generator=g)
    x = wide[:, 8:104]                                                # [7, 96], row stride 200
    _check(HK.launch_fwht(x, False, block_t=2), x, 96, False, 1.0, torch.float32)
    xb = torch.randn(9, 64, generator=g).to(torch.bfloat16)
    _check(HK.launch_fwht(xb, False, 2.0, torch.float32), xb, 64, False, 2.0, torch.float32)
    xf = torch.randn(9, 160, generator=g)
    _check(HK.launch_fwht(xf, True, 0.5, torch.bfloat16), xf, 160, True, 0.5, torch.bfloat16)
    assert HK.launch_fwht(torch.empty(0, 64), False).shape == (0, 64)


def test_fwht_tile_and_paths():
    assert support.fwht_tile(96) == (12, 16, 8) and support.fwht_tile(4096) == (1, 1, 4096)
    assert support.fwht_tile(100) is None            # no Hadamard width: the reference raises
    assert support.fwht_tile(60 * 256) == (60, 64, 256)
    assert support.fwht_tile(108 * 128) is None      # K_PAD 128 > FWHT_MAX_K_PAD
    assert support.fwht_tile(32768) is None          # P = 32768 > FWHT_MAX_ROW
    with dispatch.use_kernels("triton"):              # such widths take the reference path
        assert dispatch.fwht_path(torch.randn(1, 108 * 128)) == "reference"
    x = torch.randn(3, 64)
    with dispatch.use_kernels("triton"):
        assert dispatch.fwht_path(x) == "triton"
        assert dispatch.fwht_path(x.double()) == "reference"          # fp64: reference only
        assert dispatch.fwht_path(x, torch.float64) == "reference"
    with dispatch.use_kernels("auto"):
        assert dispatch.fwht_path(x) == "reference"                   # CPU tensors
    with dispatch.use_kernels("reference"):
        assert dispatch.fwht_path(x) == "reference"


def test_fwht_opcheck_and_autograd():
    """Schema, fake impl, autograd registration and AOT dispatch of qat::fwht (CPU impl is the
    reference); its registered backward is the transposed transform (gradcheck, float64)."""
    op = torch.ops.qat.fwht.default
    x = torch.randn(2, 5, 96, requires_grad=True)
    torch.library.opcheck(op, (x, False, 0.5, torch.float32))
    torch.library.opcheck(op, (x.detach().to(torch.bfloat16), True, 1.0, torch.float32))
    torch.library.opcheck(op, (x.detach(), True))                       # the defaults
    x64 = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.fwht_op(t, False, 0.25, None), (x64,))
    # the CPU impl is the torch reference itself
    z = ops.fwht_op(x.detach(), True, 0.5, torch.bfloat16)
    assert torch.equal(z, ops.reference_fwht(x.detach(), True, 0.5, torch.bfloat16))


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of the Triton launcher, to show the "triton" path really runs the kernel."""
    calls = []
    launcher = HK.launch_fwht

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return launcher(*args, **kwargs)

    monkeypatch.setattr(HK, "launch_fwht", counted)
    return calls


def _adapter_grads(adapter, x, weights, mode):
    adapter.values.grad = None
    x = x.detach().clone().requires_grad_()
    with dispatch.use_kernels(mode):
        y = adapter(x)
        (y.float() * weights).sum().backward()
    return y.detach(), x.grad, adapter.values.grad.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [64, 96])
def test_wht_outside_grads_kernel_vs_reference(n, dtype, kernel_calls):
    """WHTAdapter (outside) forward + backward with the kernel transform and with the torch
    reference, each against float64 through the dense D = c S H / n.

    Bounds (2x margin): z = c/n x H^T has |dz| <= L u c' sum|x| (c' = c/n; L = sum of the torch
    plan's block widths + 2 >= the kernel's depth, so it covers both paths); y = z S^T adds
    (r + 2) u |z| |S|^T (r = most nonzeros in a row of S); dx = c' (dy S) H adds, per row,
    (s + L + 2) u c' sum_i (|dy| |S|)_i (s = most nonzeros in a column); d values = (dy^T z) at
    the support adds (T + 2) u |dy|^T |z| + L u |dy|^T (c' sum|x|). 16-bit x and y add half an
    ulp (bf16 outputs: |y| eps)."""
    from qat.hadamard import block_plan

    torch.manual_seed(n)
    out_f, tokens = 24, 11
    a = WHTAdapter(n, out_f, rank=2, alpha=3.0, placement="outside")
    nn.init.normal_(a.values)
    x = torch.randn(tokens, n).to(dtype)
    dy = torch.randn(tokens, out_f).to(dtype).float()  # y is in x's dtype: so is its gradient
    # float64 truth through the dense D
    S = torch.zeros(out_f, n, dtype=torch.float64)
    S[a.rows, a.cols] = a.values.detach().double()
    coef = a.coef
    x64 = x.double().requires_grad_()
    S64 = S.clone().requires_grad_()
    y64 = x64 @ (coef * S64 @ _dense_h(n)).t()
    (y64 * dy.double()).sum().backward()
    want_v = S64.grad[a.rows, a.cols]
    # magnitudes for the bounds
    L = sum(block_plan(n)[1]) + 2
    r_max = torch.bincount(a.rows, minlength=out_f).max().item()
    s_max = torch.bincount(a.cols, minlength=n).max().item()
    absS = S.abs()
    z_mag = coef * x64.detach().abs().sum(1, keepdim=True)             # [T, 1] bounds |z|
    tol_y = 2 * U * (L * z_mag * absS.sum(1) + (r_max + 2) * z_mag * absS.sum(1))
    dyS = dy.double().abs() @ absS                                      # [T, n] bounds |dy S|
    tol_x = 2 * U * (s_max + L + 2) * coef * dyS.sum(1, keepdim=True)
    dyz = dy.double().abs().t() @ z_mag.expand(-1, n)                   # [out, n]
    tol_v = (2 * U * (tokens + 2 + L) * dyz)[a.rows, a.cols]
    if dtype != torch.float32:
        eps = torch.finfo(dtype).eps
        tol_y, tol_x = tol_y + y64.detach().abs() * eps, tol_x + x64.grad.abs() * eps
    for mode, launches in (("triton", 2), ("reference", 0)):   # kernel: forward and backward
        kernel_calls.clear()
        y, gx, gv = _adapter_grads(a, x, dy, mode)
        assert len(kernel_calls) == launches
        for name, got, want, tol in (("y", y, y64.detach(), tol_y), ("dx", gx, x64.grad, tol_x),
                                     ("d values", gv, want_v, tol_v)):
            err = (got.double() - want).abs()
            assert (err <= tol).all(), f"{mode} {name}: worst err/tol {(err / tol).max():.2f}"




def test_quant_linear_outside_wht_end_to_end(kernel_calls):
    """QuantLinear (4-bit, asymmetric) with an outside WHT adapter, forward and backward with
    use_kernels("triton") (fused quant-linear kernels plus the fwht kernel) vs "reference".
    The bounds above cover the arithmetic; this checks the wiring (a missing or misplaced
    gradient is off by O(1)), so 1e-4 of each tensor's largest entry is plenty."""
    torch.manual_seed(3)
    spec = LayerSpec(bits=4, group_size=32, symmetric=False, init="rtn")
    layer = QuantLinear.from_linear(nn.Linear(96, 40), spec)
    layer.adapter = WHTAdapter(96, 40, rank=2, alpha=2.0, placement="outside")
    nn.init.normal_(layer.adapter.values)
    x = torch.randn(2, 7, 96)
    ref = layer_step(layer, x, "reference")
    assert not kernel_calls
    got = layer_step(layer, x, "triton")
    assert kernel_calls == [(14, 96), (14, 96)]                      # z forward, dx backward
    assert set(got[2]) == set(ref[2]) and "adapter.values" in ref[2] and "weight_scale" in ref[2]
    pairs = [("y", got[0], ref[0]), ("dx", got[1], ref[1])]
    pairs += [(k, got[2][k], ref[2][k]) for k in ref[2]]
    for name, a, b in pairs:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=name)
