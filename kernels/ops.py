"""``torch.library`` custom ops (namespace ``qat``) for the packed-base quantized linear.

    qat::dequant_fakequant(weight) -> W_hat [out, in]                     (weight.out_dtype)
    qat::quant_codes(weight) -> codes [out, in] int8                      (what export writes)
    qat::quant_linear_fwd(x, weight) -> y = x @ W_hat^T                   (x's dtype, no bias)
    qat::quant_linear_dx(grad_y, weight) -> dX = grad_y @ W_hat           (grad_y's dtype)
    qat::quant_linear_grads(grad_y, x, weight, lsq_scale, delta_grad)
        -> (d weight_scale, d weight_zero, d delta, d lora_A, d lora_B)
    qat::fwht(x, transpose, scale, out_dtype) -> scale * x H^T           (autograd: the transpose)
    qat::pack_int32(codes, bits, dim=1) -> int32 words                    (qat.packing's layout)
    qat::unpack_int32(packed, bits, n, dim=1) -> int8 codes

``weight`` is a ``WeightArgs`` (kernels/args.py), flattened into the op's arguments by
``WeightArgs.flat`` and rebuilt inside by ``WeightArgs.from_flat``; its schema is
``args.SCHEMA``. Python callers use the ``torch.ops.qat`` ops with ``*weight.flat()``, or the
``reference_*`` functions here with the record itself.

From LoRA factors the reference builds D = (B @ A) * scaling exactly as
``LoRAAdapter.delta_weight``; the Triton kernels form each [BN, BK] tile of D in registers
instead (a fixed fma order over r, see ``triton_tiles.lora_tile``), which may round
differently from torch's matmul. That is why export asks ``qat::quant_codes`` for its codes on
the kernel path: they come from the same in-kernel D as training's W_hat (docs/KERNELS.md,
"Exactness").

Every device gets the reference (``qat.primitives`` / ``qat.packing`` / ``qat.hadamard``); CUDA
gets the Triton launchers when triton is importable and the dtypes are supported. The fake
implementations give torch.compile the output shapes. The weight ops carry no autograd: they
are the pieces of QuantLinear's recomputed backward.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
import torch.nn.functional as F

from qat import packing
from qat import primitives as P
from qat.hadamard import fwht as hadamard_fwht
from qat.kernels.args import N_FIELDS, SCHEMA, WeightArgs, check_one_delta
from qat.kernels.support import (FLOATS, PACK_DTYPES, floats, fwht_tile, grads_block_k,
                                 triton_available)


def launcher(module: str, name: str):
    """The Triton launcher ``launch_<name>`` of ``qat.kernels.<module>``. Imported on first use:
    triton is optional, and under TRITON_INTERPRET it must be set before triton's import."""
    return getattr(importlib.import_module(f"qat.kernels.{module}"), f"launch_{name}")


# --------------------------------------------------------------------------- reference math
def bits_from_range(qmin: int, qmax: int) -> float:
    """The ``bits`` whose signed grid is ``(qmin, qmax)`` (1.58 for ternary's (-1, 1))."""
    if (qmin, qmax) == (-1, 1):
        return P.TERNARY
    bits = (qmax - qmin + 1).bit_length() - 1
    if P.qrange(bits) != (qmin, qmax):
        raise ValueError(f"({qmin}, {qmax}) is not a signed b-bit grid (-2^(b-1), 2^(b-1) - 1)")
    return bits


def _pre_quant(w: WeightArgs) -> torch.Tensor:
    """W0 + D [out, in] fp32, as ``QuantLinear.pre_quant_weight``: D is ``delta``, else
    (B @ A) * scaling from the LoRA factors (``LoRAAdapter.delta_weight``), else 0."""
    codes = packing.unpack_int32(w.base_packed, w.storage_bits, w.in_features)
    w0 = P.dequantize(codes, w.base_scale, w.base_zero, w.storage_bits, w.group_size)
    delta = w.delta
    if delta is None and w.has_lora:
        delta = (w.lora_b @ w.lora_a) * w.lora_scaling
    return w0 if delta is None else w0 + delta.float()


