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
