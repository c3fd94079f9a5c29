"""``torch.library`` custom ops (namespace ``qat``) for the packed-base quantized linear.

    qat::dequant_fakequant(weight args, lora) -> W_hat [out, in]          (out_dtype)
    qat::quant_codes(weight args, lora) -> codes [out, in] int8            (what export writes)
    qat::quant_linear_fwd(x, weight args, lora) -> y = x @ W_hat^T         (x's dtype, no bias)
    qat::quant_linear_dx(grad_y, weight args, lora) -> dX = grad_y @ W_hat (grad_y's dtype)
    qat::quant_linear_grads(grad_y, x, weight args, lsq_scale, lora_a, lora_b, lora_scaling,
                            delta_grad) -> (d weight_scale, d weight_zero, d delta, d lora_A, d lora_B)
    qat::pack_int32(codes, bits, dim=1) -> int32 words                    (qat.packing's layout)
    qat::unpack_int32(packed, bits, n, dim=1) -> int8 codes

Weight args, in order: ``base_packed`` int32 [out, words], ``base_scale`` [out, G],
``base_zero`` [out, G] or None, ``weight_scale`` [out, G] (already in the layer's scale dtype),
``weight_zero`` [out, G] or None (float, rounded and clamped to the grid here), ``delta``
[out, in] or None (an inside adapter's dense update), ``storage_bits``, ``bits_qmin``,
``bits_qmax`` (the trained grid, so ternary is (-1, 1)), ``group_size``, ``in_features``,
``out_dtype`` (W_hat's dtype, the layer's scale dtype).

LoRA args, in order, optional: ``lora_a`` [r, in], ``lora_b`` [out, r], ``lora_scaling``. An
inside LoRA's update comes either as ``delta`` or as its factors, never both (the grads op
alone takes both: the dense-D path, where the factors only serve dA / dB). From the factors the
reference builds D = (B @ A) * scaling exactly as ``LoRAAdapter.delta_weight``; the Triton
kernels form each [BN, BK] tile of D in registers instead (a fixed fma order over r, see
``triton_kernels._lora_tile``), which may round differently from torch's matmul. That is why
export asks ``qat::quant_codes`` for its codes on the kernel path: they come from the same
in-kernel D as training's W_hat (docs/KERNELS.md, "Exactness").

Every device gets the reference (``qat.primitives`` / ``qat.packing``); CUDA gets the Triton
kernels when triton is importable and the dtypes are supported. The fake implementations give
torch.compile the output shapes. The ops carry no autograd: they are the pieces of
QuantLinear's recomputed backward, which calls ``quant_linear_dx`` for dX and
``quant_linear_grads`` for the step, zero-point and inside-adapter gradients.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from qat import primitives as P
from qat import packing

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


def check_one_delta(delta, lora_a):
    """The weight ops take an inside LoRA's update once: as ``delta`` or as its factors."""
    if delta is not None and lora_a is not None:
        raise ValueError("pass the inside adapter's update once: a dense delta or the LoRA factors")


def _pre_quant(base_packed, base_scale, base_zero, delta, storage_bits, group_size, in_features,
               lora_a=None, lora_b=None, lora_scaling=1.0):
    """W0 + D [out, in] fp32, as ``QuantLinear.pre_quant_weight``: D is ``delta``, else
    (B @ A) * scaling from the LoRA factors (``LoRAAdapter.delta_weight``), else 0."""
    codes = packing.unpack_int32(base_packed, storage_bits, in_features)
    w = P.dequantize(codes, base_scale, base_zero, storage_bits, group_size)
    if delta is None and lora_a is not None:
        delta = (lora_b @ lora_a) * lora_scaling
    return w if delta is None else w + delta.float()


def _quantizer_input(base_packed, base_scale, base_zero, delta, storage_bits, bits_qmin, bits_qmax,
                     group_size, in_features, lora_a, lora_b, lora_scaling):
    """(W0 + D [out, in] fp32, the trained grid's ``bits``): what both W_hat and the codes round."""
    check_one_delta(delta, lora_a)
    w = _pre_quant(base_packed, base_scale, base_zero, delta, storage_bits, group_size, in_features,
                   lora_a, lora_b, lora_scaling)
    return w, bits_from_range(bits_qmin, bits_qmax)


