"""Run by tests/test_switch.py under torchrun (or alone): the documented Python path, data parallel on CPUs.

    torchrun --nproc_per_node 2 tests/switch_ddp_worker.py OUT_DIR PER_DEVICE_BATCH [use_cpu]

A tiny Llama through qat.get_qat_model + QATTrainer with plain TrainingArguments; 8 fixed-length examples,
so every optimizer step sees all of them whatever the number of processes; plain SGD, so the
update is linear in the gradient and one process on the global batch is the reference. Each rank saves its trainable
tensors to OUT_DIR/rank<r>.pt.
"""

import os
import sys

import peft
import torch
import transformers
from datasets import Dataset

import qat


def main(out: str, per_device: int, use_cpu: bool) -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = qat.get_qat_model(model, lora, bits=4, group_size=32)
    g = torch.Generator().manual_seed(1)
    ids = (torch.randint(0, 128, (8, 1), generator=g) + 3 * torch.arange(16)) % 128  # learnable sequences
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = transformers.TrainingArguments(
        output_dir=out, max_steps=3, per_device_train_batch_size=per_device, learning_rate=1e-2,
        optim="sgd", lr_scheduler_type="constant", save_strategy="no", report_to="none", use_cpu=use_cpu, seed=0,
        disable_tqdm=True, dataloader_pin_memory=False)
    trainer = qat.QATTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(state, os.path.join(out, f"rank{rank}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        # Skip interpreter finalization: a gloo thread destroying tensors there aborted one rank
        # ("terminate called without an active exception") in clean-clone CI runs, after its work was
        # saved, even with the group destroyed. See scripts/benchmarks/comm_bytes.py exit_now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), len(sys.argv) > 3 and sys.argv[3] == "use_cpu")
