"""The LoRA tile inside the kernels (D = scaling * B A formed in registers), under TRITON_INTERPRET=1.

What the kernels compute. For a plain inside LoRAAdapter the kernels take A [r, in], B [out, r]
and scaling instead of a dense D, and form each element as (triton_tiles.lora_tile)
    acc = fma(B[i, r-1], A[r-1, k], ... fma(B[i, 1], A[1, k], fma(B[i, 0], A[0, k], 0)))
    D   = fl(fl_lora(acc) * fl32(scaling))            (fl_lora: round to the factors' dtype)
one fixed fp32 fma chain per element, whatever the tile. ``kernel_delta`` below emulates that
chain in torch, exactly (an fp32 fma rounds once: float64 product, TwoSum, corrected rounding),
so the kernels' W_hat and codes are checked bit for bit against the reference quantizer fed
with that D. torch's ``(B @ A) * scaling`` sums in another order, so the kernel path's codes
may differ from the reference path's where v = (W0 + D)/s sits at a rounding boundary.

Exactness bound (test (b)). Any fp32 evaluation of S = sum_j B_ij A_jk (any order, fma or
not) is within gamma_r sum_j |B_ij A_jk| ~ r u sum_j |B_ij A_jk| of S (Higham, Accuracy and
Stability, eq. 3.5); the product with scaling adds u|D|, W0 + D adds u|W0 + D|, the division
by s adds u|v| and v + z adds u|v + z|. So each path's v + z is within
    E = [(r + 1) u P + u (|W0| + P)] / s + u (|v| + |v + z|),   P = scaling sum_j |B_ij||A_jk|
of the exact value, the two paths within 2E of each other, and a differing code needs a
rounding boundary h (a half-integer inside the grid) between them: |(v + z)_ref - h| <= 2E.
Asserted with a factor 2 margin, as the other kernel tests use.

Tolerances for y, dX and the gradients are those of test_triton_interpret /
test_grads_interpret (fp32 accumulation bounds, factor 2 margin), applied against float64 values
built from the kernel's own D (bit-identical to the emulation, asserted first). The y / dX
check against the reference path adds |x| |W_hat_kernel - W_hat_ref|, nonzero only at codes
that test (b) vouches for.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (see test_triton_interpret)
pytest.importorskip("triton", reason="triton is not installed (pip install 'qat[triton]')")
from qat.kernels import triton_grads as TG  # noqa: E402
from qat.kernels import triton_kernels as TK  # noqa: E402

from qat import primitives as P  # noqa: E402
from qat.adapters.lora import LoRAAdapter  # noqa: E402
from qat.kernels import dispatch, ops, triton_common  # noqa: E402
from tests.kernels.helpers import U, close_within, exact_grads, layer_step, make_layer  # noqa: E402

if not triton_common.INTERPRETED:
    pytest.skip("qat.kernels.triton_kernels was imported before this module, without "
                "TRITON_INTERPRET=1: run this file on its own", allow_module_level=True)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (bits, symmetric, out, in, group, tokens, block_k, rank, activation dtype, layer dtype):
# the odd shapes and tilings of test_grads_interpret, each with a rank from {1, 4, 8, 24}
# (24: a rank that is not a power of two, scaling 0.5) and fp32 / bf16 / fp16 activations.
CASES = [
    (2, True, 48, 64, 32, 5, 64, 1, F32, F32),
    (2, False, 40, 96, 96, 17, 32, 4, F32, F32),
    (3, True, 40, 96, 32, 9, 64, 8, BF16, F32),
    (3, False, 48, 64, 64, 11, 32, 24, F32, F32),
    (4, True, 48, 96, 32, 13, 32, 8, F16, F32),
    (4, False, 40, 64, 32, 7, 64, 24, BF16, BF16),
    (8, True, 40, 64, 64, 16, 64, 4, F32, F32),
    (8, False, 48, 96, 48, 15, 64, 1, F32, F32),
    (1.58, True, 40, 64, 32, 6, 32, 8, F32, F32),
]
IDS = [f"b{c[0]}-{'sym' if c[1] else 'asym'}-{c[2]}x{c[3]}-g{c[4]}-r{c[7]}-{str(c[8])[6:]}"
       for c in CASES]
ALPHA = 12.0  # scaling 12, 3, 1.5, 0.5 for ranks 1, 4, 8, 24: not all powers of two


def _layer(bits, symmetric, out, inp, group, rank, layer_dtype=F32, lora_dtype=F32, seed=0):
    layer = make_layer(bits, symmetric, None, group, out, inp, delta=False, seed=seed,
                       dtype=layer_dtype)
    torch.manual_seed(seed)
    lora = LoRAAdapter(inp, out, rank=rank, alpha=ALPHA, dtype=lora_dtype)
    with torch.no_grad():
        lora.lora_B.normal_(0, 0.02)  # nonzero B: D moves W0 by about a step
    layer.adapter = lora
    return layer


def fma32(b, a, c):
    """fl32(b * a + c) with one rounding, as tl.fma, for fp32 tensors (broadcast): the product is
    exact in float64, TwoSum gives p + c = s + e exactly, and rounding s to fp32 is correct
    unless s is an fp32 midpoint and e breaks the tie, which is patched."""
    p, c64 = b.double() * a.double(), c.double()
    s = p + c64
    bb = s - p
    e = (p - (s - bb)) + (c64 - bb)
    r = s.float()
    r64 = r.double()
    other = torch.nextafter(r, torch.where(s > r64, torch.inf, -torch.inf))  # s lies between
    midpoint = (s != r64) & (2 * s == r64 + other.double())
    fix = midpoint & (e != 0) & ((e > 0) == (s > r64))
    return torch.where(fix, other, r)


def kernel_delta(lora) -> torch.Tensor:
    """D [out, in] fp32 exactly as triton_tiles.lora_tile forms it (module docstring)."""
    a, b = lora.lora_A.detach(), lora.lora_B.detach()
    acc = torch.zeros(b.shape[0], a.shape[1])
    for j in range(a.shape[0]):
        acc = fma32(b[:, j, None].float(), a[None, j].float(), acc)
    acc = acc.to(a.dtype).float()
    return (acc * torch.tensor(lora.scaling, dtype=F32)).to(a.dtype).float()


def _codes_and_v(w, layer):
    """(codes [out, in] int8, v + z [out, in] fp32) that the quantizer gives pre-quant weight w."""
    scale, zero = layer.fake_quant_steps()
    g, bits = layer.group_size, layer.spec.bits
    v = P.scaled(w, scale, g).reshape(w.shape)
    if zero is not None:
        v = v + P.round_zero_point(zero, bits).repeat_interleave(g, 1)
    return P.quantize_codes(w, scale, zero, bits, g), v


def _boundary_bound(layer, v_ref, w0):
    """2E of the module docstring, elementwise [out, in]: how far the reference's v + z may be
    from the kernel's."""
    lora = layer.adapter
    r = lora.rank
    mag = lora.scaling * lora.lora_B.detach().double().abs() @ lora.lora_A.detach().double().abs()
    s = layer.fake_quant_steps()[0].double().abs().repeat_interleave(layer.group_size, 1)
    v_abs = (w0.double().abs() + mag) / s
    e = ((r + 1) * U * mag + U * (w0.double().abs() + mag)) / s + U * (v_abs + v_ref.double().abs())
    return 2 * e


