"""Matryoshka quantization: one int8 model whose most significant bits are themselves int4 / int2 models.

Codes. A layer trained at bits 8 computes signed int8 codes ``q8 = clamp(round(W/s + z), -128, 127)``
(``z`` = 0 when symmetric). Its r-bit slice keeps the top r bits of the unsigned code ``u = q8 + 128``,
rounding to nearest (halves up) rather than truncating (MatQuant's rule), with k = 8 - r:

    u_r = clamp(floor(u / 2^k + 1/2), 0, 2^r - 1)        q_r = u_r - 2^(r-1)   (signed r-bit code)

so ``u_r * 2^k`` approximates ``u`` on the int8 grid. The slice dequantises with the step ``s * 2^k``
and the zero point rounded the same way, ``z_r = clamp(floor((z + 128) / 2^k + 1/2), 0, 2^r - 1) -
2^(r-1)``; symmetric codes have (0 + 128) / 2^k = 2^(r-1) exactly, so z_r = 0 and the slice stays
symmetric. ``W_r = s 2^k (q_r - z_r)`` is then a plain r-bit layer: :func:`slice_model` turns an int8
checkpoint into one, and ``qat export --bits r`` writes it as a packed compressed-tensors export.

Training. ``matryoshka_widths: [8, 4, 2]`` runs every step's forward once per width (:func:`use_width`
sets the width every QuantLinear slices to) and minimises ``sum_r weight_r * loss_r``
(:func:`joint_loss`); the slices' rounding passes gradients straight through (STE), as the int8
rounding does, and LSQ's step gradient flows through ``s 2^k``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

from qat import primitives as P

BASE_BITS = 8  # the width whose codes are sliced
SLICE_WIDTHS = (2, 3, 4, 5, 6, 7, 8)


FROZEN = "frozen_codes"  # the train mode that keeps the int8 codes (and bypasses the slice hook)


def check_widths(widths: Sequence[int] | None, weights: Sequence[float] | None, bits: float,
                 storage_bits: int | None, train_mode: str = "fake_quant") -> None:
    """Refuse a Matryoshka recipe that cannot work, in one sentence, before any model is loaded."""
    if not widths:
        if weights:
            raise ValueError("matryoshka_weights is set without matryoshka_widths: list the widths, e.g. [8, 4, 2]")
        return
    bad = [w for w in widths if w not in SLICE_WIDTHS]
    if bad:
        raise ValueError(f"matryoshka_widths {list(widths)}: {bad} cannot be sliced from int8 codes; use widths "
                         f"among {list(SLICE_WIDTHS)}")
    if len(set(widths)) != len(widths):
        raise ValueError(f"matryoshka_widths {list(widths)} repeats a width: list each width once")
    if bits != BASE_BITS or storage_bits not in (None, BASE_BITS):
        raise ValueError(f"matryoshka_widths slice int8 codes: set bits: 8 (and storage_bits: 8 or null), "
                         f"not bits {bits} / storage_bits {storage_bits}")
    if weights is not None:
        if len(weights) != len(widths):
            raise ValueError(f"matryoshka_weights has {len(weights)} values for {len(widths)} widths: give one "
                             "weight per width")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"matryoshka_weights {list(weights)}: use non-negative weights, not all zero")
    if train_mode == FROZEN:
        raise ValueError("matryoshka_widths train int8 codes whose top bits are good models, and train_mode "
                         "frozen_codes never moves a code (nor computes the slices): set train_mode: fake_quant "
                         "(or full_weight)")


# ------------------------------------------------------------------------------------ integer slicing
def slice_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed int8 codes [out, in] -> their signed ``bits``-bit slice (int8 tensor)."""
    shift = BASE_BITS - bits
    u = codes.to(torch.int32) + (1 << (BASE_BITS - 1))
    u_r = torch.clamp(torch.div(u + ((1 << shift) >> 1), 1 << shift, rounding_mode="floor"), 0, (1 << bits) - 1)
    return (u_r - (1 << (bits - 1))).to(torch.int8)


def slice_zero_point(zero_point: torch.Tensor | None, bits: int) -> torch.Tensor | None:
    """Integer int8 zero points (any dtype holding integers) -> the slice's (float holding integers)."""
    if zero_point is None:
        return None
    shift = BASE_BITS - bits
    uz = torch.round(zero_point.float()) + (1 << (BASE_BITS - 1))
    uz_r = torch.clamp(torch.floor(uz / (1 << shift) + 0.5), 0, (1 << bits) - 1)
    return uz_r - (1 << (bits - 1))


