"""Triton kernels vs the reference, on CPU through the Triton interpreter (TRITON_INTERPRET=1).

The env var must be set before triton.jit decorates the kernels, so it is set here, before
``qat.kernels.triton_kernels`` is first imported (nothing else imports that module).

Tolerances. W_hat is compared bit for bit: the kernel reproduces the reference's arithmetic
(fp32 dequant, round-to-nearest division, ties-to-even rounding, exact (q - z) * s before one
rounding). y and dX differ from a float64 matmul of the same W_hat only by fp32 accumulation
(and for 16-bit activations, the final rounding of the output): the standard bound
|err| <= K * u * sum_k |a_k b_k| with u = 2^-24, plus half an ulp of the output dtype,
used with a factor 2 margin.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

# Set before triton is first imported (its knobs read it then) and kept for the session: the
# interpreter checks it again on nested jit calls. No other test module runs Triton.
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton", reason="triton is not installed (pip install 'qat[triton]')")
from qat.kernels import triton_kernels as TK  # noqa: E402

from qat import primitives as P  # noqa: E402
from qat.config import LayerSpec  # noqa: E402
from qat.kernels import dispatch, ops, triton_common  # noqa: E402
from qat.kernels.args import WeightArgs  # noqa: E402
from qat.quant_linear import QuantLinear  # noqa: E402
from tests.kernels.helpers import make_layer  # noqa: E402

if not triton_common.INTERPRETED:
    pytest.skip("qat.kernels.triton_kernels was imported before this module, without "
                "TRITON_INTERPRET=1: run this file on its own", allow_module_level=True)

OUT, IN, GROUP, TOKENS = 24, 64, 32, 5
BLOCKS = dict(block_m=16, block_n=16, block_k=32)  # partial tiles in every dimension


def _layer(bits, symmetric, storage_bits=None, group=GROUP, out=OUT, inp=IN, delta=True, seed=0):
    return make_layer(bits, symmetric, storage_bits, group, out, inp, delta, seed)


CASES = [(b, sym) for b in (2, 3, 4, 8) for sym in (True, False)]
IDS = [f"b{b}-{'sym' if s else 'asym'}" for b, s in CASES]


def _bound(a, b_t):
    """Elementwise fp32-accumulation error bound for a @ b_t (float64 inputs)."""
    k = a.shape[-1]
    return 2 * k * 2.0**-24 * (a.abs() @ b_t.abs())


@pytest.mark.parametrize("bits,symmetric", CASES, ids=IDS)
def test_w_hat_bit_exact(bits, symmetric):
    layer = _layer(bits, symmetric)
    with torch.no_grad():
        ref = layer.fake_quant_weight()
    args = dispatch.weight_args(layer)
    got = TK.launch_dequant_fakequant(args, block_n=16, block_k=32)
    assert got.dtype == ref.dtype
    assert torch.equal(got, ref), (got - ref).abs().max()
    assert torch.equal(ops.reference_w_hat(args), ref)


@pytest.mark.parametrize("bits,symmetric", CASES, ids=IDS)
def test_fused_fwd_and_dx_fp32(bits, symmetric):
    layer = _layer(bits, symmetric)
    args = dispatch.weight_args(layer)
    with torch.no_grad():
        w = layer.fake_quant_weight().double()
    x = torch.randn(1, TOKENS, IN)
    gy = torch.randn(1, TOKENS, OUT)
    y = TK.launch_quant_linear_fwd(x, args, **BLOCKS)
    dx = TK.launch_quant_linear_dx(gy, args, **BLOCKS)
    assert y.shape == (1, TOKENS, OUT) and dx.shape == (1, TOKENS, IN)
    y_ref, dx_ref = x.double() @ w.t(), gy.double() @ w
    assert ((y.double() - y_ref).abs() <= _bound(x.double(), w.t())).all()
    assert ((dx.double() - dx_ref).abs() <= _bound(gy.double(), w)).all()


@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16])
def test_fused_16bit_activations(act_dtype):
    layer = _layer(3, False, storage_bits=8)
    args = dispatch.weight_args(layer)
    with torch.no_grad():
        w = layer.fake_quant_weight().to(act_dtype).double()  # the reference casts W_hat to x's dtype
    x = torch.randn(TOKENS, IN).to(act_dtype)
    gy = torch.randn(TOKENS, OUT).to(act_dtype)
    y = TK.launch_quant_linear_fwd(x, args, **BLOCKS)
    dx = TK.launch_quant_linear_dx(gy, args, **BLOCKS)
    assert y.dtype == act_dtype and dx.dtype == act_dtype
    ulp = torch.finfo(act_dtype).eps  # relative spacing; half an ulp is eps/2 of |value|
    for got, a, b_t in ((y, x.double(), w.t()), (dx, gy.double(), w)):
        ref = a @ b_t
        tol = _bound(a, b_t) * (1 + ulp) + ref.abs() * ulp / 2 * 2
        assert ((got.double() - ref).abs() <= tol + 1e-30).all()


def test_group_128_storage8_ternary():
    """Per-group steps of 128 over an 8-bit base, and the ternary grid (-1, 1) in int2."""
    for bits, storage, sym in ((4, 8, False), (1.58, None, True)):
        layer = _layer(bits, sym, storage_bits=storage, group=128, inp=256, out=20)
        args = dispatch.weight_args(layer)
        with torch.no_grad():
            ref = layer.fake_quant_weight()
        assert torch.equal(TK.launch_dequant_fakequant(args, block_n=16, block_k=128), ref)
        x = torch.randn(3, 256)
        y = TK.launch_quant_linear_fwd(x, args, block_m=16, block_n=16, block_k=128)
        assert ((y.double() - x.double() @ ref.double().t()).abs() <= _bound(x.double(), ref.double().t())).all()


def test_ops_opcheck_and_reference():
    """The custom ops' schema, fake impls and CPU (reference) impls pass torch.library.opcheck."""
    layer = _layer(3, False)
    args = dispatch.weight_args(layer)
    x = torch.randn(2, TOKENS, IN)
    gy = torch.randn(2, TOKENS, OUT)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(torch.ops.qat.dequant_fakequant.default, args.flat(), test_utils=tests)
    torch.library.opcheck(torch.ops.qat.quant_linear_fwd.default, (x, *args.flat()), test_utils=tests)
    torch.library.opcheck(torch.ops.qat.quant_linear_dx.default, (gy, *args.flat()), test_utils=tests)
    with torch.no_grad():
        w = layer.fake_quant_weight()
    torch.testing.assert_close(torch.ops.qat.quant_linear_fwd(x, *args.flat()), x @ w.t())
    torch.testing.assert_close(torch.ops.qat.quant_linear_dx(gy, *args.flat()), gy @ w)
    # symmetric, no delta: the optional tensors as None
    args2 = dispatch.weight_args(_layer(4, True, delta=False))
    torch.library.opcheck(torch.ops.qat.dequant_fakequant.default, args2.flat(), test_utils=tests)


