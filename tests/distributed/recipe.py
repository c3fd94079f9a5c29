"""One small QAT recipe shared by the single-process references and the multi-process workers.

Tiny Llama (2 blocks, hidden 64), 4-bit group-32 base, inside LoRA rank 4; trainable: steps +
adapters. A fixed global batch per step; rank r of W trains on rows [r*B/W, (r+1)*B/W). The
causal-LM loss is a mean over the same number of tokens on every rank (no padding), so the mean
of the per-rank gradients is the global-batch gradient: data parallelism must reproduce the
single-process run up to float summation order.
"""

from __future__ import annotations

import torch

from qat.adapters import AdapterConfig, attach
from qat.config import QuantConfig
from qat.surgery import quantize_model
from tests.conftest import tiny_llama

GLOBAL_BATCH, SEQ, STEPS, LR = 4, 16, 5, 3e-3


def build_model(seed: int = 0) -> torch.nn.Module:
    model = quantize_model(tiny_llama(seed), QuantConfig(bits=4, group_size=32, init="rtn"))
    attach(model, AdapterConfig(kind="lora", rank=4, placement="inside"))
    torch.manual_seed(seed + 1)
    for name, p in model.named_parameters():  # LoRA B starts at zero: give the adapters a direction
        if name.endswith("lora_B"):
            p.data.normal_(0, 0.02)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("weight_scale", "lora_A", "lora_B")))
    return model.train()


def batches(steps: int = STEPS, seed: int = 123) -> list[torch.Tensor]:
    """The same learnable global batch every step (arithmetic sequences mod the vocabulary), so
    the loss falls steadily (4.88 -> 4.60 in 5 steps) and curves are comparable step by step."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 128, (GLOBAL_BATCH, 1), generator=g)
    stride = torch.randint(1, 4, (GLOBAL_BATCH, 1), generator=g)
    return [(start + stride * torch.arange(SEQ)) % 128] * steps


def local_rows(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per = batch.shape[0] // world
    return batch[rank * per:(rank + 1) * per]


def optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def reference_run(steps: int = STEPS) -> dict:
    """Single process, global batch: losses per step, the first step's gradients, final model."""
    model = build_model()
    opt = optimizer(model)
    losses, first_grads = [], None
    for ids in batches(steps):
        loss = loss_of(model, ids)
        loss.backward()
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return dict(losses=losses, first_grads=first_grads, model=model)


def local_first_grads(world: int = 2) -> list[dict]:
    """Each rank's own (not yet averaged) first-step gradient: bounds the quantized reduction's error."""
    out = []
    for rank in range(world):
        model = build_model()
        loss_of(model, local_rows(batches(1)[0], rank, world)).backward()
        out.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    return out


# ---------------------------------------------------------------------- through the Trainer
# What `fsdp_config` holds for FSDP2 (scripts/accelerate/fsdp2.yaml in TrainingArguments' spelling).
FSDP2_CONFIG = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
JOB_STEPS = 4


def job_argv(folder, run_name: str, per_device: int) -> list[str]:
    """The main job (`qat train`) on folder/model and folder/data.txt, written to folder/run_name.

    Without --config the job starts from the default (MiniLM) recipe: task, distill, scheduler
    and warm-up are overridden here. Sequential sampling: one process with per_device 4 and two
    with 2 each see the same global batch at every step (accelerate hands consecutive batches to
    consecutive ranks).
    """
    values = {"model_name_or_path": f"{folder}/model", "dataset": f"{folder}/data.txt", "task": "causal_lm",
              "distill": "none", "warmup_steps": 0, "max_length": 32, "bits": 4, "group_size": 32,
              "adapter": "lora", "adapter_rank": 4, "train_mode": "fake_quant", "quant_init": "mse",
              "learning_rate": LR, "lr_scheduler_type": "constant", "max_steps": JOB_STEPS,
              "save_steps": JOB_STEPS, "per_device_train_batch_size": per_device,
              "train_sampling_strategy": "sequential", "eval_strategy": "no", "max_eval_samples": 8,
              "report_to": "none", "seed": 0, "logging_steps": 1, "disable_tqdm": True,
              "output_dir": f"{folder}/{run_name}", "run_name": run_name}
    return [item for key, value in values.items() for item in (f"--{key}", str(value))]