def check_boundary(layer, codes_kernel, codes_ref, v_ref, w0) -> int:
    """Assert every differing code sits at a rounding boundary (test (b)); the count differing."""
    qmin, qmax = P.qrange(layer.spec.bits)
    diff = codes_kernel != codes_ref
    assert ((codes_kernel.int() - codes_ref.int()).abs() <= 1).all()  # a boundary moves a code by 1
    h = torch.floor(v_ref.double()) + 0.5                               # the nearest half-integer
    dist = (v_ref.double() - h).abs()
    tol = 2 * _boundary_bound(layer, v_ref, w0)                         # factor 2 margin
    inside = (h > qmin) & (h < qmax)
    assert (dist[diff] <= tol[diff]).all() and inside[diff].all(), (dist / tol)[diff].max()
    return int(diff.sum())


def _kernel_w(layer):
    """W0 + D [out, in] fp32 with the kernels' D (emulated); the reference's uses torch's."""
    return layer.base_weight() + kernel_delta(layer.adapter)


@pytest.mark.parametrize("rank,lora_dtype", [(1, F32), (4, F32), (8, BF16), (24, F32), (24, F16)])
def test_in_kernel_d_is_the_fma_chain(rank, lora_dtype):
    """The D tile helper every kernel uses, written out, equals the documented fma chain bit for
    bit, on two tilings (so it does not depend on the tile). Codes and W_hat see D only through
    rounding, so this is the test that pins D's own bits."""
    layer = _layer(4, True, 40, 96, 32, rank, lora_dtype=lora_dtype)
    lora = layer.adapter
    a, b = lora.lora_A.detach(), lora.lora_B.detach()
    want = kernel_delta(lora)
    for bn, bk in ((16, 32), (64, 64)):
        assert torch.equal(TK.launch_lora_delta(a, b, lora.scaling, block_n=bn, block_k=bk), want)


