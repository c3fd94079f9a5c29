"""Training checkpoints that hold the trainable state, not a second copy of the frozen base.

A checkpoint folder (beside the Trainer's optimizer / scheduler / RNG / trainer_state files):
    qat_trainable.safetensors   every tensor that trains (steps, zero points, adapters) and the
                                adapter buffers (WHT supports); LoftQ-rewritten bases are re-derived
    qat_checkpoint.json         the recipe (QATArguments' qat fields) and a fingerprint of each
                                frozen base, so resuming onto a different base fails loudly

Sharded models go through the same functions - FSDP2 (DTensor parameters) and DeepSpeed ZeRO-3
(partitioned parameters, ``ds_id``): gathering the trainable tensors and fingerprinting the codes (one
layer at a time) is then a collective, so every rank calls :func:`checkpoint_contents` and
:func:`load_checkpoint` and one rank writes. Loading cuts each rank's FSDP2 shard from the full
tensor every rank read; under ZeRO-3 rank 0's loaded values are re-partitioned by DeepSpeed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from qat.adapters import is_adapter_name, load_adapter_state_dict
from qat.quant_linear import QuantLinear
from qat.trainers.gather import full_tensor, gathered, is_sharded  # noqa: F401  (is_sharded: re-exported)

TRAINABLE_FILE = "qat_trainable.safetensors"
META_FILE = "qat_checkpoint.json"


def _trainable_keys(model: nn.Module, state: dict) -> list[str]:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return [k for k in state if k in trainable or is_adapter_name(k)]


def trainable_state(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """Trainable parameters plus everything under an ``.adapter.`` module, detached on CPU, whole."""
    if state_dict is not None:
        return {k: full_tensor(state_dict[k]).detach().cpu().contiguous() for k in _trainable_keys(model, state_dict)}
    params = dict(model.named_parameters())
    keys = _trainable_keys(model, model.state_dict())
    with gathered([params.get(k) for k in keys]):
        state = model.state_dict()
        return {k: full_tensor(state[k]).detach().cpu().clone().contiguous() for k in keys}


def base_fingerprints(model: nn.Module) -> dict[str, str]:
    """layer name -> sha256 (16 hex) of its packed codes and frozen steps (one layer gathered at a time)."""
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            h = hashlib.sha256()
            frozen = (layer.base_packed, layer.base_scale, layer.base_zero_point)
            with gathered(frozen):
                for t in frozen:
                    if t is not None:
                        h.update(full_tensor(t).detach().cpu().contiguous().numpy().tobytes())
            out[name] = h.hexdigest()[:16]
    return out


def checkpoint_contents(model: nn.Module, state_dict: dict | None = None) -> tuple[dict, dict]:
    """(trainable state, base fingerprints). For a sharded model (FSDP2 / ZeRO-3) a collective: call
    it on every rank."""
    return trainable_state(model, state_dict), base_fingerprints(model)


def write_checkpoint(folder: str | Path, state: dict, bases: dict, recipe: dict) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / TRAINABLE_FILE), metadata={"format": "pt"})
    (folder / META_FILE).write_text(json.dumps({"recipe": recipe, "bases": bases}, indent=2, default=str))


def is_qat_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / TRAINABLE_FILE).is_file()


def load_checkpoint(model: nn.Module, folder: str | Path) -> dict:
    """Load the trainable state into ``model`` (built by the same recipe); returns the saved recipe.

    Fails before touching the model when the file is unreadable, a frozen base differs from the one
    the checkpoint was trained on, or tensor names / shapes do not match.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = json.loads((folder / META_FILE).read_text())
        state = load_file(str(folder / TRAINABLE_FILE))
    except FileNotFoundError as err:
        raise ValueError(f"{folder} is not a qat checkpoint ({err.filename} is missing)") from None
    except Exception as err:  # truncated / corrupt safetensors or json
        raise ValueError(f"checkpoint {folder} is corrupt ({type(err).__name__}: {err}); "
                         "resume from an earlier checkpoint-* folder") from None
    mine = base_fingerprints(model)
    changed = sorted(n for n in set(mine) | set(meta["bases"]) if mine.get(n) != meta["bases"].get(n))
    if changed:
        raise ValueError(f"checkpoint {folder} was trained on a different quantized base ({len(changed)} layers "
                         f"differ, e.g. {changed[:3]}): resume with the recipe and model it was saved with")
    own = _trainable_shapes(model)
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    # WHT supports may hold a different number of positions: load_adapter_state_dict resizes them.
    bad_shape = [k for k in set(own) & set(state) if own[k] != state[k].shape and not is_adapter_name(k)]
    if missing or extra or bad_shape:
        raise ValueError(f"checkpoint {folder} does not match the model: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}, shape mismatch {bad_shape[:3]}")
    state = _as_local_shards(state, model.state_dict())
    adapter_keys = {k for k in state if is_adapter_name(k)}
    params = dict(model.named_parameters())
    with gathered([params.get(k) for k in state], modify=True):
        if adapter_keys:
            load_adapter_state_dict(model, {k: state[k] for k in adapter_keys})
        model.load_state_dict({k: v for k, v in state.items() if k not in adapter_keys}, strict=False)
    return meta["recipe"]


def _trainable_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Whole shapes without gathering anything: a DTensor reports its global shape, a ZeRO-3
    parameter its ``ds_shape``."""
    state, params = model.state_dict(), dict(model.named_parameters())
    return {k: getattr(params.get(k), "ds_shape", state[k].shape) for k in _trainable_keys(model, state)}


def _as_local_shards(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full saved tensors -> DTensors laid out like the model's FSDP2 parameters (each rank cuts its
    own shard from the full tensor it read, no communication); plain tensors pass through."""
    out = {}
    for k, v in state.items():
        ref = own.get(k)
        if isinstance(ref, DTensor):
            v = distribute_tensor(v.to(ref.dtype), ref.device_mesh, ref.placements, src_data_rank=None)
        out[k] = v
    return out
