"""Triton kernels: packed base -> W_hat (dequant + delta + fake-quant), fused into the matmuls.

    W0    = s0 * (q0 - z0)                      q0 unpacked from int32 words (cross-word layout)
    W_hat = s * (clamp(round((W0 + D) / s) + z) - z)
    y     = x @ W_hat^T          dX = grad_y @ W_hat

W_hat tiles are computed on the fly from the packed codes and steps inside the matmul loops;
no dense weight is ever written to global memory by the fused kernels. Arithmetic matches
``qat.primitives`` bit for bit for W_hat: the base is dequantized in fp32, the division is
round-to-nearest (``div_rn``, not the approximate ``/``), rounding is half-to-even like
``torch.round`` and the products ``(q - z) * s`` are formed exactly in fp32 before the single
rounding to the output dtype (as the reference's one multiply in the scale dtype). Matmuls
accumulate in fp32.

This module imports triton at import time: import it lazily (``qat.kernels.dispatch`` does)
and, for CPU tests, only after setting ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

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
def _w_hat_tile(
    offs_n, offs_k, mask_n, mask_k,
    packed_ptr, bscale_ptr, bzero_ptr, wscale_ptr, wzero_ptr, delta_ptr,
    WORDS, N_GROUPS, stride_dn,
    BITS: tl.constexpr, SQMIN: tl.constexpr, SQMAX: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, GROUP: tl.constexpr,
    HAS_BZERO: tl.constexpr, HAS_WZERO: tl.constexpr, HAS_DELTA: tl.constexpr,
    BASE_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, INTERP: tl.constexpr,
):
    """W_hat[offs_n, offs_k] as fp32 values already rounded to OUT_DTYPE; 0 outside the masks."""
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
    s = tl.load(wscale_ptr + gidx, mask=mask, other=1.0).to(tl.float32)
    v = tl.math.div_rn(w, s)
    # Same order as qat.primitives.fake_quantize: add z, clamp, round (ties to even), minus z.
    if HAS_WZERO:
        z = tl.load(wzero_ptr + gidx, mask=mask, other=0.0).to(tl.float32)
        z = tl.minimum(tl.maximum(_round_half_even(z), QMIN), QMAX)
        q = _round_half_even(tl.minimum(tl.maximum(v + z, QMIN), QMAX)) - z
    else:
        q = _round_half_even(tl.minimum(tl.maximum(v, QMIN), QMAX))
    w_hat = _cast(q * s, OUT_DTYPE, INTERP)
    return tl.where(mask, w_hat, 0.0)


@triton.jit
def _dequant_kernel(
    out_ptr, packed_ptr, bscale_ptr, bzero_ptr, wscale_ptr, wzero_ptr, delta_ptr,
    N, K, WORDS, N_GROUPS, stride_dn,
    BITS: tl.constexpr, SQMIN: tl.constexpr, SQMAX: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, GROUP: tl.constexpr,
    HAS_BZERO: tl.constexpr, HAS_WZERO: tl.constexpr, HAS_DELTA: tl.constexpr,
    BASE_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, INTERP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n, mask_k = offs_n < N, offs_k < K
    w = _w_hat_tile(offs_n, offs_k, mask_n, mask_k, packed_ptr, bscale_ptr, bzero_ptr, wscale_ptr,
                    wzero_ptr, delta_ptr, WORDS, N_GROUPS, stride_dn, BITS, SQMIN, SQMAX, QMIN, QMAX,
                    GROUP, HAS_BZERO, HAS_WZERO, HAS_DELTA, BASE_DTYPE, OUT_DTYPE, INTERP)
    ptrs = out_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(ptrs, w.to(OUT_DTYPE), mask=mask_n[:, None] & mask_k[None, :])


@triton.jit
def _fwd_kernel(
    x_ptr, y_ptr, packed_ptr, bscale_ptr, bzero_ptr, wscale_ptr, wzero_ptr, delta_ptr,
    M, N, K, WORDS, N_GROUPS, stride_dn, stride_xm, stride_ym,
    BITS: tl.constexpr, SQMIN: tl.constexpr, SQMAX: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, GROUP: tl.constexpr,
    HAS_BZERO: tl.constexpr, HAS_WZERO: tl.constexpr, HAS_DELTA: tl.constexpr,
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
                        wzero_ptr, delta_ptr, WORDS, N_GROUPS, stride_dn, BITS, SQMIN, SQMAX, QMIN,
                        QMAX, GROUP, HAS_BZERO, HAS_WZERO, HAS_DELTA, BASE_DTYPE, OUT_DTYPE, INTERP)
        w = _cast(w, x.dtype, INTERP)  # the reference casts W_hat to x's dtype before F.linear
        if INTERP:  # interpreter: its bf16 dot is wrong; 16-bit products are exact in fp32
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(ptrs, _cast(acc, y_ptr.dtype.element_ty, INTERP), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _dx_kernel(
    g_ptr, dx_ptr, packed_ptr, bscale_ptr, bzero_ptr, wscale_ptr, wzero_ptr, delta_ptr,
    M, N, K, WORDS, N_GROUPS, stride_dn, stride_gm, stride_dxm,
    BITS: tl.constexpr, SQMIN: tl.constexpr, SQMAX: tl.constexpr,
    QMIN: tl.constexpr, QMAX: tl.constexpr, GROUP: tl.constexpr,
    HAS_BZERO: tl.constexpr, HAS_WZERO: tl.constexpr, HAS_DELTA: tl.constexpr,
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
                        wzero_ptr, delta_ptr, WORDS, N_GROUPS, stride_dn, BITS, SQMIN, SQMAX, QMIN,
                        QMAX, GROUP, HAS_BZERO, HAS_WZERO, HAS_DELTA, BASE_DTYPE, OUT_DTYPE, INTERP)
        w = _cast(w, g.dtype, INTERP)
        if INTERP:  # interpreter: its bf16 dot is wrong; 16-bit products are exact in fp32
            g, w = g.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(g, w, input_precision=PRECISION)
    ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :]
    tl.store(ptrs, _cast(acc, dx_ptr.dtype.element_ty, INTERP), mask=mask_m[:, None] & mask_k[None, :])


# --------------------------------------------------------------------------- launchers
def _weight_args(base_packed, base_scale, base_zero, weight_scale, weight_zero, delta,
                 storage_bits, bits_qmin, bits_qmax, group_size, in_features, out_dtype):
    """(pointer tensors, runtime ints, constexpr kwargs) shared by the three kernels."""
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
    ptrs = (
        base_packed, base_scale,
        dummy if base_zero is None else base_zero.contiguous(),
        weight_scale,
        dummy if weight_zero is None else weight_zero.contiguous(),
        dummy if delta is None else delta,
    )
    ints = (words, n_groups, 0 if delta is None else delta.stride(0))
    const = dict(
        BITS=storage_bits, SQMIN=-sq_half, SQMAX=sq_half - 1, QMIN=bits_qmin, QMAX=bits_qmax,
        GROUP=group_size, HAS_BZERO=base_zero is not None, HAS_WZERO=weight_zero is not None,
        HAS_DELTA=delta is not None, BASE_DTYPE=_TL_DTYPES[base_scale.dtype],
        OUT_DTYPE=_TL_DTYPES[out_dtype],
    )
    return n, ptrs, ints, const


def dequant_fakequant(base_packed, base_scale, base_zero, weight_scale, weight_zero, delta,
                      storage_bits, bits_qmin, bits_qmax, group_size, in_features, out_dtype,
                      block_n: int = 32, block_k: int = 64):
    n, ptrs, ints, const = _weight_args(base_packed, base_scale, base_zero, weight_scale, weight_zero,
                                        delta, storage_bits, bits_qmin, bits_qmax, group_size,
                                        in_features, out_dtype)
    out = torch.empty(n, in_features, dtype=out_dtype, device=base_packed.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(in_features, block_k))
    _dequant_kernel[grid](out, *ptrs, n, in_features, *ints, **const, INTERP=_interp(), BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs


def _interp() -> bool:
    """Under the interpreter, dot operands go to fp32 (its bf16 tl.dot reads raw bits) and bf16
    casts are rounded by hand (its fp32 -> bf16 cast truncates)."""
    return INTERPRETED


def quant_linear_fwd(x, base_packed, base_scale, base_zero, weight_scale, weight_zero, delta,
                     storage_bits, bits_qmin, bits_qmax, group_size, in_features, out_dtype,
                     block_m: int = 64, block_n: int = 64, block_k: int = 64):
    if x.dtype not in _TL_DTYPES:
        raise ValueError(f"triton kernels take fp32/fp16/bf16 activations, got {x.dtype}")
    n, ptrs, ints, const = _weight_args(base_packed, base_scale, base_zero, weight_scale, weight_zero,
                                        delta, storage_bits, bits_qmin, bits_qmax, group_size,
                                        in_features, out_dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fwd_kernel[grid](x2, y, *ptrs, m, n, in_features, *ints, x2.stride(0), y.stride(0), **const,
                      PRECISION=_precision(x.dtype), INTERP=_interp(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y.reshape(*lead, n)


def quant_linear_dx(grad_y, base_packed, base_scale, base_zero, weight_scale, weight_zero, delta,
                    storage_bits, bits_qmin, bits_qmax, group_size, in_features, out_dtype,
                    block_m: int = 64, block_n: int = 64, block_k: int = 64):
    if grad_y.dtype not in _TL_DTYPES:
        raise ValueError(f"triton kernels take fp32/fp16/bf16 gradients, got {grad_y.dtype}")
    n, ptrs, ints, const = _weight_args(base_packed, base_scale, base_zero, weight_scale, weight_zero,
                                        delta, storage_bits, bits_qmin, bits_qmax, group_size,
                                        in_features, out_dtype)
    lead = grad_y.shape[:-1]
    g2 = grad_y.reshape(-1, n)
    if g2.stride(-1) != 1:
        g2 = g2.contiguous()
    m = g2.shape[0]
    dx = torch.empty(m, in_features, dtype=grad_y.dtype, device=grad_y.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(in_features, block_k))
    _dx_kernel[grid](g2, dx, *ptrs, m, n, in_features, *ints, g2.stride(0), dx.stride(0), **const,
                     PRECISION=_precision(grad_y.dtype), INTERP=_interp(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return dx.reshape(*lead, in_features)