@torch.no_grad()
def reference_w_hat(base_packed, base_scale, base_zero, weight_scale, weight_zero, delta,
                    storage_bits, bits_qmin, bits_qmax, group_size, in_features, out_dtype,
                    lora_a=None, lora_b=None, lora_scaling=1.0):
    """W_hat exactly as ``QuantLinear.dense_weight`` computes it, through ``qat.primitives``."""
    w, bits = _quantizer_input(base_packed, base_scale, base_zero, delta, storage_bits, bits_qmin,
                               bits_qmax, group_size, in_features, lora_a, lora_b, lora_scaling)
    return P.fake_quantize(w, weight_scale, weight_zero, bits, group_size).to(out_dtype)


@torch.no_grad()
def reference_codes(base_packed, base_scale, base_zero, weight_scale, weight_zero, delta,
                    storage_bits, bits_qmin, bits_qmax, group_size, in_features, out_dtype,
                    lora_a=None, lora_b=None, lora_scaling=1.0):
    """Codes [out, in] int8 exactly as ``QuantLinear.export_codes`` computes them in torch."""
    w, bits = _quantizer_input(base_packed, base_scale, base_zero, delta, storage_bits, bits_qmin,
                               bits_qmax, group_size, in_features, lora_a, lora_b, lora_scaling)
    return P.quantize_codes(w, weight_scale, weight_zero, bits, group_size)


@torch.no_grad()
def reference_grads(grad_y, x, base_packed, base_scale, base_zero, weight_scale, weight_zero, delta,
                    storage_bits, bits_qmin, bits_qmax, group_size, in_features, out_dtype,
                    lsq_scale, lora_a, lora_b, lora_scaling, delta_grad):
    """The backward of QuantLinear's recomputed linear, for ``qat::quant_linear_grads``:
    G = grad_y^T x (``P.linear_weight_grad``, fp32) through ``P.fake_quantize_backward``.

    An op's implementation runs below autograd, so this spells the gradients out instead of
    differentiating ``fake_quantize``; the tests check the two agree. Returns (grad
    weight_scale [out, G], grad weight_zero [out, G], grad delta [out, in], grad lora_A [r, in],
    grad lora_B [out, r]), each in its input's dtype; an empty [0] tensor for those not asked
    for (no zero point; ``delta_grad`` False; no LoRA factors). With LoRA factors,
    D = (B @ A) * lora_scaling (``LoRAAdapter.delta_weight``): built here when ``delta`` is
    None, else ``delta`` must be it.
    """
    def empty():  # a fresh [0] tensor per unused output (op outputs may not alias each other)
        return weight_scale.new_empty(0)

    w = _pre_quant(base_packed, base_scale, base_zero, delta, storage_bits, group_size, in_features,
                   lora_a, lora_b, lora_scaling)
    acc = torch.promote_types(torch.float32, weight_scale.dtype)     # fp32 (fp64 for fp64 steps)
    grad_w = P.linear_weight_grad(grad_y, x, acc)                    # G [out, in]
    bits = bits_from_range(bits_qmin, bits_qmax)
    d_w, d_scale, d_zero = P.fake_quantize_backward(w, weight_scale, weight_zero, bits, group_size,
                                                    grad_w, lsq_scale)
    grad_zero = empty() if weight_zero is None else d_zero.to(weight_zero.dtype)
    grad_delta, grad_a, grad_b = empty(), empty(), empty()
    if lora_a is not None:
        d_w = d_w * lora_scaling                                     # dL/d(B A), [out, in]
        grad_a = (lora_b.to(acc).t() @ d_w).to(lora_a.dtype)         # [r, in]
        grad_b = (d_w @ lora_a.to(acc).t()).to(lora_b.dtype)         # [out, r]
    elif delta_grad and delta is not None:
        grad_delta = d_w.to(delta.dtype)
    return d_scale.to(weight_scale.dtype), grad_zero, grad_delta, grad_a, grad_b


