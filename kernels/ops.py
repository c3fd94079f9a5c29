"""``torch.library`` custom ops (namespace ``qat``) for the packed-base quantized linear.

    qat::dequant_fakequant(weight args) -> W_hat [out, in]          (out_dtype)
    qat::quant_linear_fwd(x, weight args) -> y = x @ W_hat^T         (x's dtype, no bias)
    qat::quant_linear_dx(grad_y, weight args) -> dX = grad_y @ W_hat (grad_y's dtype)

Weight args, in order: ``base_packed`` int32 [out, words], ``base_scale`` [out, G],
``base_zero`` [out, G] or None, ``weight_scale`` [out, G] (already in the layer's scale dtype),
``weight_zero`` [out, G] or None (float, rounded and clamped to the grid here), ``delta``
[out, in] or None (an inside adapter's dense update), ``storage_bits``, ``bits_qmin``,
``bits_qmax`` (the trained grid, so ternary is (-1, 1)), ``group_size``, ``in_features``,
``out_dtype`` (W_hat's dtype, the layer's scale dtype).

Every device gets the reference (``qat.primitives`` / ``qat.packing``); CUDA gets the Triton
kernels when triton is importable and the dtypes are supported. The fake implementations give
torch.compile the output shapes. The ops carry no autograd: QuantLinear's recomputed backward
calls ``quant_linear_dx`` for dX and differentiates the reference W_hat for the steps.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from qat import primitives as P
from qat.packing import unpack_int32

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- reference math
def bits_from_range(qmin: int, qmax: int) -> float:
    """The ``bits`` whose signed grid is ``(qmin, qmax)`` (1.58 for ternary's (-1, 1))."""
    if (qmin, qmax) == (-1, 1):
        return P.TERNARY
    bits = (qmax - qmin + 1).bit_length() - 1
    if P.qrange(bits) != (qmin, qmax):
        raise ValueError(f"({qmin}, {qmax}) is not a signed b-bit grid (-2^(b-1), 2^(b-1) - 1)")
    return bits


@torch.no_grad()
def reference_w_hat(base_packed, base_scale, base_zero, weight_scale, weight_zero, delta,
                    storage_bits, bits_qmin, bits_qmax, group_size, in_features, out_dtype):
    """W_hat exactly as ``QuantLinear.dense_weight`` computes it, through ``qat.primitives``."""
    codes = unpack_int32(base_packed, storage_bits, in_features)
    w = P.dequantize(codes, base_scale, base_zero, storage_bits, group_size)
    if delta is not None:
        w = w + delta.float()
    bits = bits_from_range(bits_qmin, bits_qmax)
    return P.fake_quantize(w, weight_scale, weight_zero, bits, group_size).to(out_dtype)


def _triton_ok(*tensors) -> bool:
    from qat.kernels.dispatch import triton_available

    return triton_available() and all(t is None or t.dtype in _FLOATS for t in tensors)


# --------------------------------------------------------------------------- dequant_fakequant
@torch.library.custom_op("qat::dequant_fakequant", mutates_args=())
def dequant_fakequant(
    base_packed: torch.Tensor, base_scale: torch.Tensor, base_zero: Optional[torch.Tensor],
    weight_scale: torch.Tensor, weight_zero: Optional[torch.Tensor], delta: Optional[torch.Tensor],
    storage_bits: int, bits_qmin: int, bits_qmax: int, group_size: int, in_features: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return reference_w_hat(base_packed, base_scale, base_zero, weight_scale, weight_zero, delta,
                           storage_bits, bits_qmin, bits_qmax, group_size, in_features, out_dtype)


@dequant_fakequant.register_fake
def _(base_packed, base_scale, base_zero, weight_scale, weight_zero, delta, storage_bits, bits_qmin,
      bits_qmax, group_size, in_features, out_dtype):
    return base_packed.new_empty((base_packed.shape[0], in_features), dtype=out_dtype)


@dequant_fakequant.register_kernel("cuda")
def _(base_packed, base_scale, base_zero, weight_scale, weight_zero, delta, storage_bits, bits_qmin,
      bits_qmax, group_size, in_features, out_dtype):
    args = (base_packed, base_scale, base_zero, weight_scale, weight_zero, delta, storage_bits,
            bits_qmin, bits_qmax, group_size, in_features, out_dtype)
    if _triton_ok(base_scale, weight_scale, delta) and out_dtype in _FLOATS:
        from qat.kernels import triton_kernels as TK

        return TK.dequant_fakequant(*args)
    return reference_w_hat(*args)


# --------------------------------------------------------------------------- quant_linear_fwd
@torch.library.custom_op("qat::quant_linear_fwd", mutates_args=())
def quant_linear_fwd(
    x: torch.Tensor,
    base_packed: torch.Tensor, base_scale: torch.Tensor, base_zero: Optional[torch.Tensor],
    weight_scale: torch.Tensor, weight_zero: Optional[torch.Tensor], delta: Optional[torch.Tensor],
    storage_bits: int, bits_qmin: int, bits_qmax: int, group_size: int, in_features: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    w_hat = reference_w_hat(base_packed, base_scale, base_zero, weight_scale, weight_zero, delta,
                            storage_bits, bits_qmin, bits_qmax, group_size, in_features, out_dtype)
    return F.linear(x, w_hat.to(x.dtype))


@quant_linear_fwd.register_fake
def _(x, base_packed, *rest):
    return x.new_empty((*x.shape[:-1], base_packed.shape[0]))


@quant_linear_fwd.register_kernel("cuda")
def _(x, *weight):
    if _triton_ok(x, weight[1], weight[3], weight[5]) and weight[-1] in _FLOATS:
        from qat.kernels import triton_kernels as TK

        return TK.quant_linear_fwd(x, *weight)
    return F.linear(x, reference_w_hat(*weight).to(x.dtype))


# --------------------------------------------------------------------------- quant_linear_dx
@torch.library.custom_op("qat::quant_linear_dx", mutates_args=())
def quant_linear_dx(
    grad_y: torch.Tensor,
    base_packed: torch.Tensor, base_scale: torch.Tensor, base_zero: Optional[torch.Tensor],
    weight_scale: torch.Tensor, weight_zero: Optional[torch.Tensor], delta: Optional[torch.Tensor],
    storage_bits: int, bits_qmin: int, bits_qmax: int, group_size: int, in_features: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    w_hat = reference_w_hat(base_packed, base_scale, base_zero, weight_scale, weight_zero, delta,
                            storage_bits, bits_qmin, bits_qmax, group_size, in_features, out_dtype)
    return grad_y @ w_hat.to(grad_y.dtype)


@quant_linear_dx.register_fake
def _(grad_y, base_packed, *rest):
    in_features = rest[-2]
    return grad_y.new_empty((*grad_y.shape[:-1], in_features))


@quant_linear_dx.register_kernel("cuda")
def _(grad_y, *weight):
    if _triton_ok(grad_y, weight[1], weight[3], weight[5]) and weight[-1] in _FLOATS:
        from qat.kernels import triton_kernels as TK

        return TK.quant_linear_dx(grad_y, *weight)
    return grad_y @ reference_w_hat(*weight).to(grad_y.dtype)
