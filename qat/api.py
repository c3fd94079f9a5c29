"""The three-line switch from a Trainer + peft script to quantization-aware training.

    model = get_peft_model(model, lora_config)                                # before
    model = qat.get_qat_model(model, lora_config, bits=4, group_size=32)     # after
    trainer = qat.QATTrainer(model=model, args=training_args, ...)           # was Trainer

:func:`get_qat_model` takes the same ``peft.LoraConfig`` and does what ``get_peft_model`` does, on a
quantized model: everything is frozen (embeddings, ``lm_head``, norms, the base weights), the selected
linear layers become :class:`~qat.QuantLinear` (frozen packed base, trainable steps) and a LoRA goes on
each ``target_modules`` layer. The modules in ``modules_to_save`` train in full, as peft trains them.

Words used here and in ``qat train --help`` (defined once, in docs/QUICKSTART.md too):
  step          the float scale s of one quantization grid: W_hat = s * (q - z), q an integer code.
                qat trains the steps (LSQ) together with the adapters.
  group         the inputs of one output row that share a step (group_size of them); -1 = the whole row.
  storage bits  the width of the frozen base codes (default: the trained width ``bits``).
"""

from __future__ import annotations

import copy
import math
import re
import types
import warnings

from torch import nn

from qat.adapter import PLACEMENTS
from qat.adapters import AdapterConfig, attach
from qat.config import QuantConfig
from qat.quant_linear import QuantLinear
from qat.surgery import quantize_model

TEACHER_ATTR = "_qat_float_teacher"  # a plain attribute, not a submodule: never trained, saved or moved
FULL_ATTR = "qat_trained_in_full"     # names of the modules that train in full (peft's modules_to_save)

__all__ = ["get_qat_model", "adapter_config_from_peft", "float_teacher", "trained_in_full"]


def _peft_target_patterns(model: nn.Module, lora_config) -> list[str]:
    """peft's ``target_modules`` as qat regexes; None means peft's default list for the model type."""
    targets = lora_config.target_modules
    if targets is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULTS:
            raise ValueError(f"LoraConfig has no target_modules and peft has no default list for model type "
                             f"{model_type!r}: set target_modules (e.g. ['q_proj', 'v_proj'] or 'all-linear')")
        targets = DEFAULTS[model_type]
    if targets == "all-linear":  # peft: every linear layer but the output head, which qat leaves in float
        return [r".*"]
    if isinstance(targets, str):
        return [f"^(?:{targets})$"]  # peft full-matches a string target
    return [rf"(^|\.){re.escape(t)}$" for t in targets]


def _check_supported(lora_config) -> None:
    """peft options that have no qat counterpart: refuse them by name rather than train something else."""
    from peft import LoraConfig

    if not isinstance(lora_config, LoraConfig):
        raise ValueError(f"get_qat_model takes a peft.LoraConfig, got {type(lora_config).__name__}: "
                         "qat's adapters are LoRA (and Walsh-Hadamard through qat.adapters.AdapterConfig)")
    unsupported = {
        "use_dora": lora_config.use_dora, "bias": lora_config.bias != "none",
        "layers_to_transform": lora_config.layers_to_transform is not None,
        "rank_pattern": bool(lora_config.rank_pattern), "alpha_pattern": bool(lora_config.alpha_pattern),
        "target_parameters": bool(getattr(lora_config, "target_parameters", None)),
        "trainable_token_indices": bool(getattr(lora_config, "trainable_token_indices", None)),
        "exclude_modules": bool(getattr(lora_config, "exclude_modules", None)),
        "init_lora_weights": lora_config.init_lora_weights not in (True, "gaussian"),
    }
    bad = [name for name, is_set in unsupported.items() if is_set]
    if bad:
        raise ValueError(f"LoraConfig sets {', '.join(bad)}, which qat does not support: leave "
                         f"{'it' if len(bad) == 1 else 'them'} at peft's default (init_lora_weights=True, "
                         "bias='none') or use qat.adapters.AdapterConfig for qat's own adapter options")


