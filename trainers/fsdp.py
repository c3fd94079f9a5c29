"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for QuantLinear models.

What FSDP2 already does right for qat (torch 2.13, read in ``_fully_shard/``):

- Frozen int32 ``base_packed`` parameters shard on dim 0 like any other parameter, and
  ``MixedPrecisionPolicy.param_dtype`` never touches them (``FSDPParam.init_dtype_attrs`` clamps
  the cast to floating parameters). A group mixing int32 codes with float steps is all-gathered
  as one uint8 byte buffer (``_get_all_gather_input_metadatas``): the codes travel packed, 4 bits
  per weight for a 4-bit base, with no upcast anywhere.
- Only trainable parameters need one dtype per group; the codes are frozen.

What we add: sharding per decoder block (so one block's codes are gathered at a time), the gloo
averaging workaround (sum, then FSDP's own division), the quantized reduce-scatter hook
(:class:`qat.trainers.comm.QuantizedReduceScatter`), and checks that fail before training.

Two entry points:
- :func:`shard_model` when you own the loop (tests, custom scripts);
- :func:`set_quantized_reduce_scatter` + :func:`check_packed_codes` for a model ``accelerate``
  already sharded (``fsdp_version: 2``): the Trainer calls them after ``accelerator.prepare``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from qat.quant_linear import QuantLinear
from qat.trainers.comm import DEFAULT_BUCKET, QuantizedReduceScatter, grad_bits


def transformer_block_classes(model: nn.Module) -> tuple[type, ...]:
    """Classes of the model's repeated blocks (``_no_split_modules``, e.g. LlamaDecoderLayer)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(
            f"{type(model).__name__} names no repeated block in _no_split_modules ({sorted(names)}): "
            "pass block_classes=(YourDecoderLayer,) to shard_model"
        )
    return tuple(classes)


def check_world_size(world_size: int, mesh_shape: tuple[int, ...] | None = None) -> None:
    """Raise before any sharding if ``world_size`` cannot run the requested layout.

    ``mesh_shape``: (shard,) for FSDP or (replicate, shard) for HSDP; its product must be the
    number of processes started (a mismatch otherwise surfaces as a hang or an opaque
    DeviceMesh error on some ranks only).
    """
    if world_size < 1:
        raise ValueError(f"world size {world_size}: start at least one process")
    if mesh_shape is not None:
        if any(int(d) < 1 for d in mesh_shape) or math.prod(mesh_shape) != world_size:
            raise ValueError(
                f"mesh shape {tuple(mesh_shape)} needs {math.prod(mesh_shape)} processes but {world_size} "
                "were started: launch with --nproc_per_node / num_processes equal to the product, or "
                "change the mesh shape (HSDP: (replicate, shard) with replicate * shard = world size)"
            )


def default_mesh(mesh_shape: tuple[int, ...] | None = None, device_type: str | None = None) -> DeviceMesh:
    """A 1-D (FSDP) or 2-D (HSDP) mesh over all ranks, on CUDA when available, else CPU (gloo)."""
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: launch with torchrun / accelerate launch, or call "
            "torch.distributed.init_process_group first"
        )
    world = dist.get_world_size()
    mesh_shape = tuple(mesh_shape or (world,))
    check_world_size(world, mesh_shape)
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    names = ("shard",) if len(mesh_shape) == 1 else ("replicate", "shard")
    return init_device_mesh(device_type, mesh_shape, mesh_dim_names=names)


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def check_packed_codes(model: nn.Module) -> None:
    """Raise if any QuantLinear's frozen codes were cast away from int32 or made trainable.

    Call after sharding (ours or accelerate's) and before the first step: a float copy of the
    codes would silently multiply memory and traffic by up to 8x and break export.
    """
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        p = layer.base_packed
        if p.dtype != torch.int32 or p.requires_grad:
            raise RuntimeError(
                f"{name}.base_packed is {p.dtype} (requires_grad={p.requires_grad}); the packed codes must "
                "stay frozen int32: something upcast them (a model.to(dtype) after quantize_model, or a "
                "sharding engine casting all parameters). Cast floats only: model.to(dtype) before quantize_model"
            )


def set_quantized_reduce_scatter(
    model: nn.Module, quantized_grads: str | None, *, bucket_size: int = DEFAULT_BUCKET, seed: int = 0
) -> int:
    """Route every FSDP2 unit's gradient reduce-scatter through int8 / int4 stochastic rounding.

    ``quantized_grads``: None (leave torch's reduce-scatter), "int8" or "int4". Works on any
    FSDP2-sharded model (ours or accelerate's). Returns the number of FSDP units changed.
    FSDP is told to reduce with SUM and divide afterwards, so the hook never needs AVG.
    """
    units = fsdp_modules(model)
    if quantized_grads is None:
        return 0
    bits = grad_bits(quantized_grads)
    if not units:
        raise ValueError("the model is not sharded with FSDP2 (fully_shard): shard it first")
    rank = dist.get_rank() if dist.is_initialized() else 0
    for unit in units:
        unit.set_custom_reduce_scatter(QuantizedReduceScatter(bits, bucket_size, seed=seed, rank=rank))
        unit.set_force_sum_reduction_for_comms(True)
    return len(units)


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh | None = None,
    *,
    quantized_grads: str | None = None,
    bucket_size: int = DEFAULT_BUCKET,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
    block_classes: tuple[type, ...] | None = None,
    seed: int = 0,
) -> nn.Module:
    """Shard a QuantLinear model with FSDP2, in place; returns the model (now an FSDPModule).

    Each repeated block is one FSDP unit (its codes, steps and adapters are gathered together,
    one block at a time); the root unit holds the rest (embeddings, final norm, head).
    ``quantized_grads``: None, "int8" or "int4" (see :func:`set_quantized_reduce_scatter`).
    On a CPU mesh (gloo) FSDP reduces with SUM and divides itself: gloo's AVG has been wrong
    before, and the tests check the averaged gradients against a single-process run.
    """
    if quantized_grads is not None:
        grad_bits(quantized_grads)  # fail on a bad setting before any sharding
    mesh = mesh if mesh is not None else default_mesh()
    check_world_size(dist.get_world_size(), tuple(mesh.shape))
    check_packed_codes(model)
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy or MixedPrecisionPolicy())
    blocks = block_classes or transformer_block_classes(model)
    for module in [m for m in model.modules() if isinstance(m, blocks)]:
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    if mesh.device_type == "cpu":
        for unit in fsdp_modules(model):
            unit.set_force_sum_reduction_for_comms(True)
    set_quantized_reduce_scatter(model, quantized_grads, bucket_size=bucket_size, seed=seed)
    check_packed_codes(model)
    return model
