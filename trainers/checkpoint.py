"""Training checkpoints that hold the trainable state, not a second copy of the frozen base.

A checkpoint folder (beside the Trainer's optimizer / scheduler / RNG / trainer_state files):
    qat_trainable.safetensors   every tensor that trains (steps, zero points, adapters) and the
                                adapter buffers (WHT supports); LoftQ-rewritten bases are re-derived
    qat_checkpoint.json         the recipe (QATArguments' qat fields) and a fingerprint of each
                                frozen base, so resuming onto a different base fails loudly
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from qat.adapters import is_adapter_name, load_adapter_state_dict
from qat.quant_linear import QuantLinear

TRAINABLE_FILE = "qat_trainable.safetensors"
META_FILE = "qat_checkpoint.json"


def trainable_state(model: nn.Module, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """Trainable parameters plus everything under an ``.adapter.`` module, detached on CPU."""
    state = state_dict if state_dict is not None else model.state_dict()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu().contiguous() for k, v in state.items()
            if k in trainable or is_adapter_name(k)}


def base_fingerprints(model: nn.Module) -> dict[str, str]:
    """layer name -> sha256 (16 hex) of its packed codes and frozen steps."""
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            h = hashlib.sha256()
            for t in (layer.base_packed, layer.base_scale, layer.base_zero_point):
                if t is not None:
                    h.update(t.detach().cpu().contiguous().numpy().tobytes())
            out[name] = h.hexdigest()[:16]
    return out


def save_checkpoint(model: nn.Module, folder: str | Path, recipe: dict, state_dict: dict | None = None) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model, state_dict), str(folder / TRAINABLE_FILE), metadata={"format": "pt"})
    meta = {"recipe": recipe, "bases": base_fingerprints(model)}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, default=str))


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
    own = trainable_state(model)
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    # WHT supports may hold a different number of positions: load_adapter_state_dict resizes them.
    bad_shape = [k for k in set(own) & set(state) if own[k].shape != state[k].shape and not is_adapter_name(k)]
    if missing or extra or bad_shape:
        raise ValueError(f"checkpoint {folder} does not match the model: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}, shape mismatch {bad_shape[:3]}")
    adapter_keys = {k for k in state if is_adapter_name(k)}
    if adapter_keys:
        load_adapter_state_dict(model, {k: state[k] for k in adapter_keys})
    model.load_state_dict({k: v for k, v in state.items() if k not in adapter_keys}, strict=False)
    return meta["recipe"]
