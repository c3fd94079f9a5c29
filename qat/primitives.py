"""Reference quantization math in pure torch.

Everything else in qat (QuantLinear, the exporter, the Triton kernels) is tested against the
functions in this file. Conventions (compressed-tensors "int" weights, DESIGN section 3):

    codes      q = round(clamp(w / s + z, qmin, qmax))      signed grid, z an integer zero point
    dequant    w_hat = (q - z) * s                          computed in the dtype of s

Weights are 2-D ``[out, in]``; steps and zero points are ``[out, n_groups]`` with the groups
running along the input dimension (``group_size == in`` is per-channel).
"""

from __future__ import annotations

import math

import torch

TERNARY = 1.58
SUPPORTED_BITS = (TERNARY, 2, 3, 4, 5, 6, 7, 8)
MSE_RATIOS = 40  # clipping ratios tried by the MSE step search


def check_bits(bits: float) -> float:
    """Return ``bits`` normalised (ints stay ints) or raise naming the widths that work."""
    if isinstance(bits, str):
        try:
            bits = float(bits)
        except ValueError:
            raise ValueError(f"bit width {bits!r} is not a number: use one of 2, 3, 4, 5, 6, 7, 8 or 1.58 "
                             "(ternary)") from None
    if abs(float(bits) - TERNARY) < 1e-6:
        return TERNARY
    if float(bits).is_integer() and int(bits) in SUPPORTED_BITS:
        return int(bits)
    raise ValueError(
        f"unsupported bit width {bits!r}: use one of 2, 3, 4, 5, 6, 7, 8 or 1.58 (ternary)"
    )


def is_ternary(bits: float) -> bool:
    return bits == TERNARY


def container_bits(bits: float) -> int:
    """Integer width the codes are stored at (ternary codes {-1, 0, 1} live in int2)."""
    return 2 if is_ternary(bits) else int(bits)


def qrange(bits: float) -> tuple[int, int]:
    """Signed integer grid ``(qmin, qmax)``: LSQ's ``(-Qn, Qp)`` with Qn = 2^(b-1), Qp = Qn - 1."""
    if is_ternary(bits):
        return -1, 1
    half = 1 << (int(bits) - 1)
    return -half, half - 1


def lsq_grad_scale(group_numel: int, bits: float) -> float:
    """LSQ gradient scale g = 1 / sqrt(N * Qp), N = elements sharing one step."""
    return 1.0 / math.sqrt(group_numel * qrange(bits)[1])


