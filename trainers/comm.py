"""Quantized gradient communication for FSDP2 (QSDP-style) and a byte counter for collectives.

FSDP2 reduce-scatters one flat gradient buffer per parameter group: ``input`` [world * n] in the
reduce dtype, rank ``r`` keeps ``output`` [n] = sum (or mean) over ranks of chunk ``r``. torch's
own collective always moves the reduce dtype (fp32 or bf16). :class:`QuantizedReduceScatter`
plugs into ``FSDPModule.set_custom_reduce_scatter`` and moves int8 or int4 codes instead:

    chunk j of the input   [world, n] -> buckets [world, nb, B]   (n padded to nb * B)
    step per bucket        s = max|x| / qmax                     qmax = 127 (int8), 7 (int4)
    stochastic rounding    q = floor(x / s + u),  u ~ U[0, 1)    E[s * q] = x  (unbiased)
    all_to_all             codes (1 or 1/2 byte per value) + one fp32 step per bucket
    receiver               output = sum_j s_j * q_j              (exact integer grid, fp32 sum)

Unbiased rounding is what QSDP's convergence argument needs: the reduced gradient is the true
gradient plus zero-mean noise of at most one step per value and rank. ``|x / s| <= qmax`` so
``floor(x / s + u)`` never leaves [-qmax, qmax]: no clamping, hence no bias.

Why our own code: torch has no quantized reduce-scatter, and DeepSpeed's (ZeRO++ qgZ) is a CUDA
kernel tied to DeepSpeed's engine. All ranks take part in one ``all_to_all_single``, which gloo
(CPU) and NCCL (GPU) both implement.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

GRAD_BITS = {"int8": 8, "int4": 4}
DEFAULT_BUCKET = 512  # values per step; the fp32 step costs 4 / (B * bits / 8) of the payload


def grad_bits(kind: str) -> int:
    """``"int8"`` -> 8, ``"int4"`` -> 4, with a clear error for anything else."""
    if kind not in GRAD_BITS:
        raise ValueError(f"quantized_grads={kind!r}: use one of {sorted(GRAD_BITS)} or None (no quantization)")
    return GRAD_BITS[kind]


# ----------------------------------------------------------------------------- quantizer
def stochastic_quantize(
    x: torch.Tensor, bits: int, bucket: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] float -> (codes [..., nb, bucket] int8 in [-qmax, qmax], steps [..., nb] fp32).

    ``n`` is zero-padded to ``nb * bucket``; the padding quantizes to code 0.
    """
    qmax = 2 ** (bits - 1) - 1
    n = x.shape[-1]
    nb = math.ceil(n / bucket)
    xf = torch.nn.functional.pad(x.float(), (0, nb * bucket - n)).reshape(*x.shape[:-1], nb, bucket)
    step = xf.abs().amax(dim=-1) / qmax  # [..., nb]
    step = torch.where(step > 0, step, torch.ones_like(step))  # an all-zero bucket: any step, codes 0
    u = torch.rand(xf.shape, generator=generator, device=x.device, dtype=torch.float32)
    codes = torch.floor(xf / step.unsqueeze(-1) + u)
    return codes.to(torch.int8), step


def dequantize_buckets(codes: torch.Tensor, step: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`stochastic_quantize` (up to the rounding): [..., nb, B] -> [..., n] fp32."""
    x = codes.float() * step.unsqueeze(-1)
    return x.reshape(*codes.shape[:-2], -1)[..., :n]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int4 codes [..., m] (m even, values in [-8, 7]) -> uint8 [..., m / 2], two per byte."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., m / 2] -> int8 codes [..., m]."""
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).flatten(-2)


def payload_bytes(n: int, bits: int, bucket: int) -> int:
    """Bytes one chunk of ``n`` values occupies on the wire: codes + one fp32 step per bucket."""
    nb = math.ceil(n / bucket)
    return nb * bucket * bits // 8 + 4 * nb


