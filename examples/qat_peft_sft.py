"""Supervised fine-tuning with transformers.Trainer and a peft LoRA (one of a pair of examples).

peft_sft.py trains a float LoRA; qat_peft_sft.py is the same script switched to quantization-aware
training, and the two differ in three lines (`diff examples/peft_sft.py examples/qat_peft_sft.py`):
`import qat`, `qat.get_qat_model(...)` for `peft.get_peft_model(...)`, `qat.QATTrainer` for
`transformers.Trainer`. trainer.save_model() then writes the packed low-bit model, which
AutoModelForCausalLM.from_pretrained loads.

    python examples/peft_sft.py --max_steps 60 --output_dir out/peft_sft
"""

import peft
import qat
import transformers

import tiny

cli = tiny.parse_args()
tokenizer = tiny.tokenizer()
model = tiny.llama(tokenizer)  # a real script: transformers.AutoModelForCausalLM.from_pretrained(name)
dataset = tiny.text_dataset().map(lambda ex: tokenizer(ex["text"]), remove_columns=["text"])

targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
lora_config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
model = qat.get_qat_model(model, lora_config, bits=4, group_size=32)
model.print_trainable_parameters()

args = transformers.TrainingArguments(output_dir=cli.output_dir, max_steps=cli.max_steps, learning_rate=3e-3,
                                      per_device_train_batch_size=16, lr_scheduler_type="constant",
                                      logging_steps=10, save_steps=30, report_to="none", seed=0)
collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
trainer = qat.QATTrainer(
    model=model, args=args, train_dataset=dataset, data_collator=collator, processing_class=tokenizer)
trainer.train()
trainer.save_model()
tiny.show_generation(model, tokenizer)
