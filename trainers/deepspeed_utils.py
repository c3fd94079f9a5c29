"""DeepSpeed (ZeRO-2 / ZeRO-3 / ZeRO++) for QuantLinear models: config checks that fail early.

What DeepSpeed 0.19 does with the frozen int32 codes (read in ``runtime/zero/``):

- ``bf16`` / ``fp16`` cast the module with ``nn.Module.bfloat16()`` / ``half()``, which casts
  floating tensors only: the codes stay int32. ZeRO-3 partitions them as int32 and all-gathers
  them grouped by dtype (``_all_gather_coalesced`` buckets per communication dtype), so they
  travel packed. ZeRO-2 keeps parameters replicated and never touches frozen ones.
- ZeRO++ ``zero_quantized_weights`` int8-quantizes *every* parameter it all-gathers, and
  ``zero_quantized_nontrainable_weights`` every frozen one, through a CUDA kernel that first
  converts the tensor to fp16 (``CUDAQuantizer.quantize``): int32 codes would be upcast and
  re-quantized as if they were weights (words of packed codes overflow fp16). Both are refused
  here. They would not help anyway: a 4-bit packed base already moves 1/4 of bf16, less than
  ZeRO++'s int8 weights (1/2).
- ``zero_quantized_gradients`` (int4 all-to-all gradient reduction) and ``zero_hpz_partition_size``
  (a secondary weight shard per node) are safe for qat and are what ``ds_zeropp.json`` turns on.
  Both are CUDA-only in DeepSpeed.

ZeRO-3 fetches a module's parameters when that module's forward runs, not its children's.
QuantLinear rebuilds W_hat from its adapter's parameters (``delta_weight``) without calling the
adapter's forward, so ZeRO-3 would leave the adapter partitioned (empty) there:
:func:`prepare_for_deepspeed` marks QuantLinear a ZeRO-3 *leaf* (DeepSpeed's own mechanism),
so the layer and its adapter are gathered together. And ZeRO-3 releases a module's parameters
from a backward hook that fires once the gradients w.r.t. the module's *inputs* exist; with
frozen embeddings the first block's inputs need no gradient, the hook fires on the outputs
instead, before QuantLinear's backward has used its steps, and the gradient lands on a released
(empty) parameter. :func:`prepare_for_deepspeed` therefore also makes the embedding output
require grad (transformers' ``enable_input_require_grads``, the usual PEFT + ZeRO-3 fix).

The Trainer calls :func:`check_deepspeed_config` on the ``deepspeed=`` config (dict or path) and
:func:`prepare_for_deepspeed` on the model before the engine is built, and
:func:`check_engine_codes` after it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from qat.quant_linear import QuantLinear

UPCASTING_KEYS = ("zero_quantized_weights", "zero_quantized_nontrainable_weights")
CUDA_ONLY_KEYS = ("zero_quantized_gradients",)


def load_config(config: dict | str | Path) -> dict:
    """A DeepSpeed config as a dict (from a dict, a JSON file path, or a JSON string)."""
    if isinstance(config, dict):
        return dict(config)
    text = str(config)
    path = Path(text)
    if not text.lstrip().startswith("{") and not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {text!r} is neither a file nor a JSON object")
    try:
        return json.loads(path.read_text() if path.is_file() else text)
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {text[:80]!r} is not valid JSON: {err}") from None


def _int(value) -> int | None:
    """The integer value of a config entry, or None for "auto" / missing."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _has_quant_layers(model: nn.Module | None) -> bool:
    return model is None or any(isinstance(m, QuantLinear) for m in model.modules())


def _check_batch(config: dict, world_size: int) -> None:
    # DeepSpeed checks this too, but only inside deepspeed.initialize and with a terse assert.
    total = _int(config.get("train_batch_size"))
    micro = _int(config.get("train_micro_batch_size_per_gpu"))
    accum = _int(config.get("gradient_accumulation_steps"))
    if total is not None and micro is not None and accum is not None and total != micro * accum * world_size:
        raise ValueError(
            f"DeepSpeed train_batch_size={total} but train_micro_batch_size_per_gpu * "
            f"gradient_accumulation_steps * world size = {micro} * {accum} * {world_size} = {micro * accum * world_size}: "
            "set train_batch_size to 'auto' or launch the matching number of processes"
        )


