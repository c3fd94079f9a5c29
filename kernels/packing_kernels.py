"""Triton kernels: pack signed 1-8 bit codes into int32 words and unpack them, in the layout of
``qat.packing`` (compressed-tensors >= 0.18, DESIGN section 3), bit for bit.

    element i of a row occupies global bits [i*b, (i+1)*b) of the row's bit stream, LSB first;
    word w holds bits [32w, 32w + 32); a code q is stored as q + 2^(b-1); for b in 3, 5, 6, 7
    an element may straddle two words (its low bits end word w, its high bits start w + 1).

Both kernels give one program a [BLOCK_R, BLOCK_W] tile of words (rows x words) and a third,
static axis of PER codes per word:

    pack    word w gathers the codes that touch it: e = floor(32w / b) + j, j < PER, while
            e*b < 32w + 32. The first one may have started in word w - 1 (shift e*b - 32w < 0:
            its high part, u >> -shift); the last may run past bit 31 (its low part, masked to
            32 bits). The bit ranges are disjoint, so a sum over j is their OR.
    unpack  word w emits the codes that start in it: e = ceil(32w / b) + j, while e*b < 32w + 32,
            each cut from the 64-bit window word w | word (w + 1) << 32, so a straddling code
            takes its high bits from the next word.

Arithmetic is int64 so that shifts past bit 31 are exact; the finished word in [0, 2^32) is
cast to int32, a truncation to its low 32 bits, so bit 31 becomes the sign (two's complement).

Why a module of its own rather than ``triton_kernels.py``: the weight kernels there unpack
inside their W_hat tiles and never write codes out; these kernels are the standalone pack /
unpack of ``qat::pack_int32`` / ``qat::unpack_int32``, with no float arithmetic, no step tensors
and their own tiling. Keeping them apart keeps both files readable (as ``hadamard_kernels.py``).

Rows may be strided: ``dim=0`` (zero points, packed along the columns) runs the same kernels on
the transposed view without a copy. Import lazily, after setting TRITON_INTERPRET for CPU tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qat.kernels.support import PACK_DTYPES  # integer codes the pack kernel reads
from qat.packing import check_bits, packed_width
# Lanes (words x codes per word) per row of a tile: with BLOCK_R rows, 8 x 512 int64 lanes,
# about 32 int64 registers per thread at 4 warps. A guess: untuned, no GPU was lent.
_LANES_PER_ROW = 512


@triton.jit
def _pack_kernel(codes_ptr, out_ptr, R, N, WORDS, stride_cr, stride_cn, stride_or, stride_ow,
                 BITS: tl.constexpr, PER: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """out[r, w] (int32) for a [BLOCK_R, BLOCK_W] tile of words from codes [R, N]."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)            # [BR]
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)            # [BW]
    w64 = offs_w.to(tl.int64)
    e = (w64 * 32 // BITS)[:, None] + tl.arange(0, PER)[None, :]           # [BW, PER] element
    shift = e * BITS - w64[:, None] * 32      # [BW, PER]: its bit 0 within word w, in (-BITS, 32)
    touches = (shift < 32) & (e < N)
    mask_rw = (offs_r < R)[:, None] & (offs_w < WORDS)[None, :]            # [BR, BW]
    mask = mask_rw[:, :, None] & touches[None, :, :]                       # [BR, BW, PER]
    ptrs = codes_ptr + offs_r.to(tl.int64)[:, None, None] * stride_cr + e[None, :, :] * stride_cn
    c = tl.load(ptrs, mask=mask, other=0).to(tl.int64)
    u = tl.where(mask, (c + (1 << (BITS - 1))) & ((1 << BITS) - 1), 0)    # unsigned code
    sh = shift[None, :, :]
    # A code that started in word w - 1 contributes its high part, one running past bit 31 its
    # low part; both clamps keep the unused branch's shift amount in range.
    part = tl.where(sh >= 0, u << tl.maximum(sh, 0), u >> tl.maximum(-sh, 0)) & 0xFFFFFFFF
    word = tl.sum(part, axis=2)               # [BR, BW] in [0, 2^32): disjoint ranges, sum == OR
    out = out_ptr + offs_r.to(tl.int64)[:, None] * stride_or + w64[None, :] * stride_ow
    # int64 -> int32 keeps the low 32 bits (a truncation, compiled and interpreted): bit 31
    # becomes the sign, two's complement, as the reference's explicit wrap.
    tl.store(out, word.to(tl.int32), mask=mask_rw)


@triton.jit
def _unpack_kernel(packed_ptr, out_ptr, R, N, WORDS, stride_pr, stride_pw, stride_or, stride_on,
                   BITS: tl.constexpr, PER: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """out[r, e] (int8) for the codes starting in a [BLOCK_R, BLOCK_W] tile of words [R, WORDS]."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)            # [BR]
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)            # [BW]
    w64 = offs_w.to(tl.int64)
    mask_rw = (offs_r < R)[:, None] & (offs_w < WORDS)[None, :]            # [BR, BW]
    ptrs = packed_ptr + offs_r.to(tl.int64)[:, None] * stride_pr + w64[None, :] * stride_pw
    lo = tl.load(ptrs, mask=mask_rw, other=0).to(tl.int64) & 0xFFFFFFFF   # unsigned word w
    has_next = mask_rw & (offs_w + 1 < WORDS)[None, :]
    hi = tl.load(ptrs + stride_pw, mask=has_next, other=0).to(tl.int64) & 0xFFFFFFFF
    window = (lo | (hi << 32))[:, :, None]    # [BR, BW, 1]: bits 32w .. 32w + 63 of the row
    e = ((w64 * 32 + BITS - 1) // BITS)[:, None] + tl.arange(0, PER)[None, :]  # [BW, PER]
    shift = e * BITS - w64[:, None] * 32      # [BW, PER]: the code's bit 0 in the window, >= 0
    starts = (shift < 32) & (e < N)
    u = (window >> tl.minimum(shift, 32)[None, :, :]) & ((1 << BITS) - 1)  # [BR, BW, PER]
    q = (u - (1 << (BITS - 1))).to(tl.int8)
    out = out_ptr + offs_r.to(tl.int64)[:, None, None] * stride_or + e[None, :, :] * stride_on
    tl.store(out, q, mask=mask_rw[:, :, None] & starts[None, :, :])


# --------------------------------------------------------------------------- launchers
def codes_per_word(bits: int, pack: bool) -> int:
    """PER, the static third axis: codes touching a word (pack) or starting in it (unpack),
    at most, rounded up to a power of two. Touching: 32/b for widths dividing 32, else up to
    32//b + 2 (a straddler at each end); starting: ceil(32/b)."""
    if pack:
        most = 32 // bits if 32 % bits == 0 else 32 // bits + 2
    else:
        most = -(-32 // bits)
    return triton.next_power_of_2(most)


def _tile(per: int, block_r: int, block_w: int | None) -> tuple[int, int]:
    return block_r, block_w or max(1, _LANES_PER_ROW // per)


def launch_pack_int32(codes: torch.Tensor, bits: int, dim: int = 1,
                      block_r: int = 8, block_w: int | None = None) -> torch.Tensor:
    """``qat.packing.pack_int32`` on the GPU (or the interpreter): codes [rows, n], any integer
    dtype of ``PACK_DTYPES`` -> int32 [rows, ceil(n*b/32)] (dim=1) or [ceil(rows*b/32), n]
    (dim=0), contiguous, bit for bit as the reference."""
    check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack_int32 takes a 2-D tensor, got shape {tuple(codes.shape)}")
    if codes.dtype not in PACK_DTYPES:
        raise ValueError(f"the pack kernel takes integer codes {PACK_DTYPES}, got {codes.dtype}")
    src = codes.t() if dim == 0 else codes            # [R, N] view, packed along N
    r, n = src.shape
    words = packed_width(n, bits)
    out = torch.empty((words, r) if dim == 0 else (r, words), dtype=torch.int32, device=codes.device)
    view = out.t() if dim == 0 else out               # [R, words] view of the output
    if r and words:
        per = codes_per_word(bits, pack=True)
        br, bw = _tile(per, block_r, block_w)
        grid = (triton.cdiv(r, br), triton.cdiv(words, bw))
        _pack_kernel[grid](src, view, r, n, words, src.stride(0), src.stride(1), view.stride(0),
                           view.stride(1), BITS=bits, PER=per, BLOCK_R=br, BLOCK_W=bw)
    return out


def launch_unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int = 1,
                        block_r: int = 8, block_w: int | None = None) -> torch.Tensor:
    """``qat.packing.unpack_int32`` on the GPU (or the interpreter): int32 words -> int8 codes,
    ``n`` per row (dim=1, [rows, n]) or per column (dim=0, [n, cols]), contiguous."""
    check_bits(bits)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed codes must be int32, got {packed.dtype}")
    src = packed.t() if dim == 0 else packed          # [R, words] view
    r, words = src.shape
    if words != packed_width(n, bits):
        raise ValueError(
            f"packed width {words} does not hold {n} codes of {bits} bits "
            f"(expected {packed_width(n, bits)} words): the checkpoint is truncated or the shape is wrong"
        )
    out = torch.empty((n, r) if dim == 0 else (r, n), dtype=torch.int8, device=packed.device)
    view = out.t() if dim == 0 else out               # [R, n] view of the output
    if r and words:
        per = codes_per_word(bits, pack=False)
        br, bw = _tile(per, block_r, block_w)
        grid = (triton.cdiv(r, br), triton.cdiv(words, bw))
        _unpack_kernel[grid](src, view, r, n, words, src.stride(0), src.stride(1), view.stride(0),
                             view.stride(1), BITS=bits, PER=per, BLOCK_R=br, BLOCK_W=bw)
    return out
