"""Whole tensors of a sharded model: the one place that gathers FSDP2 and DeepSpeed ZeRO-3 shards.

    full_tensor(t)                     an FSDP2 DTensor's whole tensor (collective), else t
    gathered(params, modify=False)     ZeRO-3 parameters among ``params`` whole inside the block
                                       (DeepSpeed's GatheredParameters; ``modify``: rank 0's
                                       writes are re-partitioned on exit)
    full_parameters(module, recurse)   every parameter of ``module`` whole inside the block, both
                                       kinds (what the sharded export gathers one layer at a time)

Each is a collective on a sharded model: every rank must call it for the same tensors. On an
unsharded model each is a no-op. Used by the sharded export (``sharded_export``) and the
training checkpoints (``checkpoint``).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def is_zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")  # DeepSpeed ZeRO-3 partitioned parameter


def is_sharded(model: nn.Module) -> bool:
    """FSDP2 (DTensor) or DeepSpeed ZeRO-3 (``ds_id``) parameters: reading them takes every rank."""
    return any(isinstance(p, DTensor) or is_zero3(p) for p in model.parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank calls it), else ``t`` itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def gathered(params, modify: bool = False):
    """ZeRO-3 parameters among ``params`` are whole inside the block (read-only unless
    ``modify``: then rank 0's changes are re-partitioned on exit); others need nothing here."""
    zero3 = [p for p in params if p is not None and is_zero3(p)]
    if not zero3:
        yield
        return
    import deepspeed  # optional: only a ZeRO-3 model gets here

    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0 if modify else None):
        yield


@contextlib.contextmanager
def full_parameters(module: nn.Module, recurse: bool = True):
    """Within the block, ``module``'s parameters are full (unsharded) tensors on every rank.

    FSDP2 parameters (DTensors) are swapped for their ``full_tensor()`` and swapped back; ZeRO-3
    parameters go through :func:`gathered` (read-only); anything else is already full.
    """
    owners = module.modules() if recurse else [module]
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    zero3: list[torch.Tensor] = []
    full_of: dict[int, nn.Parameter] = {}  # a tied DTensor is gathered once
    with torch.no_grad():
        for owner in owners:
            for name, p in list(owner._parameters.items()):
                if isinstance(p, DTensor):
                    if id(p) not in full_of:
                        full_of[id(p)] = nn.Parameter(p.full_tensor(), requires_grad=False)
                    swapped.append((owner, name, p))
                    owner._parameters[name] = full_of[id(p)]
                elif p is not None and is_zero3(p):
                    zero3.append(p)
    try:
        with gathered(zero3):
            yield module
    finally:
        for owner, name, p in swapped:
            owner._parameters[name] = p
