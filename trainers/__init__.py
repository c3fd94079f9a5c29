"""qat.trainers: QATTrainer (a transformers.Trainer), QATArguments, recipes and the main job.

    args = QATArguments(output_dir="out", model_name_or_path=..., bits=4, adapter="lora", ...)
    trainer = QATTrainer(model=quantized_model, args=args, teacher=float_model, train_dataset=...)
    trainer.train()

From a Trainer + peft script: ``model = qat.get_qat_model(model, lora_config, bits=4, group_size=32)`` and
``qat.QATTrainer`` for ``Trainer`` (plain TrainingArguments work); TRL: ``qat.QATSFTTrainer``
(``qat.trainers.trl``). See docs/QUICKSTART.md. Or from the shell: ``qat train --config RECIPE.yaml`` / ``accelerate launch scripts/train.py --config ...``.
"""

from qat.trainers.arguments import QATArguments
from qat.trainers.trainer import FakeQuantSchedule, NonFiniteLossError, QATTrainer, parameter_groups

__all__ = ["QATArguments", "QATTrainer", "FakeQuantSchedule", "NonFiniteLossError", "parameter_groups"]
