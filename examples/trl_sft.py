"""Supervised fine-tuning with TRL's SFTTrainer and a peft LoRA (one of a pair of examples).

trl_sft.py trains a float LoRA; qat_trl_sft.py is the same script switched to quantization-aware
training, and the two differ in three lines (`diff examples/trl_sft.py examples/qat_trl_sft.py`):
`import qat`, `qat.QATSFTConfig(bits=4, group_size=32, ...)` for `trl.SFTConfig(...)`, `qat.QATSFTTrainer`
for `trl.SFTTrainer`. The data is in TRL's prompt / completion format (the loss counts the completions);
trainer.save_model() then writes the packed low-bit model, which AutoModelForCausalLM.from_pretrained loads.

    python examples/trl_sft.py --max_steps 60 --output_dir out/trl_sft
"""

import peft
import trl

import tiny

cli = tiny.parse_args()
tokenizer = tiny.tokenizer()
model = tiny.llama(tokenizer)  # or the model's name: SFTTrainer loads it
dataset = tiny.prompt_completion_dataset()

targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
lora_config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")

args = trl.SFTConfig(
    output_dir=cli.output_dir, max_steps=cli.max_steps, learning_rate=3e-3, per_device_train_batch_size=16,
    lr_scheduler_type="constant", logging_steps=10, save_steps=30, report_to="none", seed=0, max_length=64,
    bf16=False)  # fp32 on CPU
trainer = trl.SFTTrainer(
    model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora_config)
trainer.train()
trainer.save_model()
tiny.show_generation(trainer.model, tokenizer)
