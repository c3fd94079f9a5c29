"""Triton kernel: the Walsh-Hadamard transform of activation rows in one pass through memory.

    z = scale * x H_n^T     (or scale * x H_n with transpose=True)     x, z [T, n]
    H_n = kron(H_K, Syl_P),  n = K * P,  P = 2^m                       (qat.hadamard)

Each program loads a [BLOCK_T, K_PAD, P] tile of rows (row index t, column k * P + p; K_PAD is K
rounded up to a power of two, the padding masked to zero), transforms it in registers and
stores it once, so the [T, n] activation is read once and written once. The torch reference
(``qat.hadamard.fwht``) runs as several GEMMs with a transpose between them, each
writing a [T, n] intermediate.

    Sylvester factor (axis p)   m = log2 P constant-geometry butterfly stages: each pairs
                                neighbours (v[2i], v[2i+1]) and writes the sum to position i and
                                the difference to P/2 + i. After m stages every bit of p has been
                                butterflied once and the order is natural: v Syl_P exactly, one
                                fp32 addition per element per stage.
    H_K factor (axis k, K > 1)  a [BLOCK_T * P, K_PAD] x [K_PAD, K_PAD] tl.dot with H_K^T (or
                                H_K) zero-padded, loaded from a small tensor: K is 12, 20, 28, ...,
                                never a power of two, so no butterfly network exists for it.

Why butterflies for the Sylvester part rather than tl.dot with small Sylvester blocks: they
work for every P (tl.dot needs each side >= 16, and n = 12 * 8 has P = 8), they round log2 P
times per element instead of once per term of a b-wide dot, and they do m additions per element
instead of sum(b_i) multiply-adds. The price is a register shuffle per stage (reshape, split,
join, permute); whether that shuffle or the dot's tensor-core path is faster on a GPU has not
been measured (docs/KERNELS.md).

Accumulation is fp32 whatever the input dtype (fp32, fp16, bf16); the optional scale is
applied once before the store, in the output dtype's rounding. Import lazily, after setting
TRITON_INTERPRET for CPU tests (as ``qat.kernels.triton_common``).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl

from qat.hadamard import small_hadamard
from qat.kernels.support import fwht_tile
from qat.kernels.triton_common import INTERPRETED, TL_DTYPES, cast

# Target elements of one program's tile (BLOCK_T * K_PAD * P fp32 values held in registers;
# one row may exceed it, up to support.FWHT_MAX_ROW): with the launcher's warp count, 32 values
# a thread. Untuned (no GPU has run this yet).
TILE_ELEMS = 8192


@triton.jit
def _sylvester(v, R: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr):
    """v [R, P] -> v Syl_P (Syl_P symmetric, natural order) by LOG_P constant-geometry stages."""
    for _ in tl.static_range(LOG_P):
        a, b = tl.split(tl.reshape(v, (R, P // 2, 2)))          # v[:, 0::2], v[:, 1::2]: [R, P/2]
        pair = tl.join(a + b, a - b)                              # [R, P/2, 2]
        v = tl.reshape(tl.permute(pair, (0, 2, 1)), (R, P))       # sums in [0, P/2), diffs after
    return v


@triton.jit
def _fwht_kernel(
    x_ptr, z_ptr, hk_ptr, T, stride_x, stride_z, scale,
    K: tl.constexpr, K_PAD: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr,
    HAS_SCALE: tl.constexpr, OUT_DTYPE: tl.constexpr, INTERP: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """z[t, k * P + p] for BLOCK_T rows; hk_ptr is the [K_PAD, K_PAD] fp32 right factor."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, K_PAD)
    offs_p = tl.arange(0, P)
    rows = offs_t.to(tl.int64)[:, None, None]                                  # [BT, 1, 1]
    cols = (offs_k[:, None] * P + offs_p[None, :])[None, :, :]                  # [1, KP, P]
    # the p term is all true: it only gives the mask the tile's full [BT, KP, P] shape
    mask = (offs_t < T)[:, None, None] & (offs_k < K)[None, :, None] & (offs_p < P)[None, None, :]
    x = tl.load(x_ptr + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    v = _sylvester(tl.reshape(x, (BLOCK_T * K_PAD, P)), BLOCK_T * K_PAD, P, LOG_P)
    if K > 1:
        # k to the last axis: [BT, KP, P] -> [BT * P, KP], times the padded H_K factor.
        v = tl.reshape(tl.permute(tl.reshape(v, (BLOCK_T, K_PAD, P)), (0, 2, 1)), (BLOCK_T * P, K_PAD))
        h = tl.load(hk_ptr + offs_k[:, None] * K_PAD + offs_k[None, :])           # [KP, KP]
        v = tl.dot(v, h, input_precision="ieee")                                   # [BT * P, KP]
        v = tl.permute(tl.reshape(v, (BLOCK_T, P, K_PAD)), (0, 2, 1))             # [BT, KP, P]
    v = tl.reshape(v, (BLOCK_T, K_PAD, P))
    if HAS_SCALE:
        v = v * scale
    tl.store(z_ptr + rows * stride_z + cols, cast(v, OUT_DTYPE, INTERP), mask=mask)


@lru_cache(maxsize=None)
def _hk_factor(k: int, k_pad: int, transpose: bool, device: torch.device) -> torch.Tensor:
    """The [K_PAD, K_PAD] fp32 right factor B of the k axis, zero-padded: x H^T needs
    z_k = sum_j x_j H_K[k, j], i.e. B = H_K^T; x H needs B = H_K. Entries +-1 are exact."""
    h = torch.zeros(k_pad, k_pad, dtype=torch.float32)
    hk = small_hadamard(k).float()
    h[:k, :k] = hk if transpose else hk.t()
    return h.to(device)


def block_rows(t: int, k_pad: int, p: int, k: int) -> int:
    """Rows per program: fill TILE_ELEMS, at most the (power-of-two) row count, and at least
    16 / P rows when the H_K dot runs (tl.dot needs 16 rows)."""
    rows = max(1, TILE_ELEMS // (k_pad * p))
    rows = min(rows, triton.next_power_of_2(max(t, 1)))
    if k > 1:
        rows = max(rows, triton.next_power_of_2(triton.cdiv(16, p)))
    return rows


def launch_fwht(x: torch.Tensor, transpose: bool = False, scale: float = 1.0, out_dtype=None,
                block_t: int | None = None) -> torch.Tensor:
    """x [..., n] -> scale * x H_n^T (transpose False) or scale * x H_n, [..., n] in
    ``out_dtype`` (default x's). The semantics of ``qat::fwht``; n must pass ``fwht_tile``."""
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if x.dtype not in TL_DTYPES or out_dtype not in TL_DTYPES:
        raise ValueError(f"the fwht kernel takes fp32/fp16/bf16, got {x.dtype} -> {out_dtype}")
    n = x.shape[-1]
    tile = fwht_tile(n)
    if tile is None:
        raise ValueError(f"width {n} has no fwht kernel tile: use qat.hadamard.fwht")
    k, k_pad, p = tile
    x2 = x.reshape(-1, n)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    t = x2.shape[0]
    z = torch.empty(t, n, dtype=out_dtype, device=x.device)
    if t == 0:
        return z.reshape(x.shape)
    hk = _hk_factor(k, k_pad, bool(transpose), x.device) if k > 1 else x2  # x2: never read
    bt = block_t or block_rows(t, k_pad, p, k)
    elems = bt * k_pad * p
    warps = 4 if elems <= 4096 else (8 if elems <= 8192 else 16)  # <= 32 values a thread; untuned
    _fwht_kernel[(triton.cdiv(t, bt),)](
        x2, z, hk, t, x2.stride(0), z.stride(0), float(scale),
        K=k, K_PAD=k_pad, P=p, LOG_P=p.bit_length() - 1, HAS_SCALE=scale != 1.0,
        OUT_DTYPE=TL_DTYPES[out_dtype], INTERP=INTERPRETED, BLOCK_T=bt, num_warps=warps)
    return z.reshape(x.shape)
