"""What lets QATTrainer replace a plain ``Trainer`` (or TRL's ``SFTTrainer``) in an existing script.

  as_qat_arguments   a plain TrainingArguments / SFTConfig becomes QATArguments (qat's keys at their
                     defaults, the quantizer and adapter keys read from the model), so the recipe saved in
                     checkpoints and exports describes the model that trains
  resolve_teacher    the float teacher: ``teacher=`` or the copy get_qat_model(keep_teacher=True) kept;
                     refuses the quantized model itself and a teacher without a distillation loss
  check_trainable    refuses, before training, any trainable parameter outside the steps and adapters
                     (except modules peft's ``modules_to_save`` asked to train in full: said at start)
  export_into        ``trainer.save_model(dir)`` / ``push_to_hub()``: the packed export written into a
                     folder that may hold other files (checkpoint-N folders stay untouched)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from qat.api import float_teacher, trained_in_full
from qat.quant_linear import QuantLinear

logger = logging.getLogger("qat")

# A previous export's weight files in the target folder; those the new export does not write are removed
# (as save_pretrained removes stale shards). Nothing else in the folder is touched.
WEIGHT_FILE_PREFIXES = ("model.safetensors", "model-")


def _model_recipe(model: nn.Module) -> dict:
    """The QATArguments quantizer / adapter keys that describe ``model`` as get_qat_model built it."""
    values = {}
    quant = getattr(model, "qat_config", None)
    if quant is not None:
        values.update(bits=quant.bits, group_size=-1 if quant.group_size is None else quant.group_size,
                      symmetric=quant.symmetric, storage_bits=quant.storage_bits, quant_init=quant.init,
                      quant_include=list(quant.include), quant_exclude=list(quant.exclude),
                      quant_overrides=dict(quant.overrides), learn_scale=quant.learn_scale,
                      learn_zero_point=quant.learn_zero_point)
    adapter = getattr(model, "qat_adapter_config", None)
    if adapter is None:
        values["adapter"] = "none"
    else:
        values.update(adapter=adapter.kind, adapter_rank=adapter.rank, adapter_alpha=adapter.alpha,
                      adapter_dropout=adapter.dropout, adapter_placement=adapter.placement,
                      adapter_targets=list(adapter.targets), adapter_init=adapter.init)
    return values


def as_qat_arguments(args, model: nn.Module, cls):
    """``args`` as an instance of ``cls`` (QATArguments or a subclass); returned as is when it is one.

    Plain TrainingArguments (or None, the Trainer's default) are copied field by field; qat's training
    keys (distill, step_learning_rate, ...) take their defaults: pass QATArguments to set them.
    """
    if isinstance(args, cls):
        return args
    from transformers import TrainingArguments

    if args is None:
        args = TrainingArguments(output_dir="trainer_output")  # what Trainer(args=None) uses
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init and f.name in known}
    extra = sorted(f.name for f in dataclasses.fields(args) if f.init and f.name not in known)
    if extra:
        raise ValueError(f"{type(args).__name__} has fields {extra[:5]} that {cls.__name__} lacks: "
                         f"use {'qat.QATSFTTrainer' if 'dataset_text_field' in extra else 'the matching qat trainer'}")
    values.update({k: v for k, v in _model_recipe(model).items() if k in known})
    return cls(**values)


def resolve_teacher(model: nn.Module, teacher: nn.Module | None, args) -> nn.Module | None:
    """The teacher the distillation loss reads, or None when ``distill`` is 'none'."""
    if teacher is not None and (teacher is model or any(isinstance(m, QuantLinear) for m in teacher.modules())):
        raise ValueError("teacher= is a quantized model (get_qat_model and qat.quantize_model change the model "
                         "in place, so a teacher taken before them is the student itself): build the model with "
                         "qat.get_qat_model(..., keep_teacher=True) and leave teacher= out, or pass a float model "
                         "loaded separately")
    if args.distill == "none":
        if teacher is not None:
            raise ValueError("a teacher was given but distill is 'none', so it would be ignored: set distill "
                             "('kl', 'mse' or 'cosine') and distill_weight in QATArguments, or drop teacher=")
        return None
    teacher = teacher if teacher is not None else float_teacher(model)
    if teacher is None:
        raise ValueError(f"distill={args.distill!r} needs the float model as teacher: build the model with "
                         "qat.get_qat_model(model, lora_config, keep_teacher=True) (qat keeps the float weights it "
                         "quantizes), or pass teacher=<the float model, loaded separately>")
    return teacher


def check_trainable(model: nn.Module, role_of) -> list[str]:
    """Refuse trainable parameters outside the steps / adapters; returns the modules trained in full.

    ``role_of(name)`` is the optimizer-group role of a parameter ('adapters', 'steps', 'zero_points',
    'other'). Modules get_qat_model set to train in full (peft's ``modules_to_save``) are allowed and
    logged, with their number of values.
    """
    full = trained_in_full(model)
    other = [(n, p) for n, p in model.named_parameters() if p.requires_grad and role_of(n) == "other"]
    stray = [(n, p) for n, p in other if not any(n.startswith(f + ".") for f in full)]
    if stray:
        names = ", ".join(n for n, _ in stray[:4]) + (", ..." if len(stray) > 4 else "")
        values = sum(p.numel() for _, p in stray)
        raise ValueError(f"{len(stray)} parameters outside the steps and adapters would train ({values:,d} values: "
                         f"{names}): freeze them (model.requires_grad_(False) before qat.quantize_model, as "
                         "qat.get_qat_model does), or name their modules in LoraConfig(modules_to_save=[...]) to "
                         "train them in full on purpose")
    if other:
        values = sum(p.numel() for _, p in other)
        logger.warning("training %d modules in full besides the steps and adapters (modules_to_save): %s, "
                       "%s values", len(full), ", ".join(full), f"{values:,d}")
    return full


def _is_weight_file(name: str) -> bool:
    return name.startswith(WEIGHT_FILE_PREFIXES) and name.endswith((".safetensors", ".safetensors.index.json"))


def export_into(folder: str | Path, write) -> Path:
    """Run ``write(new_folder)`` (an export to a new folder), then move its files into ``folder``.

    Files of the same name are replaced and a previous export's stale weight shards removed; every other
    entry of ``folder`` (checkpoint-N, logs, the user's files) stays. Until the move, ``folder`` is
    untouched: a failed export leaves it as it was.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".qat-export-", dir=folder))
    try:
        built = staging / "export"
        write(built)
        new = {p.name for p in built.iterdir()}
        for old in folder.iterdir():
            if old.is_file() and _is_weight_file(old.name) and old.name not in new:
                old.unlink()
        for entry in built.iterdir():
            target = folder / entry.name
            if target.is_dir() and entry.is_dir():
                shutil.rmtree(target)  # a folder the previous export wrote (adapter/, 1_Pooling/)
            os.replace(entry, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
