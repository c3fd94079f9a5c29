"""Zeroth-order training: SPSA with the seed trick (MeZO), and QZO on the quantization steps.

One perturbation k of a step, for every trainable tensor p in a fixed order (REFERENCES, Zeroth-order):
    z_p ~ N(0, 1) from a generator seeded by (seed, k, index of p)  - never stored, regenerated
    p += eps z;  l+ = L(p);  p -= 2 eps z;  l- = L(p);  p += eps z
    g = (l+ - l-) / (2 eps)                  clipped to [-C, C] when zo_clip is set (QZO)
    p -= lr_p * (g z + wd_p p) / n           n = perturbations per step; steps then clamped > 0

Quantization steps are perturbed in proportion to their own size (z -> z * |s|): a step of 1e-2 and a
LoRA weight of 1e-1 then share one eps. No backward pass and no optimizer state: peak memory is a
forward pass plus one tensor-sized z at a time. Under data parallelism every rank draws the same z
(same seeds) and only the two scalar losses are averaged across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from qat.quant_linear import QuantLinear

MIN_STEP = 1e-8  # steps stay positive: W/s must stay finite


@dataclass
class ZOTensor:
    param: torch.Tensor
    lr_group: int          # index of the optimizer param group whose (scheduled) lr and wd apply
    relative: bool         # a quantization step: perturb and update in proportion to |s|


def zo_tensors(model: nn.Module, targets: str) -> list[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, is_step) for what ZO perturbs: 'adapters', 'steps' (QZO) or 'both'; fixed order."""
    steps = set()
    for layer in model.modules():
        if isinstance(layer, QuantLinear):
            steps.update(id(t) for t in (layer.weight_scale, layer.weight_zero_point) if t is not None)
    chosen = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_step = id(p) in steps
        if (is_step and targets in ("steps", "both")) or (not is_step and targets in ("adapters", "both")):
            chosen.append((name, p, is_step and name.endswith("weight_scale")))
    if not chosen:
        raise ValueError(f"zeroth-order training with zo_targets={targets!r} found no trainable tensors: "
                         "attach an adapter, or set learn_scale and zo_targets 'steps'")
    return chosen


def _z(p: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=p.device).manual_seed(seed)
    return torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)


def _direction(t: ZOTensor, seed: int) -> torch.Tensor:
    z = _z(t.param, seed)
    return z * t.param.detach().abs().float() if t.relative else z


def _mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)  # SUM then divide: gloo has had an AVG bug
        values /= dist.get_world_size()
    return values


@torch.no_grad()
def zo_step(tensors: list[ZOTensor], loss_fn, seed: int, eps: float, num_perturbations: int,
            groups: list[dict], clip: float | None = None, lr_scale: float = 1.0) -> torch.Tensor:
    """One SPSA step over ``tensors`` (in place); returns the mean of the l+ / l- losses.

    ``loss_fn()`` evaluates the batch's loss at the current parameters; ``groups`` are the optimizer's
    param groups (their ``lr`` follows the scheduler); ``lr_scale`` = 1 / gradient accumulation steps.
    Relative (step) directions depend on the step's value, so they are computed once per perturbation
    and kept until its update (step-sized memory).
    """
    losses = []
    for k in range(num_perturbations):
        base = seed * 1_000_003 + k * 10_007
        keep = [_direction(t, base + i) if t.relative else None for i, t in enumerate(tensors)]
        _perturb_k(tensors, base, eps, keep)
        plus = loss_fn()
        _perturb_k(tensors, base, -2 * eps, keep)
        minus = loss_fn()
        _perturb_k(tensors, base, eps, keep)
        # float64: the difference of two close losses must not lose digits to a cast
        plus, minus = _mean_across_ranks(torch.stack([plus.detach().double(), minus.detach().double()]))
        g = ((plus - minus) / (2 * eps)).item()
        if clip is not None:
            g = max(-clip, min(clip, g))
        for i, t in enumerate(tensors):
            group = groups[t.lr_group]
            d = keep[i] if keep[i] is not None else _direction(t, base + i)
            update = g * d
            if group.get("weight_decay", 0.0):
                update = update + group["weight_decay"] * t.param.detach().float()
            t.param.data.add_(update.to(t.param.dtype), alpha=-group["lr"] * lr_scale / num_perturbations)
            if t.relative:
                t.param.data.clamp_(min=MIN_STEP)
        losses.append((plus + minus) / 2)
    return torch.stack(losses).mean()


def _perturb_k(tensors: list[ZOTensor], base: int, scale: float, keep: list) -> None:
    """p += scale * z_p, z regenerated from its seed (or the kept relative direction of a step)."""
    for i, t in enumerate(tensors):
        d = keep[i] if keep[i] is not None else _z(t.param, base + i)
        t.param.data.add_(d.to(t.param.dtype), alpha=scale)