def test_dispatch_modes():
    layer = _layer(4, False)
    x = torch.randn(TOKENS, IN)
    with dispatch.use_kernels("reference"):
        assert dispatch.kernel_mode() == "reference"
        y_ref = dispatch.quant_linear(x, layer)
    assert dispatch.kernel_mode() == "auto"
    with dispatch.use_kernels("triton"):
        y_tri = dispatch.quant_linear(x, layer)
        w_tri = dispatch.fake_quant_weight(layer)
    with torch.no_grad():
        assert torch.equal(w_tri, layer.fake_quant_weight())
    torch.testing.assert_close(y_tri, y_ref)
    # auto on CPU tensors: the reference, bit for bit
    assert torch.equal(dispatch.quant_linear(x, layer), y_ref)
    with pytest.raises(ValueError, match="unknown kernel mode"):
        dispatch.use_kernels("fast")


def test_mode_is_scoped_to_the_with_block_and_thread():
    """The mode is a context variable: a call outside ``with`` changes nothing, and a ``with``
    block in another thread does not leak into this one."""
    import threading

    dispatch.use_kernels("reference")  # not entered: no effect
    assert dispatch.kernel_mode() == "auto"
    entered, release, seen = threading.Event(), threading.Event(), []

    def other():
        with dispatch.use_kernels("reference"):
            seen.append(dispatch.kernel_mode())
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=other)
    thread.start()
    entered.wait(10)
    try:
        assert seen == ["reference"] and dispatch.kernel_mode() == "auto"
    finally:
        release.set()
        thread.join()


