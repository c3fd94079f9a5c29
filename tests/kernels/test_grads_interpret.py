"""The fused backward reductions (qat::quant_linear_grads) vs float64, under TRITON_INTERPRET=1.

What is checked. For y = x W_hat^T with G = grad_y^T x [out, in] and, per element of W_hat,
v = (W0 + D) / s (fp32, as the forward), z = clamp(round(z_float)), inside = qmin <= v + z <= qmax,
q = round(clamp(v + z)):
    d scale   = lsq * sum_group G * ((q - z) - inside * v)          (LSQ)
    d zero    = lsq * [round(z_float) on the grid] * sum_group -s * G * (1 - inside)   (LSQ+)
    d D       = G * inside                                         (STE)
    d B, d A  = scaling * dD A^T, scaling * B^T dD                 (LoRA, D = scaling * B A)
The float64 value of each uses the forward's own fp32 v, q and masks (recomputed here with
qat.primitives' conventions) and G in float64, so it is the exact result the kernel rounds.
The op's torch reference (``ops.reference_grads``: the formulas in
``P.fake_quantize_backward``, since an op cannot run autograd) is checked against the same
values, and ``P.fake_quantize_backward`` against autograd through ``P.fake_quantize``.

Tolerances, u = 2^-24 (fp32 unit roundoff). The kernel accumulates G over the T tokens in fp32
(|dG| <= T u H, H = |grad_y|^T |x| in float64), forms one product and one subtraction per
element and sums a group in at most ``group`` fp32 additions (tile sums, then the parts), so
    |d scale err| <= lsq (T + group + 4) u sum_group |c| H,     c = (q - z) - inside * v
(and likewise for the zero point with |s| H over the clamped elements); LoRA sums over the
tiles in fp32 once more: (T + K + 2) u (H inside) |A|^T. Each bound is used with a factor 2
margin, plus half an ulp of the output dtype when that is 16-bit. The torch reference does
the same fp32 operations in another order, so the same bounds hold for it.
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
from qat.kernels.support import grads_block_k  # noqa: E402
from tests.kernels.helpers import InsideDelta, layer_step, make_layer  # noqa: E402
from tests.kernels.helpers import close_within as _close  # noqa: E402
from tests.kernels.helpers import exact_grads as _exact  # noqa: E402

if not triton_common.INTERPRETED:
    pytest.skip("qat.kernels.triton_kernels was imported before this module, without "
                "TRITON_INTERPRET=1: run this file on its own", allow_module_level=True)

# (bits, symmetric, out, in, group, tokens, block_k): odd token counts and out widths that are
# not multiples of the 16-row tiles; block_k picks the tiling of a group: several groups per
# tile (block_k > group, with a partial last tile at in=96), one tile per group, or a group in
# 2-3 parts (block_k < group; group 96 is per-channel, group 48 gets 16-wide tiles).
CASES = [
    (2, True, 48, 64, 32, 5, 64),
    (2, False, 40, 96, 96, 17, 32),
    (3, True, 40, 96, 32, 9, 64),
    (3, False, 48, 64, 64, 11, 32),
    (4, True, 48, 96, 32, 13, 32),
    (4, False, 40, 64, 32, 7, 64),
    (8, True, 40, 64, 64, 16, 64),
    (8, False, 48, 96, 48, 15, 64),
    (1.58, True, 40, 64, 32, 6, 32),
]
IDS = [f"b{c[0]}-{'sym' if c[1] else 'asym'}-{c[2]}x{c[3]}-g{c[4]}-t{c[5]}-k{c[6]}" for c in CASES]


def _lora_layer(bits, symmetric, out, inp, group, rank=4, seed=0, dtype=torch.float32):
    layer = make_layer(bits, symmetric, None, group, out, inp, delta=False, seed=seed, dtype=dtype)
    torch.manual_seed(seed)
    lora = LoRAAdapter(inp, out, rank=rank, alpha=2 * rank)
    with torch.no_grad():
        lora.lora_B.normal_(0, 0.02)  # nonzero B: D moves W0 and dA is nonzero
    layer.adapter = lora
    if layer.weight_zero_point is not None:
        with torch.no_grad():  # one zero point off the grid: its gradient must be 0
            layer.weight_zero_point[0, 0] = P.qrange(bits)[1] + 3
    return layer


@pytest.mark.parametrize("bits,symmetric,out,inp,group,tokens,block_k", CASES, ids=IDS)
def test_grads_vs_float64(bits, symmetric, out, inp, group, tokens, block_k):
    """Steps, zero points, dD (generic inside adapter) and LoRA dA / dB, kernel and reference."""
    layer = _lora_layer(bits, symmetric, out, inp, group)
    lora = layer.adapter
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, inp, generator=g)
    gy = torch.randn(tokens, out, generator=g)
    exact, t = _exact(layer, gy, x)
    args = dispatch.weight_args(layer, factors=False)
    lsq = P.lsq_grad_scale(layer.group_size, bits)
    blocks = dict(block_m=16, block_n=16, block_k=block_k)
    n_group = t + group + 4
    # the same delta as a generic inside adapter: the kernel writes dD [out, in]
    got = TG.launch_quant_linear_grads(gy, x, args, lsq, True, **blocks)
    ref = ops.reference_grads(gy, x, args, lsq, True)
    for name, k in (("scale", 0), ("zero", 1), ("delta", 2)):
        if name not in exact:
            assert got[k].numel() == 0 and ref[k].numel() == 0
            continue
        assert got[k].shape == ref[k].shape and got[k].dtype == ref[k].dtype
        n = t + 2 if name == "delta" else n_group
        _close(got[k], exact[name], exact[f"{name}_mag"], n, name=f"kernel {name}")
        _close(ref[k], exact[name], exact[f"{name}_mag"], n, name=f"reference {name}")
    if "zero" in exact:
        assert got[1][0, 0] == 0 and ref[1][0, 0] == 0  # the off-grid zero point
    # LoRA: dA and dB reduced in the kernel, no dD written
    A, B, sc = lora.lora_A.detach(), lora.lora_B.detach(), lora.scaling
    got = TG.launch_quant_linear_grads(gy, x, args.replace(lora_a=A, lora_b=B, lora_scaling=sc), lsq, False, **blocks)
    ref = ops.reference_grads(gy, x, args.replace(lora_a=A, lora_b=B, lora_scaling=sc), lsq, False)
    assert got[2].numel() == 0 and ref[2].numel() == 0
    dd, dd_mag = exact["delta"], exact["delta_mag"]
    want_a, mag_a = sc * B.double().t() @ dd, sc * B.double().abs().t() @ dd_mag
    want_b, mag_b = sc * dd @ A.double().t(), sc * dd_mag @ A.double().abs().t()
    for res, who in ((got, "kernel"), (ref, "reference")):
        _close(res[0], exact["scale"], exact["scale_mag"], n_group, name=f"{who} scale (lora)")
        _close(res[3], want_a, mag_a, t + out + 2, name=f"{who} dA")
        _close(res[4], want_b, mag_b, t + inp + 2, name=f"{who} dB")


@pytest.mark.parametrize("act_dtype", [torch.bfloat16, torch.float16])
def test_grads_16bit(act_dtype):
    """16-bit activations; for bf16 also a bf16 layer (steps saved in bf16, step grads in bf16).
    Products of 16-bit values are exact in fp32, so G keeps the fp32 bound."""
    layer_dtype = torch.bfloat16 if act_dtype == torch.bfloat16 else torch.float32
    layer = _lora_layer(4, False, 40, 64, 32, rank=3, dtype=layer_dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 64, generator=g).to(act_dtype)
    gy = torch.randn(9, 40, generator=g).to(act_dtype)
    exact, t = _exact(layer, gy, x)
    args = dispatch.weight_args(layer, factors=False)
    lsq = P.lsq_grad_scale(layer.group_size, 4)
    lora = layer.adapter
    A, B, sc = lora.lora_A.detach(), lora.lora_B.detach(), lora.scaling
    got = TG.launch_quant_linear_grads(gy, x, args.replace(lora_a=A, lora_b=B, lora_scaling=sc), lsq, False, block_m=16, block_n=16, block_k=32)
    assert got[0].dtype == layer.scale_dtype
    _close(got[0], exact["scale"], exact["scale_mag"], t + 32 + 4, layer.scale_dtype, "scale")
    _close(got[1], exact["zero"], exact["zero_mag"], t + 32 + 4, name="zero")
    dd, dd_mag = exact["delta"], exact["delta_mag"]
    _close(got[3], sc * B.double().t() @ dd, sc * B.double().abs().t() @ dd_mag, t + 40 + 2, name="dA")
    _close(got[4], sc * dd @ A.double().t(), sc * dd_mag @ A.double().abs().t(), t + 64 + 2, name="dB")


@pytest.mark.parametrize("bits,symmetric", [(2, False), (4, True), (1.58, True), (8, False)])
def test_fake_quantize_backward_is_autograd(bits, symmetric):
    """P.fake_quantize_backward (the op reference's formulas) equals autograd through
    P.fake_quantize, in float64 (steps in fp64 make the forward fp64 too), to 1e-12: the two
    differ only by rounding order. Includes w/s outside the grid, exact ties and an off-grid
    zero point."""
    g = torch.Generator().manual_seed(3)
    out, inp, group = 6, 64, 32
    qmin, qmax = P.qrange(bits)
    scale = (0.05 + torch.rand(out, inp // group, generator=g)).double()
    w = torch.randn(out, inp, generator=g).double() * qmax * 0.6
    w[0, :8] = (torch.arange(8) - 3.5).double() * scale[0, 0]  # exact .5 ties
    zero = None
    if not symmetric:
        zero = torch.randn(out, inp // group, generator=g).double() * 2
        zero[1, 0] = qmax + 2.4                                    # rounds off the grid: no grad
    grad = torch.randn(out, inp, generator=g).double()
    leaves = [t.clone().requires_grad_() for t in (w, scale) + (() if zero is None else (zero,))]
    w_hat = P.fake_quantize(*leaves[:2], leaves[2] if zero is not None else None, bits, group,
                            lsq_scale=0.3)
    want = torch.autograd.grad(w_hat, leaves, grad)
    got = P.fake_quantize_backward(w, scale, zero, bits, group, grad, lsq_scale=0.3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if zero is not None:
        assert got[2][1, 0] == 0


def test_grads_opcheck():
    """Schema, fake impl (shapes and dtypes of all five outputs) and the CPU (reference) impl."""
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    op = torch.ops.qat.quant_linear_grads.default
    layer = _lora_layer(3, False, 40, 64, 32)
    args = dispatch.weight_args(layer, factors=False)
    x, gy = torch.randn(2, 5, 64), torch.randn(2, 5, 40)
    lora = layer.adapter
    factors = args.replace(lora_a=lora.lora_A.detach(), lora_b=lora.lora_B.detach(),
                           lora_scaling=lora.scaling)
    torch.library.opcheck(op, (gy, x, *factors.flat(), 0.1, False), test_utils=tests)
    torch.library.opcheck(op, (gy, x, *args.flat(), 0.1, True), test_utils=tests)
    sym = dispatch.weight_args(make_layer(4, True, out=40, delta=False))  # no zero point, no delta
    outs = torch.ops.qat.quant_linear_grads(gy, x, *sym.flat(), 0.1, True)
    assert [tuple(o.shape) for o in outs] == [(40, 2), (0,), (0,), (0,), (0,)]
    torch.library.opcheck(op, (gy, x, *sym.flat(), 0.1, True), test_utils=tests)




@pytest.mark.parametrize("adapter", ["lora", "dense", "lora-frozen-steps", "frozen-dense"])
def test_quant_linear_backward_dispatch(adapter):
    """QuantLinear's backward through the kernels (mode "triton", interpreted) gives the
    reference path's gradients, each on the right parameter. The bounds above cover the
    arithmetic; this checks the wiring, so a 1e-4 relative tolerance is plenty (a gradient on
    the wrong tensor, or a missing one, is off by O(1))."""
    if adapter.startswith("lora"):
        layer = _lora_layer(3, False, 40, 96, 32)
    else:
        layer = make_layer(3, False, out=40, inp=96, delta=False)
        torch.manual_seed(0)
        layer.adapter = InsideDelta(40, 96, 0.01)
    frozen = {"lora-frozen-steps": ("weight_scale", "weight_zero_point"), "frozen-dense": ("adapter.d",)}
    for name, p in layer.named_parameters():
        if name in frozen.get(adapter, ()):
            p.requires_grad_(False)
    expected = {"lora": 4, "dense": 3, "lora-frozen-steps": 2, "frozen-dense": 2}[adapter]
    x = torch.randn(2, 7, 96)
    _, ref_dx, ref = layer_step(layer, x, "reference")
    _, got_dx, got = layer_step(layer, x, "triton")
    assert set(got) == set(ref) and len(ref) == expected
    for name in ref:
        scale = ref[name].abs().max()
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-4 * scale, msg=name)
    torch.testing.assert_close(got_dx, ref_dx, rtol=1e-4, atol=1e-4 * ref_dx.abs().max())


def test_unsupported_group_falls_back():
    """A group whose largest power-of-two divisor is below 16 (per-channel over 40 inputs) has
    no kernel tiling; dispatch then runs the reference math, and the gradients still arrive."""
    assert grads_block_k(40) == 0 and grads_block_k(48) == 16 and grads_block_k(128) == 64
    layer = make_layer(4, False, group=-1, out=24, inp=40, delta=False)
    x = torch.randn(3, 40)
    _, _, ref = layer_step(layer, x, "reference")
    _, _, got = layer_step(layer, x, "triton")
    for name in ref:
        torch.testing.assert_close(got[name], ref[name])
