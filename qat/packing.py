"""Pack 1-8 bit integer codes into int32 words: the compressed-tensors >= 0.18 layout.

Layout (DESIGN section 3): along the packed dimension, element ``i`` occupies global bits
``[i*b, (i+1)*b)`` of the row's bit stream, least significant bit first, words filled from bit 0,
an element crossing a word boundary split across both words. A code ``q`` is stored as the
unsigned value ``q + 2^(b-1)``. A row of ``n`` codes takes ``ceil(n*b/32)`` words.

Written here rather than imported from compressed-tensors because the trainer packs and
unpacks on every forward of every layer (and under FSDP/DeepSpeed, on sharded rows); the
tests check bit-identity with the package's own ``pack_to_int32`` for every width.
"""

from __future__ import annotations

import math

import torch


def packed_width(n: int, bits: int) -> int:
    """int32 words needed for ``n`` codes of ``bits`` bits."""
    return math.ceil(n * bits / 32)


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"packing takes integer widths 1..8, got {bits!r}")


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed codes [rows, n] (any int dtype, values in [-2^(b-1), 2^(b-1)-1]) to int32.

    ``dim=1`` packs along the rows (weights); ``dim=0`` along the columns (zero points).
    """
    check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack_int32 takes a 2-D tensor, got shape {tuple(codes.shape)}")
    if dim == 0:
        return pack_int32(codes.t(), bits, 1).t().contiguous()
    rows, n = codes.shape
    n_words = packed_width(n, bits)
    # Unsigned values in int64 so shifts past bit 31 are exact.
    u = (codes.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    start = torch.arange(n, device=codes.device, dtype=torch.int64) * bits  # [n] first bit
    word = start // 32
    offset = start % 32
    # Low part into its own word; the part past bit 31 (if any) into the next word.
    # The bit ranges of different elements never overlap, so a sum is a bitwise OR.
    acc = torch.zeros(rows, n_words + 1, dtype=torch.int64, device=codes.device)
    shifted = u << offset  # [rows, n], up to 39 bits
    acc.index_add_(1, word, shifted & 0xFFFFFFFF)
    acc.index_add_(1, word + 1, shifted >> 32)
    acc = acc[:, :n_words]
    # Reinterpret the low 32 bits as a signed int32 (two's complement).
    acc = torch.where(acc >= (1 << 31), acc - (1 << 32), acc)
    return acc.to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 words -> signed int8 codes with ``n`` per row."""
    check_bits(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed codes must be int32, got {packed.dtype}")
    if dim == 0:
        return unpack_int32(packed.t(), bits, n, 1).t().contiguous()
    rows, n_words = packed.shape
    if n_words != packed_width(n, bits):
        raise ValueError(
            f"packed width {n_words} does not hold {n} codes of {bits} bits "
            f"(expected {packed_width(n, bits)} words): the checkpoint is truncated or the shape is wrong"
        )
    if 32 % bits == 0:
        return _unpack_aligned(packed, bits, n)
    words = packed.to(torch.int64) & 0xFFFFFFFF  # unsigned view
    # Append a zero word so the "next word" of the last element is always addressable.
    words = torch.cat([words, torch.zeros(rows, 1, dtype=torch.int64, device=packed.device)], 1)
    start = torch.arange(n, device=packed.device, dtype=torch.int64) * bits
    word = start // 32
    offset = start % 32
    both = words[:, word] | (words[:, word + 1] << 32)  # 64-bit window holding the element
    u = (both >> offset) & ((1 << bits) - 1)
    return (u - (1 << (bits - 1))).to(torch.int8)


def _unpack_aligned(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Widths dividing 32 (1, 2, 4, 8): no code crosses a word, so one shift-and-mask per code.

    The general path above (int64 windows, two gathers) costs 2-9x more, and every QuantLinear
    forward and backward unpacks its whole base (about 1.5 s of a 17 s step of a 100M Llama on CPU).
    """
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)  # [per_word]
    # An arithmetic shift of a negative word fills with ones; the mask keeps only the code's bits.
    u = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [rows, n_words, per_word]
    u = u.reshape(packed.shape[0], -1)[:, :n]
    return (u - (1 << (bits - 1))).to(torch.int8)