# --------------------------------------------------------------------------- (a) and (b)
@pytest.mark.parametrize("bits,sym,out,inp,group,tokens,block_k,rank,act,ldt", CASES, ids=IDS)
def test_codes_and_w_hat_from_the_in_kernel_d(bits, sym, out, inp, group, tokens, block_k, rank,
                                              act, ldt):
    """(a) the kernel's exported codes, dequantized, are its W_hat bit for bit, and both are
    the reference quantizer applied to W0 + the emulated in-kernel D, on two tilings;
    (b) against the reference path's codes, any difference sits at a rounding boundary."""
    layer = _layer(bits, sym, out, inp, group, rank, ldt)
    args = dispatch.weight_args(layer)
    assert args.delta is None and args.lora_a is not None  # factors, no dense D
    w_hat = TK.launch_dequant_fakequant(args, block_n=16, block_k=block_k)
    codes = TK.launch_quant_codes(args, block_n=32, block_k=64)
    scale, zero = layer.fake_quant_steps()
    zero_int = None if zero is None else P.round_zero_point(zero, bits)
    assert codes.dtype == torch.int8
    assert torch.equal(P.dequantize(codes, scale, zero_int, bits, group), w_hat)
    w_k = _kernel_w(layer)
    assert torch.equal(codes, P.quantize_codes(w_k, scale, zero, bits, group))
    assert torch.equal(w_hat, P.fake_quantize(w_k, scale, zero, bits, group))
    with torch.no_grad():
        codes_ref, v_ref = _codes_and_v(layer.pre_quant_weight(), layer)
    assert torch.equal(ops.reference_codes(args), codes_ref)  # the op's reference = torch path
    check_boundary(layer, codes, codes_ref, v_ref, layer.base_weight())


def other_order_delta(lora) -> torch.Tensor:
    """D [out, in] summed in the opposite order, j = r-1 .. 0, multiply then add (two roundings
    per term): a stand-in for a BLAS that orders or fuses differently from the kernels' chain."""
    a, b = lora.lora_A.detach(), lora.lora_B.detach()
    acc = torch.zeros(b.shape[0], a.shape[1])
    for j in reversed(range(a.shape[0])):
        acc = acc + b[:, j, None] * a[None, j]
    return acc * lora.scaling


@pytest.mark.parametrize("rank", [4, 8, 24])
def test_codes_differ_only_at_boundaries_at_scale(rank):
    """(b) over 512x1024 weights, with a large D (B ~ N(0, 1)) and steps set so that |v| spans
    the 8-bit grid up to 120, where fp32 spacing is coarsest: the kernels' codes (emulated D,
    bit-identical to theirs per element, test above: the chain does not depend on the tile)
    against torch's D and against ``other_order_delta``. On this CPU torch's small-K matmul is
    the same sequential fma chain, so none differ from torch (not asserted: that is the BLAS's
    choice); the other order moves a code here (asserted, so the bound check is not vacuous)."""
    out, inp, group = 512, 1024, 64
    layer = _layer(8, False, out, inp, group, rank)
    with torch.no_grad():
        layer.adapter.lora_B.normal_(0, 1.0)
        w = layer.pre_quant_weight()
        layer.weight_scale.copy_(w.abs().reshape(out, -1, group).amax(-1) / 120)
        w0 = layer.base_weight()
        codes_k, _ = _codes_and_v(w0 + kernel_delta(layer.adapter), layer)
        codes_ref, v_ref = _codes_and_v(layer.pre_quant_weight(), layer)
        codes_alt, v_alt = _codes_and_v(w0 + other_order_delta(layer.adapter), layer)
    check_boundary(layer, codes_k, codes_ref, v_ref, w0)
    assert check_boundary(layer, codes_k, codes_alt, v_alt, w0) >= 1


# --------------------------------------------------------------------------- (c)
def _matmul_tol(a, b_t, got_dtype):
    """fp32 accumulation bound of a @ b_t with a factor 2 margin, plus a 16-bit result's rounding."""
    t = 2 * a.shape[-1] * U * (a.abs() @ b_t.abs())
    if got_dtype != F32:
        t = t * (1 + torch.finfo(got_dtype).eps) + (a @ b_t).abs() * torch.finfo(got_dtype).eps
    return t + 1e-30