class _RoundSTE(torch.autograd.Function):
    """round() whose gradient is the identity (straight-through estimator).

    A Function rather than ``x + (x.round() - x).detach()``: that expression can be off by one
    ulp from the rounded value, and the exporter must see exactly the codes the forward used.
    """

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _GradScale(torch.autograd.Function):
    """Identity in forward, gradient multiplied by ``scale`` in backward (LSQ's g)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return _RoundSTE.apply(x)


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _GradScale.apply(x, scale)


def check_group_size(in_features: int, group_size: int | None, name: str = "layer") -> int:
    """Resolve ``group_size`` (None / -1 / 0 = per-channel) or raise with the sizes that work."""
    if group_size is None or group_size <= 0:
        return in_features
    if in_features % group_size != 0:
        divisors = [g for g in (16, 32, 64, 128, 256) if in_features % g == 0]
        hint = f"group sizes that divide it: {divisors}" if divisors else "no power-of-two group size divides it"
        raise ValueError(
            f"group size {group_size} does not divide {name}'s input width {in_features} ({hint}); "
            f"pick one of those, use per-channel steps (group_size=-1), or exclude the layer"
        )
    return group_size


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, in/g, g] (a view)."""
    out_features, in_features = w.shape
    return w.reshape(out_features, in_features // group_size, group_size)


def scaled(w: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """w / s per group, [out, G, g], in fp32 (fp64 when the steps are fp64)."""
    wg = grouped(w, group_size).to(scale.dtype if scale.dtype == torch.float64 else torch.float32)
    return wg / scale.unsqueeze(-1).to(wg.dtype)


def fake_quantize(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: float,
    group_size: int,
    lsq_scale: float | None = None,
) -> torch.Tensor:
    """Differentiable quantize-dequantize of ``w`` [out, in] with steps ``scale`` [out, in/g].

    Gradients: w gets the STE (1 inside the grid, 0 where clamped); scale gets LSQ's
    ``round(w/s) - w/s`` inside and ``qmin - z`` / ``qmax - z`` where clamped, times
    ``lsq_scale``; the zero point gets LSQ+'s (0 inside, -s where clamped). Output dtype is
    ``scale``'s, like compressed-tensors' dequantize.
    """
    qmin, qmax = qrange(bits)
    if lsq_scale is not None:
        scale = grad_scale(scale, lsq_scale)
        if zero_point is not None:
            zero_point = grad_scale(zero_point, lsq_scale)
    s = scale.unsqueeze(-1)  # [out, G, 1]
    v = scaled(w, scale, group_size)
    # Clamp before rounding, as LSQ defines it: the same values as round-then-clamp (integer
    # bounds), but the step gradient is Qp (not Qp - v) on [Qp, Qp + 0.5).
    if zero_point is not None:
        z = torch.clamp(round_ste(zero_point), qmin, qmax).unsqueeze(-1).to(v.dtype)
        q = round_ste(torch.clamp(v + z, qmin, qmax))
        w_hat = (q.to(scale.dtype) - z.to(scale.dtype)) * s
    else:
        q = round_ste(torch.clamp(v, qmin, qmax))
        w_hat = q.to(scale.dtype) * s
    return w_hat.reshape(w.shape)


def fake_quantize_backward(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: float,
    group_size: int,
    grad: torch.Tensor,
    lsq_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The gradients autograd takes through :func:`fake_quantize`, spelled out (for code that
    cannot run autograd, e.g. a ``torch.library`` op's reference implementation).

    ``grad`` = dL/dW_hat [out, in]. With v = w / s (fp32, as the forward), z the rounded,
    clamped zero point, inside = qmin <= v + z <= qmax and q = round(clamp(v + z)):

        dw = grad * inside                                                  (STE)
        ds = g * sum_group grad * ((q - z) - inside * v)                    (LSQ)
        dz = g * [round(z) on the grid] * sum_group -s * grad * (1 - inside)  (LSQ+)

    g = ``lsq_scale`` (1 if None). The masks and codes come from the forward's own v; products
    and sums run in ``grad``'s dtype, at least fp32 (pass fp64 for a float64 evaluation).
    Returns (dw [out, in], ds [out, G], dz [out, G] or None) in that dtype.
    """
    qmin, qmax = qrange(bits)
    v = scaled(w, scale, group_size)                               # [out, G, g], the forward's
    ct = torch.promote_types(grad.dtype, v.dtype)
    gg = grouped(grad, group_size).to(ct)
    z = 0.0
    if zero_point is not None:
        z = round_zero_point(zero_point, bits).unsqueeze(-1).to(v.dtype)
    inside = ((v + z) >= qmin) & ((v + z) <= qmax)                   # clamp passes its bounds
    q = torch.round(torch.clamp(v + z, qmin, qmax))
    g = 1.0 if lsq_scale is None else lsq_scale
    dw = torch.where(inside, gg, 0.0).reshape(w.shape)
    ds = g * (gg * ((q - z).to(ct) - torch.where(inside, v, 0.0).to(ct))).sum(-1)
    dz = None
    if zero_point is not None:
        rz = torch.round(zero_point)
        on_grid = (rz >= qmin) & (rz <= qmax)                        # the clamp(round(z)) mask
        clamped = torch.where(inside, 0.0, -gg).sum(-1) * scale.to(ct)
        dz = torch.where(on_grid, g * clamped, 0.0)
    return dw, ds, dz


def linear_weight_grad(grad_y: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dL/dW [out, in] of ``y = x W^T``: grad_y [..., out]^T @ x [..., in] over all leading dims,
    multiplied in grad_y's dtype (x is cast to it), then cast to ``dtype`` (W's)."""
    g2 = grad_y.reshape(-1, grad_y.shape[-1])
    x2 = x.reshape(-1, x.shape[-1]).to(g2.dtype)
    return (g2.t() @ x2).to(dtype)


@torch.no_grad()
def quantize_codes(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: float,
    group_size: int,
) -> torch.Tensor:
    """Integer codes [out, in] (int8) that :func:`fake_quantize` rounds ``w`` to, bit for bit."""
    qmin, qmax = qrange(bits)
    v = scaled(w, scale, group_size)
    if zero_point is not None:
        v = v + round_zero_point(zero_point, bits).unsqueeze(-1).to(v.dtype)
    # Same operation order as fake_quantize (add z, clamp, round) so ties round identically.
    return torch.round(torch.clamp(v, qmin, qmax)).to(torch.int8).reshape(w.shape)


def round_zero_point(zero_point: torch.Tensor, bits: float) -> torch.Tensor:
    """The integer zero point a float (learned) one stands for: round, then clamp to the grid."""
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(zero_point), qmin, qmax)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: float,
    group_size: int,
) -> torch.Tensor:
    """``(q - z) * s`` in ``scale``'s dtype; ``codes`` [out, in] int, scale [out, in/g]."""
    q = grouped(codes, group_size).to(scale.dtype)
    if zero_point is not None:
        q = q - round_zero_point(zero_point, bits).to(scale.dtype).unsqueeze(-1)
    return (q * scale.unsqueeze(-1)).reshape(codes.shape)


def dequantize_frozen_codes(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bits: float,
    group_size: int,
) -> torch.Tensor:
    """``(q - z) * s`` with the codes ``q`` [out, in] held fixed, differentiable w.r.t. the steps
    (and the zero point, through a straight-through round): EfficientQAT's E2E-QP weight.

    Gradients: ds = sum_group grad * (q - z); dz = -s * sum_group grad where round(z) lies on the
    grid (the STE passes the clamp's inside). Moving s or z never changes a code. Output dtype is
    ``scale``'s, like :func:`dequantize` (the same numbers, bit for bit).
    """
    qmin, qmax = qrange(bits)
    q = grouped(codes, group_size).to(scale.dtype)                   # [out, G, g]
    if zero_point is not None:
        z = torch.clamp(round_ste(zero_point), qmin, qmax).to(scale.dtype)
        q = q - z.unsqueeze(-1)
    return (q * scale.unsqueeze(-1)).reshape(codes.shape)


@torch.no_grad()
def init_absmax(
    w: torch.Tensor, bits: float, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest steps from the group range (absmean for ternary, as BitNet b1.58).

    Symmetric: s = max|w| / ((qmax - qmin) / 2), no zero point.
    Asymmetric: s = (max - min) / (qmax - qmin), z = qmin - round(min / s), range holding 0.
    Returns fp32 ``scale`` [out, G] and ``zero_point`` [out, G] (float holding integers) or None.
    """
    wg = grouped(w.float(), group_size)
    tiny = torch.finfo(torch.float32).tiny * 1e6
    qmin, qmax = qrange(bits)
    if is_ternary(bits):
        if not symmetric:
            raise ValueError("ternary (1.58-bit) weights are symmetric: set symmetric=True")
        return wg.abs().mean(-1).clamp_min(tiny), None
    if symmetric:
        return (wg.abs().amax(-1) / ((qmax - qmin) / 2)).clamp_min(tiny), None
    lo = wg.amin(-1).clamp_max(0)
    hi = wg.amax(-1).clamp_min(0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(tiny)
    zero = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero


@torch.no_grad()
def init_mse(
    w: torch.Tensor, bits: float, group_size: int, symmetric: bool, ratios: int = MSE_RATIOS
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Steps minimising each group's squared error over clipping ratios in [1.0, 0.2].

    The absmax (or absmean, ternary) range is shrunk by each ratio; every group keeps its best.
    For ternary the search runs over [0.5, 2.0] x absmean, since absmean is not a clip bound.
    """
    base_scale, base_zero = init_absmax(w, bits, group_size, symmetric)
    wg = grouped(w.float(), group_size)
    qmin, qmax = qrange(bits)
    best_err = torch.full(base_scale.shape, float("inf"), device=w.device)
    best_scale, best_zero = base_scale.clone(), None if base_zero is None else base_zero.clone()
    grid = torch.linspace(0.5, 2.0, ratios) if is_ternary(bits) else torch.linspace(1.0, 0.2, ratios)
    lo = wg.amin(-1).clamp_max(0)
    hi = wg.amax(-1).clamp_min(0)
    for ratio in grid.tolist():
        if symmetric:
            scale, zero = base_scale * ratio, None
        else:
            scale = ((hi - lo) * ratio / (qmax - qmin)).clamp_min(torch.finfo(torch.float32).tiny * 1e6)
            zero = torch.clamp(qmin - torch.round(lo * ratio / scale), qmin, qmax)
        err = (fake_quantize(w.float(), scale, zero, bits, group_size) - w.float())
        err = grouped(err, group_size).pow(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def init_steps(
    w: torch.Tensor, bits: float, group_size: int, symmetric: bool, method: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if method == "rtn":
        return init_absmax(w, bits, group_size, symmetric)
    if method == "mse":
        return init_mse(w, bits, group_size, symmetric)
    raise ValueError(f"unknown step initialisation {method!r}: use 'rtn' (absmax) or 'mse'")