def slice_scale(scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The slice's step: one slice unit is 2^(8 - bits) int8 units (exact: a power of two)."""
    return scale * (1 << (BASE_BITS - bits))


# ------------------------------------------------------------------------------------ training forward
def _round_half_up_ste(x: torch.Tensor) -> torch.Tensor:
    """floor(x + 1/2) forward (the slice's rounding, ties up like the integer rule), identity gradient."""
    return x + (torch.floor(x + 0.5) - x).detach()


def fake_quantize_slice(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int,
                        group_size: int, lsq_scale: float | None = None) -> torch.Tensor:
    """W_r [out, in]: ``w`` rounded to int8 codes with ``scale`` [out, in/g] (as P.fake_quantize does),
    then sliced to ``bits``; differentiable (STE through both roundings, LSQ gradients to the steps)."""
    if lsq_scale is not None:
        scale = P.grad_scale(scale, lsq_scale)
        if zero_point is not None:
            zero_point = P.grad_scale(zero_point, lsq_scale)
    qmin, qmax = P.qrange(BASE_BITS)
    half, unit = 1 << (BASE_BITS - 1), float(1 << (BASE_BITS - bits))
    v = P.scaled(w, scale, group_size)  # [out, G, g]
    if zero_point is None:
        q8 = P.round_ste(torch.clamp(v, qmin, qmax))
        z_r = float(1 << (bits - 1))  # (0 + 128) / 2^k, exact
    else:
        z = torch.clamp(P.round_ste(zero_point), qmin, qmax).unsqueeze(-1).to(v.dtype)
        q8 = P.round_ste(torch.clamp(v + z, qmin, qmax))
        z_r = torch.clamp(torch.floor((z.detach() + half) / unit + 0.5), 0, (1 << bits) - 1)
    u_r = _round_half_up_ste(torch.clamp((q8 + half) / unit, 0, (1 << bits) - 1))
    s = scale.unsqueeze(-1)  # [out, G, 1]
    w_hat = (u_r.to(scale.dtype) - z_r) * (s * unit)
    return w_hat.reshape(w.shape)


def matryoshka_layers(model: nn.Module):
    from qat.surgery import quant_layers

    return [(n, m) for n, m in quant_layers(model) if m.spec.bits == BASE_BITS]


@contextlib.contextmanager
def use_width(model: nn.Module, bits: int):
    """Every int8 QuantLinear of ``model`` computes its ``bits``-bit slice inside the block (8: itself)."""
    layers = [m for _, m in matryoshka_layers(model)]
    if bits != BASE_BITS and any(m.train_mode == FROZEN for m in layers):  # s (q0 - z) from the base: no slice
        raise ValueError("a Matryoshka width needs layers in train_mode fake_quant or full_weight; these are in "
                         "frozen_codes, which would compute the int8 model at every width")
    previous = [getattr(m, "slice_bits", None) for m in layers]
    for m in layers:
        m.slice_bits = None if bits == BASE_BITS else bits
    try:
        yield model
    finally:
        for m, prev in zip(layers, previous):
            m.slice_bits = prev


def width_weights(widths: Sequence[int], weights: Sequence[float] | None) -> list[float]:
    """The widths' loss weights: ``matryoshka_weights`` as given, or 1 each when unset."""
    return [1.0] * len(widths) if weights is None else list(weights)


def joint_loss(model: nn.Module, widths: Sequence[int], weights: Sequence[float] | None,
               loss_at_width: Callable[[], tuple[torch.Tensor, object]]) -> tuple[torch.Tensor, object, dict]:
    """sum_r weight_r * loss_r, loss_r = ``loss_at_width()`` run with the model at width r.

    Returns (joint loss, the widest width's outputs, {width: loss_r detached}). Weights default to 1.
    """
    weights = width_weights(widths, weights)
    total, outputs, per_width = None, None, {}
    for bits, weight in zip(widths, weights):
        with use_width(model, bits):
            loss, out = loss_at_width()
        per_width[bits] = loss.detach()
        total = weight * loss if total is None else total + weight * loss
        if outputs is None or bits == max(widths):
            outputs = out
    return total, outputs, per_width


# ------------------------------------------------------------------------------------ slicing a checkpoint
@torch.no_grad()
def slice_layer(layer, bits: int, name: str = "layer"):
    """A plain ``bits``-bit QuantLinear computing ``layer``'s slice exactly (base = sliced codes)."""
    from qat.config import LayerSpec
    from qat.quant_linear import QuantLinear

    codes, scale, zero = layer.export_codes()  # the int8 codes the layer computes, inside adapter merged
    spec = LayerSpec(bits=bits, group_size=layer.spec.group_size, symmetric=layer.spec.symmetric,
                     storage_bits=bits, init=layer.spec.init)
    bias = None if layer.bias is None else layer.bias.detach()
    out = QuantLinear.from_codes(slice_codes(codes, bits), slice_scale(scale.float(), bits),
                                 slice_zero_point(zero, bits), spec, bias=bias, dtype=layer.scale_dtype, name=name)
    out.source_type = layer.source_type
    return out


def slice_model(model: nn.Module, bits: int) -> nn.Module:
    """Replace every int8 QuantLinear by its ``bits``-bit slice, in place (refused when there is none)."""
    from qat.surgery import quant_layers, set_submodule

    if bits not in SLICE_WIDTHS:
        raise ValueError(f"cannot slice int8 codes to {bits} bits: use one of {list(SLICE_WIDTHS)}")
    layers = matryoshka_layers(model)
    others = sorted({m.spec.bits for _, m in quant_layers(model)} - {BASE_BITS})
    if not layers or others:
        raise ValueError(f"--bits slices int8 checkpoints; this one has {others or 'no'} other-width quantized "
                         "layers: export it without --bits, or train it at bits 8")
    for name, layer in layers:
        set_submodule(model, name, slice_layer(layer, bits, name))
    config = getattr(model, "qat_config", None)
    if config is not None:
        model.qat_config = dataclasses.replace(config, bits=bits, storage_bits=bits, overrides={})
    return model
