"""TRL: QATSFTTrainer, the SFTTrainer with QATTrainer's changes; QATSFTConfig, SFTConfig plus qat's keys.

A TRL script switches by its trainer line (and ``import qat``):

    trainer = trl.SFTTrainer(model=..., args=trl.SFTConfig(...), train_dataset=ds, peft_config=lora_config)
    trainer = qat.QATSFTTrainer(model=..., args=trl.SFTConfig(...), train_dataset=ds, peft_config=lora_config)

``peft_config`` goes to :func:`qat.get_qat_model` (not peft's get_peft_model): the model is quantized with
the args' quantizer keys (``bits``, ``group_size``, ...: QATSFTConfig sets them, a plain SFTConfig gets
qat's defaults, W4 g32) and gets the LoRA, everything else frozen. TRL's dataset formats (``text``,
``messages``, ``prompt`` / ``completion``), its collator, packing and completion-only loss stay TRL's.
The loss is QATTrainer's: the model's own cross-entropy on TRL's labels, or mixed with distillation from
the float model (``distill``); TRL's extra metrics (entropy, token accuracy) need its fused LM head and are
not logged. ``save_model`` / ``push_to_hub`` write the packed export.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from qat.api import get_qat_model
from qat.quant_linear import QuantLinear
from qat.trainers.arguments import QATArguments
from qat.trainers.switch import _model_recipe, as_qat_arguments
from qat.trainers.trainer import QATTrainer


@dataclass
class QATSFTConfig(SFTConfig, QATArguments):
    """SFTConfig with QATArguments' keys. Where both name a key (``max_length``, ``packing``), TRL's meaning
    and default hold, since TRL's data pipeline reads them."""


def _load(model: str, args: QATSFTConfig):
    """A model id / folder loaded as SFTTrainer loads it (``model_init_kwargs``, float32 by default)."""
    from trl.trainer.utils import create_model_from_path

    kwargs = dict(args.model_init_kwargs or {})
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return create_model_from_path(model, **kwargs)


class QATSFTTrainer(QATTrainer, SFTTrainer):
    args_class = QATSFTConfig

    def __init__(self, model, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, teacher=None, **kwargs):
        if args is None:  # SFTTrainer's default: SFTConfig("<model name>-SFT")
            name = model if isinstance(model, str) else model.config._name_or_path
            args = SFTConfig(f"{name.split('/')[-1]}-SFT")
        if isinstance(model, str):
            model = _load(model, args)
        quantized = any(isinstance(m, QuantLinear) for m in model.modules())
        args = as_qat_arguments(args, model, self.args_class)
        if peft_config is not None:
            if quantized:
                raise ValueError("peft_config was given for a model that is already quantized: pass the float "
                                 "model with peft_config, or the get_qat_model result without it")
            # The float copy is kept only when a distillation loss will read it (and no teacher= was given).
            model = get_qat_model(model, peft_config, args.quant_config(), placement=args.adapter_placement,
                                  keep_teacher=args.distill != "none" and teacher is None)
            for key, value in _model_recipe(model).items():  # the recipe saved with checkpoints and exports
                setattr(args, key, value)
        super().__init__(model=model, args=args, teacher=teacher, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         peft_config=None, **kwargs)
