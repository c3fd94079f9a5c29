"""Export and packed state dicts from FSDP2- or DeepSpeed-ZeRO-3-sharded QuantLinear models.

The export of a sharded model must equal, byte for byte, the export of the same model held by
one process (``qat.export.packed_state_dict``). We gather **one module at a time**: a
QuantLinear's packed codes, steps and adapter are made full on every rank (FSDP2:
``DTensor.full_tensor``; ZeRO-3: ``deepspeed.zero.GatheredParameters``), its export tensors are
computed exactly as in a single process, rank 0 keeps them on the CPU, and the full tensors are
dropped before the next layer. Rank 0 ends with the packed export (what is written anyway);
nobody ever holds a dense copy of the model, only one layer's ``W_hat`` transiently.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from qat.export import _check_exportable, export_model, layer_export_tensors


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _is_zero3(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")  # DeepSpeed ZeRO-3 partitioned parameter


@contextlib.contextmanager
def full_parameters(module: nn.Module, recurse: bool = True):
    """Within the block, ``module``'s parameters are full (unsharded) tensors on every rank.

    A collective: every rank must enter it for the same module. FSDP2 parameters (DTensors) are
    swapped for their ``full_tensor()`` and swapped back; ZeRO-3 parameters are gathered by
    DeepSpeed's own ``GatheredParameters`` (read-only, ``modifier_rank=None``); anything else is
    already full.
    """
    owners = module.modules() if recurse else [module]
    swapped: list[tuple[nn.Module, str, torch.Tensor]] = []
    zero3: list[torch.Tensor] = []
    full_of: dict[int, nn.Parameter] = {}  # a tied DTensor is gathered once
    with torch.no_grad():
        for owner in owners:
            for name, p in list(owner._parameters.items()):
                if p is None:
                    continue
                if isinstance(p, DTensor):
                    if id(p) not in full_of:
                        full_of[id(p)] = nn.Parameter(p.full_tensor(), requires_grad=False)
                    swapped.append((owner, name, p))
                    owner._parameters[name] = full_of[id(p)]
                elif _is_zero3(p):
                    zero3.append(p)
    try:
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
                yield module
        else:
            yield module
    finally:
        for owner, name, p in swapped:
            owner._parameters[name] = p


def _state_owners(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """state-dict key -> (module that owns it, attribute name), in state-dict order."""
    owners = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        lead = f"{prefix}." if prefix else ""
        for name in module._parameters:
            owners.setdefault(lead + name, (module, name))
        for name in module._buffers:
            if name not in module._non_persistent_buffers_set:
                owners.setdefault(lead + name, (module, name))
    return owners


@torch.no_grad()
def gather_packed_state_dict(model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """``qat.export.packed_state_dict`` of a sharded model, assembled one module at a time.

    Every rank must call it (it gathers); rank 0 gets the CPU state dict (every rank does when
    ``rank0_only=False``), the others an empty dict. Keys, order, dtypes and values equal the
    single-process ``packed_state_dict`` of the same parameters.
    """
    layers = dict(_check_exportable(model))
    keep = not rank0_only or _rank() == 0
    skip = tuple(f"{n}." for n in layers)
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, (owner, attr) in _state_owners(model).items():
        if key.startswith(skip) or key.startswith("_"):
            continue
        ref = owner._parameters.get(attr) if attr in owner._parameters else owner._buffers.get(attr)
        if ref is None or id(ref) in seen:
            continue  # a tied weight (lm_head = embeddings): saved once, as packed_state_dict does
        seen.add(id(ref))
        with full_parameters(owner, recurse=False):
            t = owner._parameters[attr] if attr in owner._parameters else owner._buffers[attr]
            if keep:
                state[key] = t.detach().to("cpu", copy=True).contiguous()
    for name, layer in layers.items():
        with full_parameters(layer):
            tensors = layer_export_tensors(name, layer)
        if keep:
            state.update({k: v.to("cpu") for k, v in tensors.items()})
    return state


def export_sharded(model: nn.Module, out_dir: str | Path, **export_kwargs) -> Path:
    """``qat.export_model`` for an FSDP2 / ZeRO-3 sharded model: every rank calls it, rank 0 writes.

    ``export_kwargs`` are those of :func:`qat.export.export_model` (tokenizer, source_dir,
    overwrite, recipe, ...). Returns the export folder on every rank, after a barrier.
    """
    state = gather_packed_state_dict(model, rank0_only=True)
    out_dir = Path(out_dir)
    error = None
    if _rank() == 0:
        try:
            export_model(model, out_dir, state=state, **export_kwargs)
        except BaseException as err:  # other ranks must not wait forever on the barrier
            error = err
    if dist.is_initialized():
        flag = [error is not None]
        dist.broadcast_object_list(flag, src=0)
        if flag[0] and error is None:
            raise RuntimeError("export failed on rank 0; see its log")
    if error is not None:
        raise error
    return out_dir