@torch.no_grad()
def reference_w_hat(w: WeightArgs) -> torch.Tensor:
    """W_hat exactly as ``QuantLinear.fake_quant_weight`` computes it, through ``qat.primitives``."""
    check_one_delta(w)
    bits = bits_from_range(w.bits_qmin, w.bits_qmax)
    return P.fake_quantize(_pre_quant(w), w.weight_scale, w.weight_zero, bits,
                           w.group_size).to(w.out_dtype)


@torch.no_grad()
def reference_codes(w: WeightArgs) -> torch.Tensor:
    """Codes [out, in] int8 exactly as ``QuantLinear.export_codes`` computes them in torch."""
    check_one_delta(w)
    bits = bits_from_range(w.bits_qmin, w.bits_qmax)
    return P.quantize_codes(_pre_quant(w), w.weight_scale, w.weight_zero, bits, w.group_size)


@torch.no_grad()
def reference_grads(grad_y, x, w: WeightArgs, lsq_scale: float, delta_grad: bool) -> tuple:
    """The backward of QuantLinear's recomputed linear, for ``qat::quant_linear_grads``:
    G = grad_y^T x (``P.linear_weight_grad``, fp32) through ``P.fake_quantize_backward``.

    An op's implementation runs below autograd, so this spells the gradients out instead of
    differentiating ``fake_quantize``; the tests check the two agree. Returns (grad
    weight_scale [out, G], grad weight_zero [out, G], grad delta [out, in], grad lora_A [r, in],
    grad lora_B [out, r]), each in its input's dtype; an empty [0] tensor for those not asked
    for (no zero point; ``delta_grad`` False; no LoRA factors). With LoRA factors,
    D = (B @ A) * lora_scaling (``LoRAAdapter.delta_weight``): built here when ``delta`` is
    None, else ``delta`` must be it (the dense-D path).
    """
    def empty():  # a fresh [0] tensor per unused output (op outputs may not alias each other)
        return w.weight_scale.new_empty(0)

    acc = torch.promote_types(torch.float32, w.weight_scale.dtype)   # fp32 (fp64 for fp64 steps)
    grad_w = P.linear_weight_grad(grad_y, x, acc)                    # G [out, in]
    bits = bits_from_range(w.bits_qmin, w.bits_qmax)
    d_w, d_scale, d_zero = P.fake_quantize_backward(_pre_quant(w), w.weight_scale, w.weight_zero,
                                                    bits, w.group_size, grad_w, lsq_scale)
    grad_zero = empty() if w.weight_zero is None else d_zero.to(w.weight_zero.dtype)
    grad_delta, grad_a, grad_b = empty(), empty(), empty()
    if w.has_lora:
        d_w = d_w * w.lora_scaling                                   # dL/d(B A), [out, in]
        grad_a = (w.lora_b.to(acc).t() @ d_w).to(w.lora_a.dtype)     # [r, in]
        grad_b = (d_w @ w.lora_a.to(acc).t()).to(w.lora_b.dtype)     # [out, r]
    elif delta_grad and w.delta is not None:
        grad_delta = d_w.to(w.delta.dtype)
    return d_scale.to(w.weight_scale.dtype), grad_zero, grad_delta, grad_a, grad_b