def adapter_config_from_peft(model: nn.Module, lora_config, placement: str = "inside") -> AdapterConfig:
    """The qat :class:`AdapterConfig` that trains what ``lora_config`` trains with peft.

    ``placement`` "inside" puts the LoRA inside the quantizer (rounded with the weight; exported merged
    into the packed codes, exactly); "outside" is peft / QLoRA's y = base(x) + B A x (exported in peft's
    format beside the packed base). peft's ``lora_dropout`` acts on x, which an inside adapter never
    sees: it is dropped there, with a warning. ``use_rslora`` (scale alpha / sqrt(r)) becomes the
    equivalent alpha' = alpha * sqrt(r) of the plain alpha / r scale.
    """
    _check_supported(lora_config)
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r}: use 'inside' (merged into the packed export) or 'outside'")
    rank = int(lora_config.r)
    alpha = float(lora_config.lora_alpha) * (math.sqrt(rank) if lora_config.use_rslora else 1.0)
    dropout = float(lora_config.lora_dropout)
    if dropout and placement == "inside":
        warnings.warn(f"lora_dropout={dropout} is not used: an adapter inside the quantizer never sees the "
                      "layer input x that peft drops out (placement='outside' keeps it)", stacklevel=3)
        dropout = 0.0
    return AdapterConfig(kind="lora", rank=rank, alpha=alpha, dropout=dropout, placement=placement,
                         targets=_peft_target_patterns(model, lora_config), init="zero")


def _modules_to_save(model: nn.Module, lora_config) -> list[str]:
    """Module names matching peft's ``modules_to_save`` (peft: the name or its last part equals an entry)."""
    wanted = list(getattr(lora_config, "modules_to_save", None) or [])
    found = [n for n, _ in model.named_modules() if n and any(n == w or n.endswith("." + w) for w in wanted)]
    missing = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in found)]
    if missing:
        raise ValueError(f"modules_to_save {missing} match no module of the model: use module names such as "
                         "'lm_head' or 'score'")
    return found


def _print_trainable_parameters(model: nn.Module) -> None:
    """peft's ``print_trainable_parameters`` line. A quantized layer counts as the out x in weights it
    stands for (not its packed int32 words) plus its steps."""
    frozen_base = ("base_packed", "base_scale", "base_zero_point")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters() if not n.endswith(frozen_base))
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def get_qat_model(model: nn.Module, peft_config=None, quant_config: QuantConfig | None = None, *,
                  placement: str = "inside", keep_teacher: bool = False, **quant_kwargs) -> nn.Module:
    """Quantize ``model`` in place, attach the LoRA that ``peft_config`` describes, freeze the rest.

    ``quant_kwargs`` are :class:`qat.QuantConfig` fields (``bits=4, group_size=32, overrides=...``), or pass
    ``quant_config``. ``keep_teacher=True`` keeps a float copy of the model (taken before quantizing; it
    costs the float model's memory once more) as the teacher for distillation: ``QATTrainer`` uses it when
    ``distill`` is set and no ``teacher=`` is given. Nothing changes in ``model`` when a setting is refused.
    Returns the same model object (a transformers model, not a PeftModel).
    """
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("the model is already quantized: call get_qat_model once, on the float model")
    if type(model).__module__.startswith("peft."):
        raise ValueError("the model is a PeftModel: pass the model to get_qat_model instead of "
                         "get_peft_model(model, lora_config), not the result of get_peft_model")
    if quant_config is not None and quant_kwargs:
        raise ValueError(f"pass either quant_config or QuantConfig fields ({sorted(quant_kwargs)}), not both")
    full = _modules_to_save(model, peft_config) if peft_config is not None else []
    if quant_config is None:
        quant_config = QuantConfig(**quant_kwargs)
    if full:  # modules trained in full stay float (quantizing them would freeze their weights)
        quant_config = copy.deepcopy(quant_config)
        quant_config.exclude = list(quant_config.exclude) + [rf"^{re.escape(n)}$" for n in full]
    adapter_config = adapter_config_from_peft(model, peft_config, placement) if peft_config is not None else None
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if keep_teacher else None
    model.requires_grad_(False)  # what get_peft_model freezes: every weight, embeddings, norms, lm_head
    quantize_model(model, quant_config)  # the steps are the trainable part of each QuantLinear
    if adapter_config is not None:
        attach(model, adapter_config)
    for name in full:
        model.get_submodule(name).requires_grad_(True)
    object.__setattr__(model, FULL_ATTR, full)
    object.__setattr__(model, TEACHER_ATTR, teacher)  # object.__setattr__: not registered as a submodule
    object.__setattr__(model, "print_trainable_parameters", types.MethodType(_print_trainable_parameters, model))
    return model


def float_teacher(model: nn.Module) -> nn.Module | None:
    """The float copy :func:`get_qat_model` kept (``keep_teacher=True``), else None."""
    return getattr(model, TEACHER_ATTR, None)


def trained_in_full(model: nn.Module) -> list[str]:
    """Modules :func:`get_qat_model` set to train in full (peft's ``modules_to_save``)."""
    return list(getattr(model, FULL_ATTR, []) or [])
