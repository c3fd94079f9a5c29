"""Triton kernels: packed base -> W_hat (dequant + delta + fake-quant), fused into the matmuls.

    W0    = s0 * (q0 - z0)                      q0 unpacked from int32 words (cross-word layout)
    D     = a dense delta [out, in], or for a plain LoRA scaling * B A formed per tile in
            registers from A [r, in] and B [out, r] (a fixed fma chain over r, _lora_tile)
    W_hat = s * (clamp(round((W0 + D) / s) + z) - z)
    y     = x @ W_hat^T          dX = grad_y @ W_hat          codes = clamp(round((W0 + D)/s) + z)

W_hat tiles are computed on the fly from the packed codes and steps inside the matmul loops;
no dense weight is ever written to global memory by the fused kernels. Arithmetic matches
``qat.primitives`` bit for bit for W_hat: the base is dequantized in fp32, the division is
round-to-nearest (``div_rn``, not the approximate ``/``), rounding is half-to-even like
``torch.round`` and the products ``(q - z) * s`` are formed exactly in fp32 before the single
rounding to the output dtype (as the reference's one multiply in the scale dtype). Matmuls
accumulate in fp32. The in-register LoRA D matches torch's ``(B @ A) * scaling`` only where
torch's matmul sums in the same fma order (it does for small r on MKL CPUs; other BLAS may
not), so export takes its codes from ``quant_codes``, the same D as training's W_hat.

This module imports triton at import time: import it lazily (``qat.kernels.dispatch`` does)
and, for CPU tests, only after setting ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from qat.kernels.ops import check_one_delta

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)
# triton.jit picks the interpreter when it decorates, i.e. at this module's import.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _rne_bf16(x):
    """fp32 -> fp32 holding the nearest bf16, ties to even (the interpreter's cast truncates)."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _cast(x, DTYPE: tl.constexpr, INTERP: tl.constexpr):
    """x.to(DTYPE) rounding to nearest even, also under the interpreter."""
    if INTERP:
        if DTYPE == tl.bfloat16:
            x = _rne_bf16(x.to(tl.float32))
    return x.to(DTYPE)


@triton.jit
def _round_half_even(x):
    """torch.round semantics (ties to even), portable (no libdevice, works in the interpreter)."""
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _lora_tile(offs_n, offs_k, mask_n, mask_k, a_ptr, b_ptr, K, lora_scaling,
               RANK: tl.constexpr, LORA_DTYPE: tl.constexpr, INTERP: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """D[offs_n, offs_k] = scaling * (B[offs_n, :] @ A[:, offs_k]) in fp32 registers, [BN, BK];
    A [RANK, K] and B [N, RANK] row-major. No dense D exists anywhere.

    A static loop of RANK fused multiply-adds, j = 0 .. RANK-1, rather than tl.dot over a rank
    padded to 16: every element of D is then one fixed sequence of IEEE operations (tl.fma
    rounds once, on every GPU and in the interpreter; a plain ``acc + b * a`` is left to the
    compiler's fp-fusion choice), whatever the tile shape or the kernel. So the forward, dX,
    grads and codes kernels see the same D bit for bit, which the exporter relies on (train
    what you export); tl.dot's internal order is the compiler's and may change with the tile.
    It also costs RANK FMAs per element instead of max(16, pow2(RANK)).
    Rounding as torch's ``(B @ A) * scaling`` in the factors' dtype: the sum is rounded to
    LORA_DTYPE, multiplied by scaling in fp32 and rounded again (no-ops for fp32 factors)."""
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    rows = offs_n.to(tl.int64) * RANK
    for j in tl.static_range(RANK):
        b = tl.load(b_ptr + rows + j, mask=mask_n, other=0.0).to(tl.float32)        # [BN]
        a = tl.load(a_ptr + j * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)  # [BK]
        acc = tl.fma(b[:, None], a[None, :], acc)
    acc = _cast(acc, LORA_DTYPE, INTERP).to(tl.float32)
    return _cast(acc * lora_scaling, LORA_DTYPE, INTERP).to(tl.float32)


@triton.jit
def _pre_quant_tile(
    offs_n, offs_k, mask_n, mask_k,
    packed_ptr, bscale_ptr, bzero_ptr, delta_ptr, a_ptr, b_ptr,
    K, WORDS, N_GROUPS, stride_dn, lora_scaling,
    BITS: tl.constexpr, SQMIN: tl.constexpr, SQMAX: tl.constexpr, GROUP: tl.constexpr,
    HAS_BZERO: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_LORA: tl.constexpr,
    RANK: tl.constexpr, LORA_DTYPE: tl.constexpr, BASE_DTYPE: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """(W0 + D)[offs_n, offs_k] in fp32 (W0 rounded to the base dtype first, as the reference),
    and the [BN, BK] int64 index of each element's group in the [out, G] step tensors.
    D is read from the dense delta (HAS_DELTA) or formed from the LoRA factors (HAS_LORA)."""
    mask = mask_n[:, None] & mask_k[None, :]
    rows = offs_n.to(tl.int64)[:, None]
    # Element k occupies global bits [k*b, (k+1)*b) of its row, LSB first, maybe in two words.
    start = offs_k.to(tl.int64) * BITS
    word = (start // 32)[None, :]
    off = (start % 32)[None, :]
    lo = tl.load(packed_ptr + rows * WORDS + word, mask=mask, other=0).to(tl.int64) & 0xFFFFFFFF
    hi = tl.load(packed_ptr + rows * WORDS + word + 1, mask=mask & (word + 1 < WORDS), other=0)
    hi = hi.to(tl.int64) & 0xFFFFFFFF
    u = ((lo | (hi << 32)) >> off) & ((1 << BITS) - 1)
    q0 = (u - (1 << (BITS - 1))).to(tl.float32)
    gidx = rows * N_GROUPS + (offs_k // GROUP)[None, :]
    s0 = tl.load(bscale_ptr + gidx, mask=mask, other=1.0).to(tl.float32)
    if HAS_BZERO:
        z0 = tl.load(bzero_ptr + gidx, mask=mask, other=0.0).to(tl.float32)
        z0 = tl.minimum(tl.maximum(_round_half_even(z0), SQMIN), SQMAX)
        q0 = q0 - z0
    w = _cast(q0 * s0, BASE_DTYPE, INTERP).to(tl.float32)
    if HAS_DELTA:
        w += tl.load(delta_ptr + rows * stride_dn + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_LORA:
        w += _lora_tile(offs_n, offs_k, mask_n, mask_k, a_ptr, b_ptr, K, lora_scaling, RANK,
                        LORA_DTYPE, INTERP, BLOCK_N, BLOCK_K)
    return w, gidx


@triton.jit
def _steps_tile(w, gidx, mask, wscale_ptr, wzero_ptr,
                QMIN: tl.constexpr, QMAX: tl.constexpr, HAS_WZERO: tl.constexpr):
    """(s, v = w / s, z) for a [BN, BK] tile: the learned step, the scaled weight (division
    rounded to nearest, as torch's) and the zero point rounded and clamped to the grid (zeros
    when symmetric)."""
    s = tl.load(wscale_ptr + gidx, mask=mask, other=1.0).to(tl.float32)
    v = tl.math.div_rn(w, s)
    if HAS_WZERO:
        z = tl.load(wzero_ptr + gidx, mask=mask, other=0.0).to(tl.float32)
        z = tl.minimum(tl.maximum(_round_half_even(z), QMIN), QMAX)
    else:
        z = tl.zeros_like(v)
    return s, v, z


@triton.jit
def _codes_tile(
    offs_n, offs_k, mask_n, mask_k,
    packed_ptr, bscale_ptr, bzero_ptr, wscale_ptr, wzero_ptr, delta_ptr, a_ptr, b_ptr,
    K, WORDS, N_GROUPS, stride_dn, lora_scaling,
    BITS: tl.constexpr, SQMIN: tl.constexpr, SQMAX: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, GROUP: tl.constexpr,
    HAS_BZERO: tl.constexpr, HAS_WZERO: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_LORA: tl.constexpr, RANK: tl.constexpr, LORA_DTYPE: tl.constexpr,
    BASE_DTYPE: tl.constexpr, INTERP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """(c, s, z) for a [BN, BK] tile: the integer codes c = round(clamp(v + z)) the exporter
    writes (fp32 holding integers), the step and the grid zero point (zeros when symmetric)."""
    mask = mask_n[:, None] & mask_k[None, :]
    w, gidx = _pre_quant_tile(offs_n, offs_k, mask_n, mask_k, packed_ptr, bscale_ptr, bzero_ptr,
                              delta_ptr, a_ptr, b_ptr, K, WORDS, N_GROUPS, stride_dn, lora_scaling,
                              BITS, SQMIN, SQMAX, GROUP, HAS_BZERO, HAS_DELTA, HAS_LORA, RANK,
                              LORA_DTYPE, BASE_DTYPE, INTERP, BLOCK_N, BLOCK_K)
    s, v, z = _steps_tile(w, gidx, mask, wscale_ptr, wzero_ptr, QMIN, QMAX, HAS_WZERO)
    # Same order as qat.primitives.fake_quantize: add z, clamp, round (ties to even).
    if HAS_WZERO:
        v = v + z
    c = _round_half_even(tl.minimum(tl.maximum(v, QMIN), QMAX))
    return c, s, z


@triton.jit
def _w_hat_tile(
    offs_n, offs_k, mask_n, mask_k,
    packed_ptr, bscale_ptr, bzero_ptr, wscale_ptr, wzero_ptr, delta_ptr, a_ptr, b_ptr,
    K, WORDS, N_GROUPS, stride_dn, lora_scaling,
    BITS: tl.constexpr, SQMIN: tl.constexpr, SQMAX: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, GROUP: tl.constexpr,
    HAS_BZERO: tl.constexpr, HAS_WZERO: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_LORA: tl.constexpr, RANK: tl.constexpr, LORA_DTYPE: tl.constexpr,
    BASE_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """W_hat[offs_n, offs_k] as fp32 values already rounded to OUT_DTYPE; 0 outside the masks."""
    c, s, z = _codes_tile(offs_n, offs_k, mask_n, mask_k, packed_ptr, bscale_ptr, bzero_ptr,
                          wscale_ptr, wzero_ptr, delta_ptr, a_ptr, b_ptr, K, WORDS, N_GROUPS,
                          stride_dn, lora_scaling, BITS, SQMIN, SQMAX, QMIN, QMAX, GROUP, HAS_BZERO,
                          HAS_WZERO, HAS_DELTA, HAS_LORA, RANK, LORA_DTYPE, BASE_DTYPE, INTERP,
                          BLOCK_N, BLOCK_K)
    # (c - z) * s is exact in fp32 (small integer times a step): one rounding, to OUT_DTYPE.
    if HAS_WZERO:
        c = c - z
    w_hat = _cast(c * s, OUT_DTYPE, INTERP)
    return tl.where(mask_n[:, None] & mask_k[None, :], w_hat, 0.0)


# Constexpr parameters shared by every kernel below, in this order after the runtime ones:
#   BITS SQMIN SQMAX (storage grid)  QMIN QMAX (trained grid)  GROUP
#   HAS_BZERO HAS_WZERO HAS_DELTA (dense D read)  HAS_LORA RANK LORA_DTYPE (D = scaling B A in
#   registers)  BASE_DTYPE  OUT_DTYPE
# and the runtime weight scalars WORDS N_GROUPS stride_dn lora_scaling after M / N / K.


@triton.jit
def _dequant_kernel(
    out_ptr, packed_ptr, bscale_ptr, bzero_ptr, wscale_ptr, wzero_ptr, delta_ptr, a_ptr, b_ptr,
    N, K, WORDS, N_GROUPS, stride_dn, lora_scaling,
    BITS: tl.constexpr, SQMIN: tl.constexpr, SQMAX: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, GROUP: tl.constexpr,
    HAS_BZERO: tl.constexpr, HAS_WZERO: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_LORA: tl.constexpr, RANK: tl.constexpr, LORA_DTYPE: tl.constexpr,
    BASE_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """W_hat[N, K] in OUT_DTYPE, one [BN, BK] tile per program."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n, mask_k = offs_n < N, offs_k < K
    w = _w_hat_tile(offs_n, offs_k, mask_n, mask_k, packed_ptr, bscale_ptr, bzero_ptr, wscale_ptr,
                    wzero_ptr, delta_ptr, a_ptr, b_ptr, K, WORDS, N_GROUPS, stride_dn, lora_scaling,
                    BITS, SQMIN, SQMAX, QMIN, QMAX, GROUP, HAS_BZERO, HAS_WZERO, HAS_DELTA, HAS_LORA,
                    RANK, LORA_DTYPE, BASE_DTYPE, OUT_DTYPE, INTERP, BLOCK_N, BLOCK_K)
    ptrs = out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(ptrs, w.to(OUT_DTYPE), mask=mask_n[:, None] & mask_k[None, :])


@triton.jit
def _codes_kernel(
    out_ptr, packed_ptr, bscale_ptr, bzero_ptr, wscale_ptr, wzero_ptr, delta_ptr, a_ptr, b_ptr,
    N, K, WORDS, N_GROUPS, stride_dn, lora_scaling,
    BITS: tl.constexpr, SQMIN: tl.constexpr, SQMAX: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, GROUP: tl.constexpr,
    HAS_BZERO: tl.constexpr, HAS_WZERO: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_LORA: tl.constexpr, RANK: tl.constexpr, LORA_DTYPE: tl.constexpr,
    BASE_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The exported codes [N, K] int8, clamp(round((W0 + D)/s) + z), from the same tile helper
    (the same D, v and rounding) as the forward and backward kernels. OUT_DTYPE is unused."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n, mask_k = offs_n < N, offs_k < K
    c, s, z = _codes_tile(offs_n, offs_k, mask_n, mask_k, packed_ptr, bscale_ptr, bzero_ptr,
                          wscale_ptr, wzero_ptr, delta_ptr, a_ptr, b_ptr, K, WORDS, N_GROUPS,
                          stride_dn, lora_scaling, BITS, SQMIN, SQMAX, QMIN, QMAX, GROUP, HAS_BZERO,
                          HAS_WZERO, HAS_DELTA, HAS_LORA, RANK, LORA_DTYPE, BASE_DTYPE, INTERP,
                          BLOCK_N, BLOCK_K)
    ptrs = out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(ptrs, c.to(tl.int8), mask=mask_n[:, None] & mask_k[None, :])


@triton.jit
def _lora_delta_kernel(out_ptr, a_ptr, b_ptr, N, K, lora_scaling, RANK: tl.constexpr,
                       LORA_DTYPE: tl.constexpr, INTERP: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """D [N, K] fp32 exactly as every kernel forms it in registers (_lora_tile), written out:
    for tests of its arithmetic only (the fused path never writes D)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n, mask_k = offs_n < N, offs_k < K
    d = _lora_tile(offs_n, offs_k, mask_n, mask_k, a_ptr, b_ptr, K, lora_scaling, RANK,
                   LORA_DTYPE, INTERP, BLOCK_N, BLOCK_K)
    ptrs = out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(ptrs, d, mask=mask_n[:, None] & mask_k[None, :])


@triton.jit
def _fwd_kernel(
    x_ptr, y_ptr, packed_ptr, bscale_ptr, bzero_ptr, wscale_ptr, wzero_ptr, delta_ptr, a_ptr, b_ptr,
    M, N, K, WORDS, N_GROUPS, stride_dn, lora_scaling, stride_xm, stride_ym,
    BITS: tl.constexpr, SQMIN: tl.constexpr, SQMAX: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, GROUP: tl.constexpr,
    HAS_BZERO: tl.constexpr, HAS_WZERO: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_LORA: tl.constexpr, RANK: tl.constexpr, LORA_DTYPE: tl.constexpr,
    BASE_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[M, N] = x[M, K] @ W_hat[N, K]^T, W_hat tiles built on the fly."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = _w_hat_tile(offs_n, offs_k, mask_n, mask_k, packed_ptr, bscale_ptr, bzero_ptr, wscale_ptr,
                        wzero_ptr, delta_ptr, a_ptr, b_ptr, K, WORDS, N_GROUPS, stride_dn,
                        lora_scaling, BITS, SQMIN, SQMAX, QMIN, QMAX, GROUP, HAS_BZERO, HAS_WZERO,
                        HAS_DELTA, HAS_LORA, RANK, LORA_DTYPE, BASE_DTYPE, OUT_DTYPE, INTERP,
                        BLOCK_N, BLOCK_K)
        w = _cast(w, x.dtype, INTERP)  # the reference casts W_hat to x's dtype before F.linear
        if INTERP:  # interpreter: its bf16 dot is wrong; 16-bit products are exact in fp32
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(ptrs, _cast(acc, y_ptr.dtype.element_ty, INTERP), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dx_kernel(
    g_ptr, dx_ptr, packed_ptr, bscale_ptr, bzero_ptr, wscale_ptr, wzero_ptr, delta_ptr, a_ptr, b_ptr,
    M, N, K, WORDS, N_GROUPS, stride_dn, lora_scaling, stride_gm, stride_dxm,
    BITS: tl.constexpr, SQMIN: tl.constexpr, SQMAX: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, GROUP: tl.constexpr,
    HAS_BZERO: tl.constexpr, HAS_WZERO: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_LORA: tl.constexpr, RANK: tl.constexpr, LORA_DTYPE: tl.constexpr,
    BASE_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dX[M, K] = grad_y[M, N] @ W_hat[N, K], W_hat tiles built on the fly."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m, mask_k = offs_m < M, offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        g = tl.load(g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm + offs_n[None, :],
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w = _w_hat_tile(offs_n, offs_k, mask_n, mask_k, packed_ptr, bscale_ptr, bzero_ptr, wscale_ptr,
                        wzero_ptr, delta_ptr, a_ptr, b_ptr, K, WORDS, N_GROUPS, stride_dn,
                        lora_scaling, BITS, SQMIN, SQMAX, QMIN, QMAX, GROUP, HAS_BZERO, HAS_WZERO,
                        HAS_DELTA, HAS_LORA, RANK, LORA_DTYPE, BASE_DTYPE, OUT_DTYPE, INTERP,
                        BLOCK_N, BLOCK_K)
        w = _cast(w, g.dtype, INTERP)
        if INTERP:  # interpreter: its bf16 dot is wrong; 16-bit products are exact in fp32
            g, w = g.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(g, w, input_precision=PRECISION)
    ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :]
    tl.store(ptrs, _cast(acc, dx_ptr.dtype.element_ty, INTERP), mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _store_group_sums(ptr, e, offs_n, mask_n, pid_k, NSLOTS,
                      GPB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Reduce a [BN, BK] tile of per-element terms to per-group sums and store them in the
    [N, NSLOTS] fp32 partial buffer: one slot per tile when a tile lies inside one group
    (GPB == 1, slot = pid_k, the launcher sums a group's parts), else one slot per group."""
    rows = offs_n.to(tl.int64)
    if GPB == 1:
        tl.store(ptr + rows * NSLOTS + pid_k, tl.sum(e, axis=1), mask=mask_n)
    else:
        tot = tl.sum(tl.reshape(e, (BLOCK_N, GPB, BLOCK_K // GPB)), axis=2)  # [BN, GPB]
        slot = pid_k * GPB + tl.arange(0, GPB)
        tl.store(ptr + rows[:, None] * NSLOTS + slot[None, :], tot,
                 mask=mask_n[:, None] & (slot < NSLOTS)[None, :])


@triton.jit
def _grads_kernel(
    g_ptr, x_ptr, packed_ptr, bscale_ptr, bzero_ptr, wscale_ptr, wzero_ptr, delta_ptr, a_ptr, b_ptr,
    ds_ptr, dz_ptr, dd_ptr, db_ptr, da_ptr,
    M, N, K, WORDS, N_GROUPS, stride_dn, lora_scaling, stride_gm, stride_xm, NSLOTS,
    BITS: tl.constexpr, SQMIN: tl.constexpr, SQMAX: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, GROUP: tl.constexpr,
    HAS_BZERO: tl.constexpr, HAS_WZERO: tl.constexpr, HAS_DELTA: tl.constexpr,
    HAS_LORA: tl.constexpr, RANK: tl.constexpr, LORA_DTYPE: tl.constexpr,
    BASE_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, INTERP: tl.constexpr,
    DELTA_GRAD: tl.constexpr, LORA: tl.constexpr, R_PAD: tl.constexpr, GPB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward reductions of y = x W_hat^T for one [BN, BK] tile of the weight.

    G = grad_y^T x (the gradient w.r.t. W_hat) is accumulated over the tokens in registers and
    never stored; the epilogue rebuilds W_hat's pieces (v = (W0 + D)/s, z, q, the clamp mask)
    and writes, per element e of the tile (LSQ / LSQ+, qat.primitives.fake_quantize):
        step     dW_hat/ds = (q - z) - [inside] v          -> per-group partial sums   [N, NSLOTS]
        zero     dW_hat/dz = -s [outside]                  -> per-group partial sums   [N, NSLOTS]
        delta    dW_hat/dD = [inside]  (the STE)           -> dDelta [N, K]      (DELTA_GRAD)
        LoRA     dB_part[pid_k] = dDelta_tile A_tile^T     [KT, N, R_PAD]        (LORA)
                 dA_part[pid_n] = B_tile^T dDelta_tile     [NT, R_PAD, K]
    v uses the D the forward used: the dense delta (HAS_DELTA) or the in-register LoRA tile
    (HAS_LORA, the same helper and so the same bits as the forward kernel).
    Partial buffers (not atomics) keep the result deterministic; the launcher sums them.
    """
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n, mask_k = offs_n < N, offs_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        g = tl.load(g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm + offs_n[None, :],
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)               # [BM, BN]
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)               # [BM, BK]
        x = _cast(x, g.dtype, INTERP)  # the reference multiplies x.to(grad_y.dtype)
        if INTERP:  # interpreter: its bf16 dot is wrong; 16-bit products are exact in fp32
            g, x = g.to(tl.float32), x.to(tl.float32)
        acc += tl.dot(tl.trans(g), x, input_precision=PRECISION)                     # [BN, BK]

    mask = mask_n[:, None] & mask_k[None, :]
    w, gidx = _pre_quant_tile(offs_n, offs_k, mask_n, mask_k, packed_ptr, bscale_ptr, bzero_ptr,
                              delta_ptr, a_ptr, b_ptr, K, WORDS, N_GROUPS, stride_dn, lora_scaling,
                              BITS, SQMIN, SQMAX, GROUP, HAS_BZERO, HAS_DELTA, HAS_LORA, RANK,
                              LORA_DTYPE, BASE_DTYPE, INTERP, BLOCK_N, BLOCK_K)
    s, v, z = _steps_tile(w, gidx, mask, wscale_ptr, wzero_ptr, QMIN, QMAX, HAS_WZERO)
    u = v + z
    # torch.clamp passes the gradient where QMIN <= u <= QMAX (bounds included).
    inside = (u >= QMIN) & (u <= QMAX)
    q = _round_half_even(tl.minimum(tl.maximum(u, QMIN), QMAX))
    G = tl.where(mask, acc, 0.0)
    # (q - z) - v is formed from the two terms separately, as the reference's autograd does.
    _store_group_sums(ds_ptr, G * ((q - z) - tl.where(inside, v, 0.0)), offs_n, mask_n, pid_k,
                      NSLOTS, GPB, BLOCK_N, BLOCK_K)
    if HAS_WZERO:
        _store_group_sums(dz_ptr, tl.where(inside, 0.0, -(G * s)), offs_n, mask_n, pid_k, NSLOTS,
                          GPB, BLOCK_N, BLOCK_K)
    dd = tl.where(inside, G, 0.0)  # [BN, BK] fp32, the STE-masked gradient w.r.t. W0 + D
    if DELTA_GRAD:
        ptrs = dd_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
        tl.store(ptrs, _cast(dd, dd_ptr.dtype.element_ty, INTERP), mask=mask)
    if LORA:
        offs_r = tl.arange(0, R_PAD)
        mask_r = offs_r < RANK
        a = tl.load(a_ptr + offs_r.to(tl.int64)[:, None] * K + offs_k[None, :],
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)   # [R_PAD, BK]
        b = tl.load(b_ptr + offs_n.to(tl.int64)[:, None] * RANK + offs_r[None, :],
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)   # [BN, R_PAD]
        db = tl.dot(dd, tl.trans(a), input_precision="ieee")                            # [BN, R_PAD]
        da = tl.dot(tl.trans(b), dd, input_precision="ieee")                            # [R_PAD, BK]
        db_ptrs = db_ptr + (pid_k * N + offs_n.to(tl.int64))[:, None] * R_PAD + offs_r[None, :]
        tl.store(db_ptrs, db, mask=mask_n[:, None])
        da_ptrs = da_ptr + (pid_n * R_PAD + offs_r.to(tl.int64))[:, None] * K + offs_k[None, :]
        tl.store(da_ptrs, da, mask=mask_k[None, :])


# --------------------------------------------------------------------------- launchers
def _lora_args(delta, lora_a, lora_b, lora_scaling, dummy):
    """(a, b pointer tensors, scaling, constexpr kwargs) for D = scaling * B A formed in the
    kernels; D is formed there only when the factors come without a dense ``delta``."""
    in_kernel = lora_a is not None and delta is None
    if in_kernel:
        if lora_b is None or lora_a.dtype not in _TL_DTYPES or lora_b.dtype != lora_a.dtype:
            raise ValueError("in-kernel LoRA needs lora_a [r, in] and lora_b [out, r] of one "
                             f"float dtype, got {lora_a.dtype} / {None if lora_b is None else lora_b.dtype}")
        lora_a, lora_b = lora_a.contiguous(), lora_b.contiguous()
    const = dict(HAS_LORA=in_kernel, RANK=lora_a.shape[0] if in_kernel else 0,
                 LORA_DTYPE=_TL_DTYPES[lora_a.dtype] if in_kernel else tl.float32)
    if not in_kernel:
        return dummy, dummy, 1.0, const
    return lora_a, lora_b, float(lora_scaling), const


def _weight_args(base_packed, base_scale, base_zero, weight_scale, weight_zero, delta,
                 storage_bits, bits_qmin, bits_qmax, group_size, in_features, out_dtype,
                 lora_a=None, lora_b=None, lora_scaling=1.0):
    """(out, pointer tensors, runtime scalars, constexpr kwargs) shared by every kernel.
    D is ``delta`` [out, in] when given, else scaling * B A formed in-kernel when the LoRA
    factors are given, else 0."""
    if out_dtype not in _TL_DTYPES or base_scale.dtype not in _TL_DTYPES:
        raise ValueError(f"triton kernels take fp32/fp16/bf16, got {out_dtype} / {base_scale.dtype}")
    n = base_packed.shape[0]
    words = base_packed.shape[1]
    n_groups = in_features // group_size
    base_packed = base_packed.contiguous()
    base_scale, weight_scale = base_scale.contiguous(), weight_scale.contiguous()
    sq_half = 1 << (storage_bits - 1)
    dummy = base_scale  # never read when the matching HAS_* flag is False
    if delta is not None:
        delta = delta if delta.stride(-1) == 1 else delta.contiguous()
    a, b, scaling, lora_const = _lora_args(delta, lora_a, lora_b, lora_scaling, dummy)
    ptrs = (
        base_packed, base_scale,
        dummy if base_zero is None else base_zero.contiguous(),
        weight_scale,
        dummy if weight_zero is None else weight_zero.contiguous(),
        dummy if delta is None else delta,
        a, b,
    )
    scalars = (words, n_groups, 0 if delta is None else delta.stride(0), scaling)
    const = dict(
        BITS=storage_bits, SQMIN=-sq_half, SQMAX=sq_half - 1, QMIN=bits_qmin, QMAX=bits_qmax,
        GROUP=group_size, HAS_BZERO=base_zero is not None, HAS_WZERO=weight_zero is not None,
        HAS_DELTA=delta is not None, **lora_const, BASE_DTYPE=_TL_DTYPES[base_scale.dtype],
        OUT_DTYPE=_TL_DTYPES[out_dtype],
    )
    return n, ptrs, scalars, const


def _weight_only(kernel, result_dtype, weight, block_n, block_k):
    """Launch a one-tile-per-program kernel over the weight alone ([out, in] ``result_dtype``)."""
    check_one_delta(weight[5], weight[12])
    n, ptrs, scalars, const = _weight_args(*weight)
    in_features = weight[10]
    out = torch.empty(n, in_features, dtype=result_dtype, device=weight[0].device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(in_features, block_k))
    kernel[grid](out, *ptrs, n, in_features, *scalars, **const, INTERP=_interp(),
                 BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def dequant_fakequant(base_packed, base_scale, base_zero, weight_scale, weight_zero, delta,
                      storage_bits, bits_qmin, bits_qmax, group_size, in_features, out_dtype,
                      lora_a=None, lora_b=None, lora_scaling=1.0,
                      block_n: int = 32, block_k: int = 64):
    """W_hat [out, in] in ``out_dtype``; D from ``delta`` or from the LoRA factors."""
    weight = (base_packed, base_scale, base_zero, weight_scale, weight_zero, delta, storage_bits,
              bits_qmin, bits_qmax, group_size, in_features, out_dtype, lora_a, lora_b, lora_scaling)
    return _weight_only(_dequant_kernel, out_dtype, weight, block_n, block_k)


def quant_codes(base_packed, base_scale, base_zero, weight_scale, weight_zero, delta,
                storage_bits, bits_qmin, bits_qmax, group_size, in_features, out_dtype,
                lora_a=None, lora_b=None, lora_scaling=1.0,
                block_n: int = 32, block_k: int = 64):
    """The codes [out, in] int8 the kernels' W_hat is built from (what export writes)."""
    weight = (base_packed, base_scale, base_zero, weight_scale, weight_zero, delta, storage_bits,
              bits_qmin, bits_qmax, group_size, in_features, out_dtype, lora_a, lora_b, lora_scaling)
    return _weight_only(_codes_kernel, torch.int8, weight, block_n, block_k)


def lora_delta(lora_a, lora_b, lora_scaling, block_n: int = 32, block_k: int = 64):
    """D = scaling * B A [out, in] fp32 as the kernels form it tile by tile (for tests)."""
    n, k = lora_b.shape[0], lora_a.shape[1]
    a, b, scaling, const = _lora_args(None, lora_a, lora_b, lora_scaling, None)
    out = torch.empty(n, k, dtype=torch.float32, device=lora_a.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _lora_delta_kernel[grid](out, a, b, n, k, scaling, RANK=const["RANK"],
                             LORA_DTYPE=const["LORA_DTYPE"], INTERP=_interp(),
                             BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def _interp() -> bool:
    """Under the interpreter, dot operands go to fp32 (its bf16 tl.dot reads raw bits) and bf16
    casts are rounded by hand (its fp32 -> bf16 cast truncates)."""
    return INTERPRETED


def _rows(t, width):
    """t [..., width] as a 2-D [rows, width] view with unit inner stride (a copy if needed)."""
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def quant_linear_fwd(x, base_packed, base_scale, base_zero, weight_scale, weight_zero, delta,
                     storage_bits, bits_qmin, bits_qmax, group_size, in_features, out_dtype,
                     lora_a=None, lora_b=None, lora_scaling=1.0,
                     block_m: int = 64, block_n: int = 64, block_k: int = 64):
    if x.dtype not in _TL_DTYPES:
        raise ValueError(f"triton kernels take fp32/fp16/bf16 activations, got {x.dtype}")
    check_one_delta(delta, lora_a)
    n, ptrs, scalars, const = _weight_args(base_packed, base_scale, base_zero, weight_scale, weight_zero,
                                           delta, storage_bits, bits_qmin, bits_qmax, group_size,
                                           in_features, out_dtype, lora_a, lora_b, lora_scaling)
    x2 = _rows(x, in_features)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fwd_kernel[grid](x2, y, *ptrs, m, n, in_features, *scalars, x2.stride(0), y.stride(0), **const,
                      PRECISION=_precision(x.dtype), INTERP=_interp(), BLOCK_M=block_m,
                      BLOCK_N=block_n, BLOCK_K=block_k)
    return y.reshape(*x.shape[:-1], n)


def quant_linear_dx(grad_y, base_packed, base_scale, base_zero, weight_scale, weight_zero, delta,
                    storage_bits, bits_qmin, bits_qmax, group_size, in_features, out_dtype,
                    lora_a=None, lora_b=None, lora_scaling=1.0,
                    block_m: int = 64, block_n: int = 64, block_k: int = 64):
    if grad_y.dtype not in _TL_DTYPES:
        raise ValueError(f"triton kernels take fp32/fp16/bf16 gradients, got {grad_y.dtype}")
    check_one_delta(delta, lora_a)
    n, ptrs, scalars, const = _weight_args(base_packed, base_scale, base_zero, weight_scale, weight_zero,
                                           delta, storage_bits, bits_qmin, bits_qmax, group_size,
                                           in_features, out_dtype, lora_a, lora_b, lora_scaling)
    g2 = _rows(grad_y, n)
    m = g2.shape[0]
    dx = torch.empty(m, in_features, dtype=grad_y.dtype, device=grad_y.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(in_features, block_k))
    _dx_kernel[grid](g2, dx, *ptrs, m, n, in_features, *scalars, g2.stride(0), dx.stride(0), **const,
                     PRECISION=_precision(grad_y.dtype), INTERP=_interp(), BLOCK_M=block_m,
                     BLOCK_N=block_n, BLOCK_K=block_k)
    return dx.reshape(*grad_y.shape[:-1], in_features)


def grads_block_k(group_size: int, block_k: int = 64) -> int:
    """Tile width along `in` for the grads kernel: a tile lies inside one group or holds whole
    groups, so per-group sums need no cross-tile bookkeeping. 0 when none works (a group whose
    largest power-of-two divisor is below 16, tl.dot's minimum): the caller uses the reference."""
    if group_size % block_k == 0 or block_k % group_size == 0:
        return block_k
    bk = group_size & -group_size  # largest power of two dividing the group
    bk = min(bk, block_k)
    return bk if bk >= 16 else 0


def quant_linear_grads(grad_y, x, base_packed, base_scale, base_zero, weight_scale, weight_zero, delta,
                       storage_bits, bits_qmin, bits_qmax, group_size, in_features, out_dtype,
                       lsq_scale, lora_a=None, lora_b=None, lora_scaling=1.0, delta_grad=False,
                       block_m: int = 64, block_n: int = 64, block_k: int = 64):
    """(grad weight_scale, grad weight_zero, grad delta, grad lora_A, grad lora_B), empty [0]
    tensors for the ones not asked for; the semantics of ``qat::quant_linear_grads``.
    With LoRA factors and no ``delta``, D is formed in-kernel (as the forward kernels do);
    with both, ``delta`` must be scaling * B A and is read (the dense-D path)."""
    if grad_y.dtype not in _TL_DTYPES or x.dtype not in _TL_DTYPES:
        raise ValueError(f"triton kernels take fp32/fp16/bf16 activations, got {grad_y.dtype} / {x.dtype}")
    bk = grads_block_k(group_size, block_k)
    if not bk:
        raise ValueError(f"group size {group_size} has no power-of-two tile >= 16: use the reference")
    lora = lora_a is not None
    if lora and lora_b is None:
        raise ValueError("LoRA gradients need both lora_a and lora_b")
    n, ptrs, scalars, const = _weight_args(base_packed, base_scale, base_zero, weight_scale, weight_zero,
                                           delta, storage_bits, bits_qmin, bits_qmax, group_size,
                                           in_features, out_dtype, lora_a, lora_b, lora_scaling)
    g2, x2 = _rows(grad_y, n), _rows(x, in_features)
    m, dev = g2.shape[0], grad_y.device
    n_groups = in_features // group_size
    gpb = max(1, bk // group_size)            # whole groups per tile (1 when a tile is inside a group)
    kt, nt = triton.cdiv(in_features, bk), triton.cdiv(n, block_n)
    nslots = n_groups if gpb > 1 else kt      # gpb == 1: kt = n_groups * (group_size // bk) parts
    f32 = dict(dtype=torch.float32, device=dev)
    def empty():  # a fresh [0] tensor per unused output (op outputs may not alias each other)
        return weight_scale.new_empty(0)

    ds_part = torch.empty(n, nslots, **f32)
    dz_part = torch.empty(n, nslots, **f32) if weight_zero is not None else ds_part
    want_dd = delta_grad and delta is not None and not lora
    dd = torch.empty(n, in_features, dtype=delta.dtype, device=dev) if want_dd else ds_part
    r = lora_a.shape[0] if lora else 0
    r_pad = max(16, triton.next_power_of_2(r)) if lora else 16
    db_part = da_part = ds_part
    if lora:
        db_part = torch.empty(kt, n, r_pad, **f32)             # per-k-tile dDelta A^T
        da_part = torch.empty(nt, r_pad, in_features, **f32)   # per-n-tile B^T dDelta
        # The dA / dB reduction reads the factors through the a / b pointers the D tile uses;
        # on the dense-D path (delta given too) _weight_args left dummies there.
        ptrs = ptrs[:6] + (lora_a.contiguous(), lora_b.contiguous())
        const["RANK"] = r
    _grads_kernel[(nt, kt)](
        g2, x2, *ptrs, ds_part, dz_part, dd, db_part, da_part,
        m, n, in_features, *scalars, g2.stride(0), x2.stride(0), nslots, **const,
        PRECISION=_precision(grad_y.dtype), INTERP=_interp(), DELTA_GRAD=want_dd, LORA=lora,
        R_PAD=r_pad, GPB=gpb, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=bk)
    # [N, NSLOTS] -> [N, G]: sum a group's parts (a no-op view when tiles hold whole groups).
    ds = ds_part.reshape(n, n_groups, -1).sum(-1)
    grad_scale = (ds * lsq_scale).to(weight_scale.dtype)
    grad_zero = empty()
    if weight_zero is not None:
        dz = dz_part.reshape(n, n_groups, -1).sum(-1)
        # The zero point is used as clamp(round(z)): no gradient where round(z) is off the grid.
        zr = torch.round(weight_zero)
        on_grid = (zr >= bits_qmin) & (zr <= bits_qmax)
        grad_zero = torch.where(on_grid, dz * lsq_scale, 0.0).to(weight_zero.dtype)
    grad_a, grad_b = empty(), empty()
    if lora:
        grad_b = (db_part.sum(0)[:, :r] * lora_scaling).to(lora_b.dtype)   # [N, r]
        grad_a = (da_part.sum(0)[:r] * lora_scaling).to(lora_a.dtype)       # [r, K]
    return grad_scale, grad_zero, dd if want_dd else empty(), grad_a, grad_b