def _check_hpz(zero: dict, world_size: int | None) -> None:
    hpz = _int(zero.get("zero_hpz_partition_size"))
    if hpz is None or hpz == 1:
        return
    if hpz < 1:
        raise ValueError(f"zero_hpz_partition_size={hpz}: use a positive number of ranks (1 disables hpZ)")
    if world_size is not None and (hpz > world_size or world_size % hpz):
        raise ValueError(
            f"zero_hpz_partition_size={hpz} does not divide the world size {world_size}: hpZ keeps a "
            "secondary shard per group of that many ranks (usually the GPUs of one node); use a divisor "
            "of the world size, e.g. the GPUs per node"
        )


def check_deepspeed_config(
    config: dict | str | Path,
    *,
    model: nn.Module | None = None,
    world_size: int | None = None,
    device_type: str | None = None,
) -> dict:
    """Validate a DeepSpeed config for a qat model before any engine is built; returns the dict.

    Raises ``ValueError`` for settings that would upcast the packed codes, ZeRO++ options outside
    ZeRO-3, an hpZ partition that does not divide ``world_size``, a batch size that does not fit
    ``world_size``, and ZeRO++ communication on a device DeepSpeed implements it only for CUDA.
    ``model=None`` checks as if the model had QuantLinear layers. ``device_type`` defaults to
    "cuda" when CUDA is available, else "cpu".
    """
    config = load_config(config)
    zero = config.get("zero_optimization") or {}
    stage = _int(zero.get("stage", 0))
    if stage is not None and stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage={stage}: DeepSpeed has ZeRO stages 0-3")
    if _has_quant_layers(model):
        upcasting = [k for k in UPCASTING_KEYS if zero.get(k)]
        if upcasting:
            raise ValueError(
                f"DeepSpeed config sets {', '.join(upcasting)}: ZeRO++ would cast qat's packed int32 codes to "
                "fp16 and re-quantize them as weights, destroying them. qat's base already all-gathers packed "
                "(4-bit = 1/4 of bf16, less than ZeRO++'s int8 weights): set them to false and keep "
                "zero_quantized_gradients / zero_hpz_partition_size (scripts/accelerate/ds_zeropp.json)"
            )
    zeropp = [k for k in CUDA_ONLY_KEYS if zero.get(k)]
    hpz = _int(zero.get("zero_hpz_partition_size"))
    if hpz is not None and hpz > 1:
        zeropp.append("zero_hpz_partition_size")
    if zeropp and stage != 3:
        raise ValueError(f"{', '.join(zeropp)} are ZeRO++ options and need zero_optimization.stage=3 (got {stage})")
    _check_hpz(zero, world_size)
    if world_size is not None:
        _check_batch(config, world_size)
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if zeropp and device_type != "cuda":
        raise ValueError(
            f"{', '.join(zeropp)} (ZeRO++ quantized communication) run only on CUDA in DeepSpeed "
            f"(its kernels raise 'not implemented on CPU backend'); this run is on {device_type}: use "
            "ds_zero3.json here and ds_zeropp.json on a GPU cluster"
        )
    return config


def prepare_for_deepspeed(model: nn.Module) -> int:
    """Make a QuantLinear model safe for ZeRO-3; returns the number of QuantLinear leaf modules.

    Marks every QuantLinear a ZeRO-3 leaf (gathered with its adapter) and, when the input
    embeddings are frozen, makes their output require grad (see the module docstring). Call
    before ``deepspeed.initialize`` (or before the Trainer builds the engine). Harmless for
    ZeRO-0/1/2, which never partition parameters.
    """
    from deepspeed.utils import set_z3_leaf_modules

    if not any(isinstance(m, QuantLinear) for m in model.modules()):
        return 0
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    frozen = embeddings is not None and not any(p.requires_grad for p in embeddings.parameters())
    if frozen and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    return len(set_z3_leaf_modules(model, [QuantLinear]))


def check_engine_codes(model: nn.Module) -> None:
    """After ``deepspeed.initialize``: every QuantLinear's codes (and their ZeRO-3 shard) are int32.

    Catches a DeepSpeed or user cast that slipped past :func:`check_deepspeed_config`.
    """
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        p = layer.base_packed
        dtypes = {p.dtype}
        if hasattr(p, "ds_tensor"):
            dtypes.add(p.ds_tensor.dtype)
            if hasattr(p.ds_tensor, "ds_quant_scale"):
                dtypes.add(torch.int8)  # ZeRO++ holds it quantized: not our codes any more
        if dtypes != {torch.int32} or p.requires_grad:
            raise RuntimeError(
                f"{name}.base_packed is held as {sorted(map(str, dtypes))} (requires_grad={p.requires_grad}) "
                "after deepspeed.initialize; qat's packed codes must stay frozen int32"
            )