def reference_fwht(x: torch.Tensor, transpose: bool = False, scale: float = 1.0,
                   out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """scale * x H_n^T (or scale * x H_n) through ``qat.hadamard.fwht``, computed in fp32 (fp64
    for fp64 inputs), then cast to ``out_dtype`` (default x's). Differentiable."""
    z = hadamard_fwht(x.to(torch.promote_types(x.dtype, torch.float32)), transpose)
    if scale != 1.0:
        z = z * scale
    return z.to(x.dtype if out_dtype is None else out_dtype)


def triton_takes(w: WeightArgs, *activations) -> bool:
    """Whether the Triton kernels take this weight (+ activations): triton imports and the
    steps, delta, factors, activations and W_hat's dtype are fp32 / fp16 / bf16."""
    return (triton_available() and floats(*w.float_tensors(), *activations)
            and w.out_dtype in FLOATS)


# --------------------------------------------------------------------------- weight-only ops
def _weight_op(name: str, reference, fake_dtype=None):
    """``qat::name(weight) -> [out, in]``: the reference on every device, the Triton launcher
    ``launch_<name>`` on CUDA; the fake gives [out, in] in ``fake_dtype`` (default W_hat's)."""

    @torch.library.custom_op(f"qat::{name}", mutates_args=(), schema=f"({SCHEMA}) -> Tensor")
    def op(*flat):
        return reference(WeightArgs.from_flat(flat))

    @op.register_kernel("cuda")
    def _(*flat):
        w = WeightArgs.from_flat(flat)
        return launcher("triton_kernels", name)(w) if triton_takes(w) else reference(w)

    @op.register_fake
    def _(*flat):
        w = WeightArgs.from_flat(flat)
        return w.base_packed.new_empty((w.out_features, w.in_features),
                                       dtype=fake_dtype or w.out_dtype)

    return op


dequant_fakequant = _weight_op("dequant_fakequant", reference_w_hat)
quant_codes = _weight_op("quant_codes", reference_codes, fake_dtype=torch.int8)


# --------------------------------------------------------------------------- fwd / dx
@torch.library.custom_op("qat::quant_linear_fwd", mutates_args=(),
                         schema=f"(Tensor x, {SCHEMA}) -> Tensor")
def quant_linear_fwd(x, *flat):
    return F.linear(x, reference_w_hat(WeightArgs.from_flat(flat)).to(x.dtype))


@quant_linear_fwd.register_fake
def _(x, *flat):
    return x.new_empty((*x.shape[:-1], WeightArgs.from_flat(flat).out_features))


@quant_linear_fwd.register_kernel("cuda")
def _(x, *flat):
    w = WeightArgs.from_flat(flat)
    if triton_takes(w, x):
        return launcher("triton_kernels", "quant_linear_fwd")(x, w)
    return F.linear(x, reference_w_hat(w).to(x.dtype))


@torch.library.custom_op("qat::quant_linear_dx", mutates_args=(),
                         schema=f"(Tensor grad_y, {SCHEMA}) -> Tensor")
def quant_linear_dx(grad_y, *flat):
    return grad_y @ reference_w_hat(WeightArgs.from_flat(flat)).to(grad_y.dtype)


@quant_linear_dx.register_fake
def _(grad_y, *flat):
    return grad_y.new_empty((*grad_y.shape[:-1], WeightArgs.from_flat(flat).in_features))


@quant_linear_dx.register_kernel("cuda")
def _(grad_y, *flat):
    w = WeightArgs.from_flat(flat)
    if triton_takes(w, grad_y):
        return launcher("triton_kernels", "quant_linear_dx")(grad_y, w)
    return grad_y @ reference_w_hat(w).to(grad_y.dtype)


# --------------------------------------------------------------------------- grads
_GRADS_SCHEMA = (f"(Tensor grad_y, Tensor x, {SCHEMA}, float lsq_scale, bool delta_grad) "
                 "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")


def _grads_inputs(rest) -> tuple:
    """(weight, lsq_scale, delta_grad) from the grads op's arguments after grad_y and x."""
    return WeightArgs.from_flat(rest[:N_FIELDS]), *rest[N_FIELDS:]


@torch.library.custom_op("qat::quant_linear_grads", mutates_args=(), schema=_GRADS_SCHEMA)
def quant_linear_grads(grad_y, x, *rest):
    return reference_grads(grad_y, x, *_grads_inputs(rest))


@quant_linear_grads.register_fake
def _(grad_y, x, *rest):
    w, _, delta_grad = _grads_inputs(rest)

    def like(t, present):
        return torch.empty_like(t) if present else w.weight_scale.new_empty(0)

    return (
        torch.empty_like(w.weight_scale),
        like(w.weight_zero, w.weight_zero is not None),
        like(w.delta, delta_grad and w.delta is not None and not w.has_lora),
        like(w.lora_a, w.has_lora),
        like(w.lora_b, w.has_lora),
    )


@quant_linear_grads.register_kernel("cuda")
def _(grad_y, x, *rest):
    w, lsq_scale, delta_grad = _grads_inputs(rest)
    if triton_takes(w, grad_y, x) and grads_block_k(w.group_size):
        return launcher("triton_grads", "quant_linear_grads")(grad_y, x, w, lsq_scale, delta_grad)
    return reference_grads(grad_y, x, w, lsq_scale, delta_grad)


# --------------------------------------------------------------------------- fwht
@torch.library.custom_op("qat::fwht", mutates_args=())
def fwht_op(x: torch.Tensor, transpose: bool = False, scale: float = 1.0,
            out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """z = scale * x H_n^T (transpose False) or scale * x H_n, x [..., n], n = K * 2^m."""
    return reference_fwht(x, transpose, scale, out_dtype)  # a fresh tensor: never aliases x


@fwht_op.register_fake
def _(x, transpose=False, scale=1.0, out_dtype=None):
    return x.new_empty(x.shape, dtype=x.dtype if out_dtype is None else out_dtype)


@fwht_op.register_kernel("cuda")
def _(x, transpose=False, scale=1.0, out_dtype=None):
    if triton_available() and floats(x) and out_dtype in (None, *FLOATS) and fwht_tile(x.shape[-1]):
        return launcher("hadamard_kernels", "fwht")(x, transpose, scale, out_dtype)
    return reference_fwht(x, transpose, scale, out_dtype)


def _fwht_setup(ctx, inputs, output):
    x, transpose, scale, _ = inputs
    ctx.transpose, ctx.scale, ctx.x_dtype = transpose, scale, x.dtype


def _fwht_backward(ctx, grad_z):
    """Linear map: dx = scale * dz H (the transposed transform), in x's dtype."""
    return torch.ops.qat.fwht(grad_z, not ctx.transpose, ctx.scale, ctx.x_dtype), None, None, None


fwht_op.register_autograd(_fwht_backward, setup_context=_fwht_setup)


# --------------------------------------------------------------------------- pack / unpack
# The base's int32 words (DESIGN section 3): the reference is qat.packing on every device, the
# CUDA impl the Triton kernels of kernels/packing_kernels.py, bit for bit the same.
@torch.library.custom_op("qat::pack_int32", mutates_args=())
def pack_op(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """codes [rows, n] (integer) -> int32 [rows, ceil(n*b/32)] (dim=1) or
    [ceil(rows*b/32), n] (dim=0)."""
    return packing.pack_int32(codes, bits, dim)


@pack_op.register_fake
def _(codes, bits, dim=1):
    packing.check_bits(bits)
    rows, n = codes.shape
    if dim == 0:
        return codes.new_empty((packing.packed_width(rows, bits), n), dtype=torch.int32)
    return codes.new_empty((rows, packing.packed_width(n, bits)), dtype=torch.int32)


@pack_op.register_kernel("cuda")
def _(codes, bits, dim=1):
    if triton_available() and codes.dtype in PACK_DTYPES:
        return launcher("packing_kernels", "pack_int32")(codes, bits, dim)
    return packing.pack_int32(codes, bits, dim)


@torch.library.custom_op("qat::unpack_int32", mutates_args=())
def unpack_op(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """int32 words -> int8 codes, ``n`` per row (dim=1: [rows, n]) or per column (dim=0:
    [n, cols])."""
    return packing.unpack_int32(packed, bits, n, dim)


@unpack_op.register_fake
def _(packed, bits, n, dim=1):
    packing.check_bits(bits)
    rows, cols = packed.shape
    if (rows if dim == 0 else cols) != packing.packed_width(n, bits):  # as the reference
        raise ValueError(f"packed words {tuple(packed.shape)} do not hold {n} codes of {bits} "
                         f"bits along dim {dim}: the checkpoint is truncated or the shape is wrong")
    if dim == 0:
        return packed.new_empty((n, cols), dtype=torch.int8)
    return packed.new_empty((rows, n), dtype=torch.int8)


@unpack_op.register_kernel("cuda")
def _(packed, bits, n, dim=1):
    if triton_available() and packed.dtype == torch.int32:
        return launcher("packing_kernels", "unpack_int32")(packed, bits, n, dim)
    return packing.unpack_int32(packed, bits, n, dim)