def _triton_ok(*tensors) -> bool:
    from qat.kernels.dispatch import triton_available

    return triton_available() and all(t is None or t.dtype in _FLOATS for t in tensors)


# --------------------------------------------------------------------------- weight-only ops
# The weight args and LoRA args of every op below, as one schema (see the module docstring).
def _weight_op(name: str, reference):
    """A ``torch.library`` op ``qat::name(weight args, lora args)`` on the weight alone:
    the reference on every device, the Triton launcher of the same name on CUDA."""

    @torch.library.custom_op(f"qat::{name}", mutates_args=())
    def op(
        base_packed: torch.Tensor, base_scale: torch.Tensor, base_zero: Optional[torch.Tensor],
        weight_scale: torch.Tensor, weight_zero: Optional[torch.Tensor], delta: Optional[torch.Tensor],
        storage_bits: int, bits_qmin: int, bits_qmax: int, group_size: int, in_features: int,
        out_dtype: torch.dtype, lora_a: Optional[torch.Tensor] = None,
        lora_b: Optional[torch.Tensor] = None, lora_scaling: float = 1.0,
    ) -> torch.Tensor:
        return reference(base_packed, base_scale, base_zero, weight_scale, weight_zero, delta,
                         storage_bits, bits_qmin, bits_qmax, group_size, in_features, out_dtype,
                         lora_a, lora_b, lora_scaling)

    @op.register_kernel("cuda")
    def _(*args):
        if _triton_weight_ok(args):
            from qat.kernels import triton_kernels as TK

            return getattr(TK, name)(*args)
        return reference(*args)

    return op


def _triton_weight_ok(weight) -> bool:
    """Whether the Triton kernels take these weight (+ LoRA) args: float steps, delta, factors
    and output dtype."""
    base_scale, weight_scale, delta, out_dtype = weight[1], weight[3], weight[5], weight[11]
    lora = tuple(weight[12:14])
    return _triton_ok(base_scale, weight_scale, delta, *lora) and out_dtype in _FLOATS


dequant_fakequant = _weight_op("dequant_fakequant", reference_w_hat)
quant_codes = _weight_op("quant_codes", reference_codes)


@dequant_fakequant.register_fake
def _(base_packed, base_scale, base_zero, weight_scale, weight_zero, delta, storage_bits, bits_qmin,
      bits_qmax, group_size, in_features, out_dtype, lora_a=None, lora_b=None, lora_scaling=1.0):
    return base_packed.new_empty((base_packed.shape[0], in_features), dtype=out_dtype)


@quant_codes.register_fake
def _(base_packed, base_scale, base_zero, weight_scale, weight_zero, delta, storage_bits, bits_qmin,
      bits_qmax, group_size, in_features, out_dtype, lora_a=None, lora_b=None, lora_scaling=1.0):
    return base_packed.new_empty((base_packed.shape[0], in_features), dtype=torch.int8)


# --------------------------------------------------------------------------- quant_linear_fwd
@torch.library.custom_op("qat::quant_linear_fwd", mutates_args=())
def quant_linear_fwd(
    x: torch.Tensor,
    base_packed: torch.Tensor, base_scale: torch.Tensor, base_zero: Optional[torch.Tensor],
    weight_scale: torch.Tensor, weight_zero: Optional[torch.Tensor], delta: Optional[torch.Tensor],
    storage_bits: int, bits_qmin: int, bits_qmax: int, group_size: int, in_features: int,
    out_dtype: torch.dtype, lora_a: Optional[torch.Tensor] = None,
    lora_b: Optional[torch.Tensor] = None, lora_scaling: float = 1.0,
) -> torch.Tensor:
    w_hat = reference_w_hat(base_packed, base_scale, base_zero, weight_scale, weight_zero, delta,
                            storage_bits, bits_qmin, bits_qmax, group_size, in_features, out_dtype,
                            lora_a, lora_b, lora_scaling)
    return F.linear(x, w_hat.to(x.dtype))


@quant_linear_fwd.register_fake
def _(x, base_packed, *rest):
    return x.new_empty((*x.shape[:-1], base_packed.shape[0]))


