"""Block-wise reconstruction: before end-to-end training, fit each transformer block's trainable
tensors (steps, zero points, adapters) so the quantized block reproduces the float block's outputs
(the idea of EfficientQAT's Block-AP and OmniQuant), one block at a time.

    input of quantized block i   x_q = outputs of the quantized blocks < i (as already reconstructed)
    target ("float", default)    y = float block i applied to the float model's own input x_f
    target ("quantized")         y = float block i applied to x_q
    loss                         mean over real tokens and features of (block_q(x_q) - y)^2

The "float" target asks block i to also undo the error the blocks before it left (the end-to-end
goal); "quantized" only asks it to match the float block on the inputs it gets. Only one block's
activations are held: the quantized chain, the float chain (target "float") and the targets, each
[B, T, hidden] per calibration batch. Gradients flow through QuantLinear's recomputed backward.
"""

from __future__ import annotations

import math

import torch

from qat.blocks import BlockBatch, block_output, capture_block_inputs, find_blocks, real_tokens

TARGETS = ("float", "quantized")


def _token_mse(out: torch.Tensor, target: torch.Tensor, mask) -> torch.Tensor:
    """Mean squared error over the real tokens' features."""
    return (real_tokens(out, mask).float() - real_tokens(target, mask).float()).pow(2).mean()


@torch.no_grad()
def block_loss(block, items: list[BlockBatch], targets: list[torch.Tensor]) -> float:
    """Token-weighted mean of the per-batch MSE of ``block`` on ``items`` against ``targets``."""
    total, count = 0.0, 0
    for item, target in zip(items, targets):
        n = real_tokens(item.hidden, item.token_mask).shape[0]
        total += float(_token_mse(block_output(block, item), target, item.token_mask)) * n
        count += n
    return total / max(count, 1)


def _param_groups(block, lr: float, step_lr: float) -> list[dict]:
    """Steps and zero points at step_lr, the rest (adapters) at lr; only what requires grad."""
    steps, others = [], []
    for name, p in block.named_parameters():
        if p.requires_grad:
            (steps if name.rsplit(".", 1)[-1] in ("weight_scale", "weight_zero_point") else others).append(p)
    groups = [{"params": steps, "lr": step_lr}, {"params": others, "lr": lr}]
    return [g for g in groups if g["params"]]


def train_block(block, items, targets, steps: int, lr: float, step_lr: float, batches_per_step: int,
                generator: torch.Generator) -> None:
    """Adam with cosine decay on ``block``'s trainable tensors, ``batches_per_step`` batches a step."""
    groups = _param_groups(block, lr, step_lr)
    if not groups or steps <= 0:
        return
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in range(steps):
        chosen = torch.randperm(len(items), generator=generator)[:batches_per_step].tolist()
        opt.zero_grad(set_to_none=True)
        for j in chosen:
            loss = _token_mse(block_output(block, items[j]), targets[j], items[j].token_mask) / len(chosen)
            loss.backward()
        opt.step()
        sched.step()


def reconstruct_blocks(model, float_model, batches: list[dict], steps: int, lr: float = 1e-3,
                       step_lr: float = 1e-4, target: str = "float", batches_per_step: int = 4,
                       seed: int = 0, log=None) -> list[dict]:
    """Train every block of ``model`` (quantized, adapters attached) towards ``float_model``'s blocks
    on ``batches`` (model input dicts with attention masks), in order. Returns one row per block:
    the reconstruction loss before and after its training (on the calibration batches)."""
    if target not in TARGETS:
        raise ValueError(f"blockwise target {target!r}: use one of {TARGETS}")
    name, q_blocks = find_blocks(model)
    _, f_blocks = find_blocks(float_model)
    if len(q_blocks) != len(f_blocks):
        raise ValueError(f"the float model has {len(f_blocks)} blocks, the quantized one {len(q_blocks)}: "
                         "pass the float model the quantized one was made from")
    was_training = model.training
    model.eval()  # no dropout: the targets are deterministic
    float_model.eval()
    generator = torch.Generator().manual_seed(seed)
    q_items = capture_block_inputs(model, q_blocks, batches)
    f_items = capture_block_inputs(float_model, f_blocks, batches) if target == "float" else None
    rows = []
    try:
        for i, (q_block, f_block) in enumerate(zip(q_blocks, f_blocks)):
            with torch.no_grad():
                sources = f_items if target == "float" else q_items
                targets = [block_output(f_block, item) for item in sources]
            before = block_loss(q_block, q_items, targets)
            start = {n: p.detach().clone() for n, p in q_block.named_parameters() if p.requires_grad}
            train_block(q_block, q_items, targets, steps, lr, step_lr, batches_per_step, generator)
            after = block_loss(q_block, q_items, targets)
            kept = after <= before
            if not kept:  # never leave a block worse than it started (on the calibration data)
                with torch.no_grad():
                    for n, p in q_block.named_parameters():
                        if n in start:
                            p.copy_(start[n])
            rows.append({"block": f"{name}.{i}", "loss_before": before, "loss_after": after, "kept": kept})
            if log is not None:
                log(f"blockwise {name}.{i}: reconstruction MSE {before:.4g} -> {after:.4g}")
            with torch.no_grad():  # the next block's inputs: this block as now trained
                for item in q_items:
                    item.hidden = block_output(q_block, item)
                if f_items is not None:
                    for item, t in zip(f_items, targets):
                        item.hidden = t
            del targets
    finally:
        model.train(was_training)
    return rows
