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

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from qat.export import export_model, packed_state_dict
from qat.trainers.gather import full_parameters


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@torch.no_grad()
def gather_packed_state_dict(model: nn.Module, rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """``qat.export.packed_state_dict`` of a sharded model, assembled one module at a time.

    Every rank must call it (it gathers); rank 0 gets the CPU state dict (every rank does when
    ``rank0_only=False``), the others an empty dict. The same builder as the single-process
    export, so keys, order, dtypes and values are those of ``packed_state_dict``.
    """
    keep = not rank0_only or _rank() == 0
    return packed_state_dict(model, gather=full_parameters, keep=keep, device="cpu")


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