# ----------------------------------------------------------------------------- FSDP2 hook
class QuantizedReduceScatter(ReduceScatter):
    """FSDP2 custom reduce-scatter moving stochastically rounded int8 / int4 gradients.

    ``seed`` and the rank seed a private generator, so runs are reproducible while each rank's
    rounding noise is independent of the others' (correlated noise would not average out).
    Use through :func:`qat.trainers.fsdp.shard_model` (``quantized_grads="int8"|"int4"``),
    which also makes FSDP reduce with SUM and divide afterwards.
    """

    def __init__(self, bits: int = 8, bucket: int = DEFAULT_BUCKET, seed: int = 0, rank: int = 0):
        if bits not in (4, 8):
            raise ValueError(f"quantized reduce-scatter takes 8 or 4 bits, got {bits}")
        if bucket < 2 or bucket % 2:
            raise ValueError(f"bucket size {bucket}: use an even number >= 2 (int4 packs two codes per byte)")
        self.bits, self.bucket, self.seed, self.rank = bits, bucket, seed, rank
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed * 1_000_003 + self.rank)
            self._generators[device] = g
        return self._generators[device]

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op: bool = False):
        world = dist.get_world_size(group)
        n = output_tensor.numel()
        chunks = input_tensor.view(world, n)  # chunk j: rank j's share of the gradient
        codes, step = stochastic_quantize(chunks, self.bits, self.bucket, self._generator(input_tensor.device))
        nb = step.shape[-1]
        wire = codes.reshape(world, -1)  # [world, nb * B] int8
        if self.bits == 4:
            wire = pack_nibbles(wire)  # [world, nb * B / 2] uint8
        wire_in = torch.empty_like(wire)
        step_in = torch.empty_like(step)
        dist.all_to_all_single(wire_in, wire.contiguous(), group=group)
        dist.all_to_all_single(step_in, step.contiguous(), group=group)
        received = wire_in if self.bits == 8 else unpack_nibbles(wire_in)  # [world, nb * B] int8
        parts = dequantize_buckets(received.view(world, nb, self.bucket), step_in, n)  # [world, n]
        total = parts.sum(dim=0)
        if op == dist.ReduceOp.AVG:
            total = total / world
        elif op != dist.ReduceOp.SUM:
            raise NotImplementedError(
                f"quantized reduce-scatter implements SUM and AVG, got {op}; shard_model sets "
                "force_sum_reduction_for_comms so FSDP divides after the reduction"
            )
        output_tensor.copy_(total.to(output_tensor.dtype))
        return None  # already complete: FSDP ignores the return of a synchronous call


# ----------------------------------------------------------------------------- byte counting
_COUNTED = {
    # name in torch.distributed -> (kind, which argument holds the bytes that define the traffic)
    "all_gather_single": ("all_gather", "output"),
    "all_gather_into_tensor": ("all_gather", "output"),
    "reduce_scatter_single": ("reduce_scatter", "input"),
    "reduce_scatter_tensor": ("reduce_scatter", "input"),
    "all_to_all_single": ("all_to_all", "input"),
    "all_reduce": ("all_reduce", "input"),
}


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


@contextlib.contextmanager
def count_collective_bytes():
    """Count the bytes of every collective called through ``torch.distributed`` in the block.

    Yields a dict ``{kind: bytes}`` filled as calls happen (``{kind}_calls``: how many calls,
    ``{kind}_sizes``: the bytes of each call, in order). all-gather counts the *gathered*
    (unsharded) buffer, reduce-scatter and all-to-all the *input* (unsharded) buffer: the bytes
    of full parameters / gradients each rank moves through the collective, the quantity bf16
    vs packed vs quantized traffic is compared on (the wire moves (world-1)/world of it).
    FSDP2 and our hook look these functions up on the module at call time, so patching the
    module attributes sees every call.
    """
    counts: dict = defaultdict(int)
    originals = {}

    def wrap(name, kind, which):
        fn = getattr(dist, name)

        def counted(*args, **kwargs):
            if which == "output":
                t = kwargs.get("output_tensor", kwargs.get("output", args[0] if args else None))
            elif name == "all_reduce":
                t = kwargs.get("tensor", args[0] if args else None)
            else:
                t = kwargs.get("input_tensor", kwargs.get("input", args[1] if len(args) > 1 else None))
            counts[kind] += _nbytes(t)
            counts[f"{kind}_calls"] += 1
            counts.setdefault(f"{kind}_sizes", []).append(_nbytes(t))
            return fn(*args, **kwargs)

        return fn, counted

    for name, (kind, which) in _COUNTED.items():
        if hasattr(dist, name):
            originals[name], patched = wrap(name, kind, which)
            setattr(dist, name, patched)
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