@pytest.mark.parametrize("bits,sym,out,inp,group,tokens,block_k,rank,act,ldt", CASES, ids=IDS)
def test_fwd_dx_grads_vs_reference(bits, sym, out, inp, group, tokens, block_k, rank, act, ldt):
    """(c) y, dX and every gradient (step, zero point, dA, dB) of the fused-LoRA kernels against
    float64 built from the kernel's D, and against the reference path's W_hat and gradients."""
    layer = _layer(bits, sym, out, inp, group, rank, ldt)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, inp, generator=g).to(act)
    gy = torch.randn(tokens, out, generator=g).to(act)
    args = dispatch.weight_args(layer)
    blocks = dict(block_m=16, block_n=16, block_k=block_k)
    y = TK.launch_quant_linear_fwd(x, args, **blocks)
    dx = TK.launch_quant_linear_dx(gy, args, **blocks)
    scale, zero = layer.fake_quant_steps()
    with torch.no_grad():
        w_k = P.fake_quantize(_kernel_w(layer), scale, zero, bits, group).to(act).double()
        w_ref = layer.fake_quant_weight().to(act).double()
    for got, a, w_t in ((y, x.double(), w_k.t()), (dx, gy.double(), w_k)):
        assert got.dtype == act
        assert ((got.double() - a @ w_t).abs() <= _matmul_tol(a, w_t, act)).all()
    moved = (w_k - w_ref).abs()  # nonzero only at codes test (b) vouches for
    for got, a, w_t, m in ((y, x.double(), w_ref.t(), moved.t()), (dx, gy.double(), w_ref, moved)):
        assert ((got.double() - a @ w_t).abs() <= _matmul_tol(a, w_t, act) + a.abs() @ m).all()
    _check_grads(layer, gy, x, args, block_k)


def _check_grads(layer, gy, x, args, block_k):
    """Kernel gradients vs float64 from the kernel's D; the op's reference vs float64 from
    torch's D; bounds of test_grads_interpret. The reference rounds G = grad_y^T x to a 16-bit
    activation dtype (as autograd does), outside those fp32 bounds: it is checked for fp32
    activations only (test_grads_interpret checks it no further either)."""
    lora = layer.adapter
    lsq = P.lsq_grad_scale(layer.group_size, layer.spec.bits)
    got = TG.launch_quant_linear_grads(gy, x, args, lsq, False,
                                       block_m=16, block_n=16, block_k=block_k)
    checks = [(got, _kernel_w(layer), "kernel")]
    if x.dtype == F32:
        checks.append((ops.reference_grads(gy, x, args, lsq, False), None,
                       "reference"))
    a, b, sc = args.lora_a.double(), args.lora_b.double(), args.lora_scaling
    for res, w, who in checks:
        exact, t = exact_grads(layer, gy, x, w)
        n_group = t + layer.group_size + 4
        close_within(res[0], exact["scale"], exact["scale_mag"], n_group, layer.scale_dtype,
                     f"{who} scale")
        if "zero" in exact:
            close_within(res[1], exact["zero"], exact["zero_mag"], n_group, name=f"{who} zero")
        assert res[2].numel() == 0
        dd, dd_mag = exact["delta"], exact["delta_mag"]
        close_within(res[3], sc * b.t() @ dd, sc * b.abs().t() @ dd_mag, t + layer.out_features + 2,
                     lora.lora_A.dtype, f"{who} dA")
        close_within(res[4], sc * dd @ a.t(), sc * dd_mag @ a.abs().t(), t + layer.in_features + 2,
                     lora.lora_B.dtype, f"{who} dB")


def test_bf16_factors():
    """bf16 LoRA factors: the kernels round the fma sum and the scaled D to bf16, as torch's
    bf16 (B @ A) * scaling does; W_hat and codes match the emulation bit for bit."""
    layer = _layer(4, False, 40, 64, 32, 8, lora_dtype=BF16)
    args = dispatch.weight_args(layer)
    scale, zero = layer.fake_quant_steps()
    w_k = _kernel_w(layer)
    assert torch.equal(TK.launch_dequant_fakequant(args, block_n=16, block_k=32),
                       P.fake_quantize(w_k, scale, zero, 4, 32))
    assert torch.equal(TK.launch_quant_codes(args), P.quantize_codes(w_k, scale, zero, 4, 32))