@pytest.fixture
def launches(monkeypatch):
    """Counts the dX and grads launchers' calls (which path a backward took)."""
    from qat.kernels import triton_grads as TG

    calls = []
    for module, name in ((TK, "launch_quant_linear_dx"), (TG, "launch_quant_linear_grads")):
        def counted(*args, _f=getattr(module, name), _name=name, **kwargs):
            calls.append(_name)
            return _f(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("forward_mode, backward_mode", [("triton", "reference"),
                                                         ("reference", "triton")])
def test_backward_takes_the_forward_path(launches, forward_mode, backward_mode):
    """The path is recorded at forward time: a backward run under another mode (or after the
    ``with`` block) takes the forward's path, and gives the same gradients."""
    layer = _layer(4, False)
    x = torch.randn(TOKENS, IN, requires_grad=True)
    with dispatch.use_kernels(forward_mode):
        y = layer(x)
    with dispatch.use_kernels(backward_mode):
        y.sum().backward()
    kernel_calls = ["launch_quant_linear_dx", "launch_quant_linear_grads"]
    assert launches == (kernel_calls if forward_mode == "triton" else [])


def test_bf16_layer_w_hat_and_fwd():
    """A bf16 model: steps saved in bf16, W_hat in bf16, bf16 activations."""
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(IN, OUT, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(OUT, IN, generator=g) * 0.05)
    layer = QuantLinear.from_linear(linear, LayerSpec(bits=4, group_size=GROUP, symmetric=False,
                                                      storage_bits=8, init="rtn"))
    with torch.no_grad():
        layer.weight_scale.mul_(1.7)
        ref = layer.fake_quant_weight()
    assert ref.dtype == torch.bfloat16
    args = dispatch.weight_args(layer)
    assert torch.equal(TK.launch_dequant_fakequant(args, block_n=16, block_k=32), ref)
    x = torch.randn(TOKENS, IN).bfloat16()
    y = TK.launch_quant_linear_fwd(x, args, **BLOCKS)
    a, b_t = x.double(), ref.double().t()
    exact = a @ b_t
    tol = _bound(a, b_t) * (1 + 2**-8) + exact.abs() * 2**-8
    assert ((y.double() - exact).abs() <= tol).all()


@pytest.mark.parametrize("asym", [False, True])
def test_exact_ties_round_half_even(asym):
    """w/s exactly on .5 (and outside the grid): ties go to even, as torch.round."""
    from qat.packing import pack_int32

    bits, g = 3, 32
    qmin, qmax = P.qrange(bits)
    codes = torch.zeros(OUT, IN, dtype=torch.int8)  # W0 = 0: W_hat comes from delta alone
    base_scale = torch.ones(OUT, IN // g)
    scale = torch.full((OUT, IN // g), 0.25)
    k = torch.arange(OUT * IN).reshape(OUT, IN) % 13 - 6  # ties from -5.5 to 6.5, some clamped
    delta = (k + 0.5) * 0.25
    zero = (torch.arange(OUT * (IN // g)).reshape(OUT, -1) % 3 - 1).float() if asym else None
    args = WeightArgs(pack_int32(codes, 8), base_scale, None, scale, zero, delta, 8, qmin, qmax, g,
                      IN, torch.float32)
    ref = ops.reference_w_hat(args)
    assert torch.equal(TK.launch_dequant_fakequant(args, block_n=16, block_k=32), ref)