@quant_linear_fwd.register_kernel("cuda")
def _(x, *weight):
    if _triton_ok(x) and _triton_weight_ok(weight):
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
    out_dtype: torch.dtype, lora_a: Optional[torch.Tensor] = None,
    lora_b: Optional[torch.Tensor] = None, lora_scaling: float = 1.0,
) -> torch.Tensor:
    w_hat = reference_w_hat(base_packed, base_scale, base_zero, weight_scale, weight_zero, delta,
                            storage_bits, bits_qmin, bits_qmax, group_size, in_features, out_dtype,
                            lora_a, lora_b, lora_scaling)
    return grad_y @ w_hat.to(grad_y.dtype)


@quant_linear_dx.register_fake
def _(grad_y, base_packed, *rest):
    in_features = rest[9]
    return grad_y.new_empty((*grad_y.shape[:-1], in_features))


@quant_linear_dx.register_kernel("cuda")
def _(grad_y, *weight):
    if _triton_ok(grad_y) and _triton_weight_ok(weight):
        from qat.kernels import triton_kernels as TK

        return TK.quant_linear_dx(grad_y, *weight)
    return grad_y @ reference_w_hat(*weight).to(grad_y.dtype)


# --------------------------------------------------------------------------- quant_linear_grads
@torch.library.custom_op("qat::quant_linear_grads", mutates_args=())
def quant_linear_grads(
    grad_y: torch.Tensor, x: torch.Tensor,
    base_packed: torch.Tensor, base_scale: torch.Tensor, base_zero: Optional[torch.Tensor],
    weight_scale: torch.Tensor, weight_zero: Optional[torch.Tensor], delta: Optional[torch.Tensor],
    storage_bits: int, bits_qmin: int, bits_qmax: int, group_size: int, in_features: int,
    out_dtype: torch.dtype, lsq_scale: float, lora_a: Optional[torch.Tensor],
    lora_b: Optional[torch.Tensor], lora_scaling: float, delta_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return reference_grads(grad_y, x, base_packed, base_scale, base_zero, weight_scale, weight_zero,
                           delta, storage_bits, bits_qmin, bits_qmax, group_size, in_features,
                           out_dtype, lsq_scale, lora_a, lora_b, lora_scaling, delta_grad)


@quant_linear_grads.register_fake
def _(grad_y, x, base_packed, base_scale, base_zero, weight_scale, weight_zero, delta, storage_bits,
      bits_qmin, bits_qmax, group_size, in_features, out_dtype, lsq_scale, lora_a, lora_b,
      lora_scaling, delta_grad):
    lora = lora_a is not None

    def like(t, present):
        return torch.empty_like(t) if present else weight_scale.new_empty(0)

    return (
        torch.empty_like(weight_scale),
        like(weight_zero, weight_zero is not None),
        like(delta, delta_grad and delta is not None and not lora),
        like(lora_a, lora),
        like(lora_b, lora),
    )


@quant_linear_grads.register_kernel("cuda")
def _(grad_y, x, *rest):
    weight, extra = rest[:12], rest[12:]
    if _triton_ok(grad_y, x, extra[1], extra[2]) and _triton_weight_ok(weight):
        from qat.kernels import triton_kernels as TK

        if TK.grads_block_k(weight[9]):
            return TK.quant_linear_grads(grad_y, x, *weight, *extra)
    return reference_grads(grad_y, x, *weight, *extra)


# --------------------------------------------------------------------------- fwht
def reference_fwht(x: torch.Tensor, transpose: bool = False, scale: float = 1.0,
                   out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """scale * x H_n^T (or scale * x H_n) through ``qat.adapters.hadamard.fwht``, computed in
    fp32 (fp64 for fp64 inputs), then cast to ``out_dtype`` (default x's). Differentiable."""
    from qat.adapters.hadamard import fwht as torch_fwht

    z = torch_fwht(x.to(torch.promote_types(x.dtype, torch.float32)), transpose)
    if scale != 1.0:
        z = z * scale
    return z.to(x.dtype if out_dtype is None else out_dtype)


@torch.library.custom_op("qat::fwht", mutates_args=())
def fwht(x: torch.Tensor, transpose: bool = False, scale: float = 1.0,
         out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """z = scale * x H_n^T (transpose False) or scale * x H_n, x [..., n], n = K * 2^m."""
    return reference_fwht(x, transpose, scale, out_dtype)  # a fresh tensor: never aliases x


@fwht.register_fake
def _(x, transpose=False, scale=1.0, out_dtype=None):
    return x.new_empty(x.shape, dtype=x.dtype if out_dtype is None else out_dtype)


@fwht.register_kernel("cuda")
def _(x, transpose=False, scale=1.0, out_dtype=None):
    from qat.kernels.dispatch import fwht_tile

    if _triton_ok(x) and (out_dtype is None or out_dtype in _FLOATS) and fwht_tile(x.shape[-1]):
        from qat.kernels import hadamard_kernels as HK

        return HK.fwht(x, transpose, scale, out_dtype)
    return reference_fwht(x, transpose, scale, out_dtype)


def _fwht_setup(ctx, inputs, output):
    x, transpose, scale, _ = inputs
    ctx.transpose, ctx.scale, ctx.x_dtype = transpose, scale, x.dtype


def _fwht_backward(ctx, grad_z):
    """Linear map: dx = scale * dz H (the transposed transform), in x's dtype."""
    return torch.ops.qat.fwht(grad_z, not ctx.transpose, ctx.scale, ctx.x_dtype), None, None, None


fwht.register_autograd(_fwht_backward, setup_context=_fwht_setup)


# --------------------------------------------------------------------------- pack / unpack
# The base's int32 words (DESIGN section 3): the reference is qat.packing on every device, the
# CUDA impl the Triton kernels of kernels/packing_kernels.py, bit for bit the same.
@torch.library.custom_op("qat::pack_int32", mutates_args=())
def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """codes [rows, n] (integer) -> int32 [rows, ceil(n*b/32)] (dim=1) or
    [ceil(rows*b/32), n] (dim=0)."""
    return packing.pack_int32(codes, bits, dim)


@pack_int32.register_fake
def _(codes, bits, dim=1):
    packing._check_bits(bits)
    rows, n = codes.shape
    if dim == 0:
        return codes.new_empty((packing.packed_width(rows, bits), n), dtype=torch.int32)
    return codes.new_empty((rows, packing.packed_width(n, bits)), dtype=torch.int32)


@pack_int32.register_kernel("cuda")
def _(codes, bits, dim=1):
    from qat.kernels.dispatch import PACK_DTYPES, triton_available

    if triton_available() and codes.dtype in PACK_DTYPES:
        from qat.kernels import packing_kernels as PK

        return PK.pack_int32(codes, bits, dim)
    return packing.pack_int32(codes, bits, dim)


@torch.library.custom_op("qat::unpack_int32", mutates_args=())
def unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """int32 words -> int8 codes, ``n`` per row (dim=1: [rows, n]) or per column (dim=0:
    [n, cols])."""
    return packing.unpack_int32(packed, bits, n, dim)


@unpack_int32.register_fake
def _(packed, bits, n, dim=1):
    packing._check_bits(bits)
    rows, cols = packed.shape
    if (rows if dim == 0 else cols) != packing.packed_width(n, bits):  # as the reference
        raise ValueError(f"packed words {tuple(packed.shape)} do not hold {n} codes of {bits} "
                         f"bits along dim {dim}: the checkpoint is truncated or the shape is wrong")
    if dim == 0:
        return packed.new_empty((n, cols), dtype=torch.int8)
    return packed.new_empty((rows, n), dtype=torch.int8)


@unpack_int32.register_kernel("cuda")
def _(packed, bits, n, dim=1):
    from qat.kernels.dispatch import triton_available

    if triton_available() and packed.dtype == torch.int32:
        from qat.kernels import packing_kernels as PK

        return PK.unpack_int32(packed, bits, n, dim)
    return packing.unpack_int32(packed, bits, n, dim)