# --------------------------------------------------------------------------- (d)
def _step(layer, x, mode):
    """layer_step plus what the export writes and W_hat, on the same kernel path."""
    y, dx, grads = layer_step(layer, x, mode)
    with dispatch.use_kernels(mode):
        codes, scale, zero = layer.export_codes()
        w_hat = dispatch.fake_quant_weight(layer)
    return y, dx, grads, (codes, scale, zero), w_hat


def test_quant_linear_fused_lora_vs_reference(monkeypatch):
    """(d) QuantLinear with an inside LoRA, forward + backward + export, "triton" vs
    "reference". On the triton path no dense D is built (delta_weight raises); the exported
    codes are the kernel forward's, bit for bit. Gradients: the bounds above cover the
    arithmetic, this checks the wiring, so 1e-4 relative (a misplaced gradient is off by O(1))."""
    layer = _layer(3, False, 40, 96, 32, 8)
    x = torch.randn(2, 7, 96)
    y_ref, dx_ref, g_ref, (c_ref, _, _), w_ref = _step(layer, x, "reference")

    def no_dense_d(self):
        raise AssertionError("the fused LoRA path built a dense D")

    monkeypatch.setattr(LoRAAdapter, "delta_weight", no_dense_d)
    y, dx, grads, (codes, scale, zero), w_hat = _step(layer, x, "triton")
    monkeypatch.undo()
    assert torch.equal(P.dequantize(codes, scale, zero, 3, 32), w_hat)        # (a), via export
    assert torch.equal(codes, P.quantize_codes(_kernel_w(layer), *layer.fake_quant_steps(), 3, 32))
    with torch.no_grad():
        codes_ref, v_ref = _codes_and_v(layer.pre_quant_weight(), layer)
    assert torch.equal(c_ref, codes_ref)                                        # reference unchanged
    check_boundary(layer, codes, codes_ref, v_ref, layer.base_weight())
    a, w_t = x.reshape(-1, 96).double(), w_hat.double().t()
    want = a @ w_t + layer.bias.double()  # adding the bias rounds once more: 2 u |y| (2x margin)
    assert ((y.reshape(-1, 40).double() - want).abs() <= _matmul_tol(a, w_t, F32) + 2 * U * want.abs()).all()
    assert set(grads) == set(g_ref) == {"weight_scale", "weight_zero_point", "adapter.lora_A",
                                        "adapter.lora_B"}
    for name in g_ref:
        torch.testing.assert_close(grads[name], g_ref[name], rtol=1e-4,
                                   atol=1e-4 * g_ref[name].abs().max(), msg=name)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-4 * dx_ref.abs().max())
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4 * y_ref.abs().max())


# --------------------------------------------------------------------------- ops
def test_ops_with_factors_opcheck():
    """Schema, fake impls and the CPU (reference) impls of every op with the LoRA factors; one
    update, never both a dense delta and the factors, in the weight ops."""
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    layer = _layer(3, False, 40, 64, 32, 4)
    args = dispatch.weight_args(layer)
    x, gy = torch.randn(2, 5, 64), torch.randn(2, 5, 40)
    for op in (torch.ops.qat.dequant_fakequant, torch.ops.qat.quant_codes):
        torch.library.opcheck(op.default, args.flat(), test_utils=tests)
    torch.library.opcheck(torch.ops.qat.quant_codes.default, dispatch.weight_args(layer, factors=False).flat(),
                          test_utils=tests)  # dense D, no factors (the defaults)
    torch.library.opcheck(torch.ops.qat.quant_linear_fwd.default, (x, *args.flat()), test_utils=tests)
    torch.library.opcheck(torch.ops.qat.quant_linear_dx.default, (gy, *args.flat()), test_utils=tests)
    grads = (gy, x, *args.flat(), 0.1, False)
    torch.library.opcheck(torch.ops.qat.quant_linear_grads.default, grads, test_utils=tests)
    with torch.no_grad():
        w = layer.fake_quant_weight()
    assert torch.equal(torch.ops.qat.dequant_fakequant(*args.flat()), w)
    assert torch.equal(torch.ops.qat.quant_codes(*args.flat()), layer.export_codes()[0])
    torch.testing.assert_close(torch.ops.qat.quant_linear_fwd(x, *args.flat()), x @ w.t())
    both = args.replace(delta=dispatch.weight_args(layer, factors=False).delta)
    for fn in (ops.reference_w_hat, ops.reference_codes, TK.launch_dequant_fakequant,
               TK.launch_quant_codes):
        with pytest.raises(ValueError, match="dense delta or the LoRA factors"):
            fn(both)
