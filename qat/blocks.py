"""Transformer blocks, one at a time: find them, capture what the first one is called with, and
run calibration data through them block by block.

GPTQ's sequential calibration and the block-wise reconstruction stage both need the same three
things: the stack of blocks (Llama / Qwen2 / Mistral ``model.layers``, BERT ``encoder.layer``,
GPT-2 ``transformer.h``), the inputs of block 0 for every calibration batch (hidden states plus
whatever else the model passes: attention mask, position embeddings, ...), and a way to apply
one block to a batch's hidden states with those same extras. Only one block's activations
([B, T, hidden] per batch) are held at a time; the caller replaces them with the block's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


class _Captured(Exception):
    """Raised by the pre-hook to stop the forward once block 0's inputs are held."""


@dataclass
class BlockBatch:
    """One calibration batch at a block boundary: hidden states and the extras block calls take.

    ``token_mask`` [B, T] (bool) marks real tokens (not padding): statistics skip the padding.
    """

    hidden: torch.Tensor  # [B, T, hidden]
    args: tuple = ()  # positional arguments after the hidden states
    kwargs: dict = field(default_factory=dict)
    token_mask: torch.Tensor | None = None


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) or type(m).__name__ in ("Conv1D", "QuantLinear") for m in module.modules())


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the model's transformer blocks: the largest ModuleList of same-class
    modules holding linear layers (``model.layers``, ``encoder.layer``, ``transformer.h``, ...)."""
    best, best_size = None, -1
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1 or not _has_linear(module[0]):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (name, module), size
    if best is None:
        raise ValueError(f"{type(model).__name__} has no stack of transformer blocks (a ModuleList of identical "
                         "layers holding linear layers): quantize it with init 'mse' or 'rtn' instead")
    return best


def model_kwargs(model: nn.Module, batch: dict) -> dict:
    """The batch as model keywords, with the KV cache off: replaying a block must not grow a cache."""
    kwargs = dict(batch)
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False
    return kwargs


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[dict]) -> list[BlockBatch]:
    """Run each batch through the model up to block 0 and keep what block 0 is called with."""
    captured: list[BlockBatch] = []

    def pre_hook(_module, args, kwargs):
        kwargs = dict(kwargs)
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        captured.append(BlockBatch(hidden.detach(), rest, kwargs))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(**model_kwargs(model, batch))
            except _Captured:
                pass
            else:
                raise RuntimeError("block 0 was never called: the model does not run its blocks in order")
            mask = batch.get("attention_mask")
            captured[-1].token_mask = None if mask is None else mask.bool()
    finally:
        handle.remove()
    return captured


def block_output(block: nn.Module, item: BlockBatch, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """``block`` applied to ``hidden`` (default: the batch's own) with the batch's extras; [B, T, hidden]."""
    out = block(item.hidden if hidden is None else hidden, *item.args, **item.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def advance(block: nn.Module, items: list[BlockBatch]) -> None:
    """Replace every batch's hidden states by ``block``'s outputs (in place): the next block's inputs."""
    for item in items:
        item.hidden = block_output(block, item)


def clone_items(items: list[BlockBatch]) -> list[BlockBatch]:
    """Copies that share the extras but own their hidden states (a second activation chain)."""
    return [BlockBatch(i.hidden.clone(), i.args, i.kwargs, i.token_mask) for i in items]


def real_tokens(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, d] -> [tokens, d] without the padded positions (all rows when the shapes differ)."""
    if token_mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(token_mask.shape):
        return x[token_mask]
    return x.reshape(-1, x.shape[-1])
