"""Training checkpoints that hold the trainable state, not a second copy of the frozen base.

A checkpoint folder (beside the Trainer's optimizer / scheduler / RNG / trainer_state files):
    qat_trainable.safetensors   every tensor that trains (steps, zero points, adapters) and the
                                adapter buffers (WHT supports); LoftQ-rewritten bases are re-derived
    qat_checkpoint.json         the recipe (QATArguments' qat fields) and a fingerprint of each
                                frozen base, so resuming onto a different base fails loudly

Each checkpoint is written into a hidden ``.checkpoint-N.partial`` folder and renamed into place once
whole (``QATTrainer._save_checkpoint``), after ``qat_complete.json`` (size and sha256 of every file in
it) is written last; ``qat_checkpoint.json`` also holds a sha256 of every trainable tensor. Resuming
takes the newest checkpoint that passes :func:`checkpoint_problem` and says why newer ones were skipped.

Sharded models go through the same functions - FSDP2 (DTensor parameters) and DeepSpeed ZeRO-3
(partitioned parameters, ``ds_id``): gathering the trainable tensors and fingerprinting the codes (one
layer at a time) is then a collective, so every rank calls :func:`checkpoint_contents` and
:func:`load_checkpoint` and one rank writes. Loading cuts each rank's FSDP2 shard from the full
tensor every rank read; under ZeRO-3 rank 0's loaded values are re-partitioned by DeepSpeed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from qat.adapters import is_adapter_name, load_adapter_state_dict
from qat.quant_linear import QuantLinear
from qat.trainers.gather import full_tensor, gathered, is_sharded  # noqa: F401  (is_sharded: re-exported)

TRAINABLE_FILE = "qat_trainable.safetensors"
META_FILE = "qat_checkpoint.json"
MANIFEST_FILE = "qat_complete.json"
TRAINER_STATE_FILE = "trainer_state.json"
# A finite value this large is a divergence all the same: its square overflows float32
# (max 3.4e38 = (1.8e19)^2), so the first matmul that uses it gives inf / NaN on resume.
SANE_ABS_MAX = 1e18


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


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (any dtype: bf16 included), as stored in the checkpoint."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()


def state_problem(state: dict[str, torch.Tensor]) -> str | None:
    """Why a trainable state must not be saved as a checkpoint (NaN / inf, overflowing values, a step
    of 0, which quantizes by dividing by it), or None when it is sane. Negative steps are not refused
    (the forward and the export stay consistent: s * round(w / s) is even in s) but reported by
    :func:`nonpositive_steps`."""
    for name, t in state.items():
        if not t.is_floating_point():
            continue
        values = t.detach().float()
        if not torch.isfinite(values).all():
            return f"{name} holds {int((~torch.isfinite(values)).sum())} NaN / inf values"
        if values.numel() and values.abs().max() > SANE_ABS_MAX:
            return f"{name} holds values up to {float(values.abs().max()):.3g} (they overflow float32 in use)"
        if name.endswith("weight_scale") and bool((values == 0).any()):
            return f"{name} holds a step size of 0 (quantizing divides by it)"
    return None


def nonpositive_steps(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(step sizes <= 0, all step sizes) among the ``weight_scale`` tensors of a trainable state."""
    scales = [t for k, t in state.items() if k.endswith("weight_scale")]
    return sum(int((t <= 0).sum()) for t in scales), sum(t.numel() for t in scales)


def write_checkpoint(folder: str | Path, state: dict, bases: dict, recipe: dict) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / TRAINABLE_FILE), metadata={"format": "pt"})
    checksums = {k: tensor_digest(v) for k, v in state.items()}
    (folder / META_FILE).write_text(json.dumps({"recipe": recipe, "bases": bases, "checksums": checksums},
                                               indent=2, default=str))


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | Path) -> None:
    """Written last into a finished checkpoint: size and sha256 of every file in it (sub-folders too)."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _file_digest(p)}
             for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1))


def checkpoint_problem(folder: str | Path, deep: bool = True) -> str | None:
    """Why ``folder`` cannot be resumed from (incomplete, truncated, altered), or None.

    ``deep`` also re-hashes every file against the manifest (and the trainable tensors against
    their checksums); without it only presence and sizes are checked."""
    folder = Path(folder)
    try:
        json.loads((folder / TRAINER_STATE_FILE).read_text())
    except FileNotFoundError:
        return f"it has no {TRAINER_STATE_FILE} (the save was cut short)"
    except (OSError, ValueError):
        return f"its {TRAINER_STATE_FILE} is unreadable"
    for name in (TRAINABLE_FILE, META_FILE):
        if not (folder / name).is_file():
            return f"it has no {name} (the save was cut short)"
    if deep:
        altered = _altered_tensors(folder)
        if altered:
            return altered
    if not (folder / MANIFEST_FILE).is_file():
        return None  # written before manifests existed: the checks above are all there is
    try:
        files = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return f"its {MANIFEST_FILE} is unreadable"
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != record["size"]:
            return f"{name} is {path.stat().st_size} bytes, {record['size']} were written (truncated)"
        if deep and _file_digest(path) != record["sha256"]:
            return f"{name} does not match the sha256 recorded when it was written (the file changed)"
    return None


def _altered_tensors(folder: Path) -> str | None:
    """The trainable tensors against the sha256 stored beside them (checkpoints written since issue 17)."""
    from safetensors.torch import load_file

    try:
        sums = json.loads((folder / META_FILE).read_text()).get("checksums", {})
        state = load_file(str(folder / TRAINABLE_FILE)) if sums else {}
    except Exception as err:  # truncated / corrupt header or json
        return f"it cannot be read ({type(err).__name__})"
    altered = sorted(k for k, digest in sums.items() if k not in state or tensor_digest(state[k]) != digest)
    return f"{altered[0]} does not match the sha256 stored with it (the file changed)" if altered else None


def checkpoint_step(folder: str | Path) -> int | None:
    m = re.fullmatch(r"checkpoint-(\d+)", Path(folder).name)
    return int(m.group(1)) if m else None


def sorted_checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-N folders of a run, oldest (lowest N) first."""
    out = Path(output_dir)
    found = [p for p in out.iterdir() if p.is_dir() and checkpoint_step(p) is not None] if out.is_dir() else []
    return sorted(found, key=checkpoint_step)


def newest_complete_checkpoint(output_dir: str | Path, before: int | None = None,
                               deep: bool = True) -> tuple[Path | None, list[tuple[str, str]]]:
    """(the newest checkpoint that passes :func:`checkpoint_problem`, [(skipped name, why), ...]).
    ``before``: only checkpoints of steps below it."""
    skipped = []
    for folder in reversed(sorted_checkpoints(output_dir)):
        if before is not None and checkpoint_step(folder) >= before:
            continue
        problem = checkpoint_problem(folder, deep=deep)
        if problem is None:
            return folder, skipped
        skipped.append((folder.name, problem))
    return None, skipped


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
    altered = sorted(k for k, digest in meta.get("checksums", {}).items()
                     if k in state and tensor_digest(state[k]) != digest)
    if altered:
        raise ValueError(f"checkpoint {folder} is corrupt: {altered[:3]} do not match the sha256 stored with them "
                         "(the file changed after it was written); resume from an earlier checkpoint-* folder")
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
