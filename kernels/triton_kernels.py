"""Triton kernels: packed base -> W_hat (dequant + delta + fake-quant), fused into the matmuls.

    W_hat  [out, in]   launch_dequant_fakequant(w)        one tile per program
    codes  [out, in]   launch_quant_codes(w)              clamp(round((W0 + D)/s) + z), int8
    y = x @ W_hat^T    launch_quant_linear_fwd(x, w)
    dX = grad_y @ W_hat  launch_quant_linear_dx(grad_y, w)
    D = scaling B A    launch_lora_delta(a, b, scaling)   (for tests of the in-register D)

``w`` is a ``WeightArgs`` (kernels/args.py); the step / zero-point / adapter gradients are in
triton_grads.py, the tile helpers all of them share in triton_tiles.py.

W_hat tiles are computed on the fly from the packed codes and steps inside the matmul loops;
no dense weight is ever written to global memory by the fused kernels. Arithmetic matches
``qat.primitives`` bit for bit for W_hat: the base is dequantized in fp32, the division is
round-to-nearest (``div_rn``, not the approximate ``/``), rounding is half-to-even like
``torch.round`` and the products ``(q - z) * s`` are formed exactly in fp32 before the single
rounding to the output dtype (as the reference's one multiply in the scale dtype). Matmuls
accumulate in fp32. The in-register LoRA D matches torch's ``(B @ A) * scaling`` only where
torch's matmul sums in the same fma order (it does for small r on MKL CPUs; other BLAS may
not), so export takes its codes from ``quant_codes``, the same D as training's W_hat.

This module imports triton at import time: import it lazily (``qat.kernels.ops.launcher``
does) and, for CPU tests, only after setting ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qat.kernels.args import WeightArgs, check_one_delta
from qat.kernels.triton_common import INTERPRETED, TL_DTYPES, as_rows, cast, precision
from qat.kernels.triton_tiles import codes_tile, lora_launch_args, lora_tile, tile_args, w_hat_tile

# Under the interpreter (INTERP), dot operands go to fp32 (its bf16 tl.dot reads raw bits) and
# bf16 casts are rounded by hand (its fp32 -> bf16 cast truncates).


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
    w = w_hat_tile(offs_n, offs_k, mask_n, mask_k, packed_ptr, bscale_ptr, bzero_ptr, wscale_ptr,
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
    c, s, z = codes_tile(offs_n, offs_k, mask_n, mask_k, packed_ptr, bscale_ptr, bzero_ptr,
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
    """D [N, K] fp32 exactly as every kernel forms it in registers (lora_tile), written out:
    for tests of its arithmetic only (the fused path never writes D)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n, mask_k = offs_n < N, offs_k < K
    d = lora_tile(offs_n, offs_k, mask_n, mask_k, a_ptr, b_ptr, K, lora_scaling, RANK,
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
        w = w_hat_tile(offs_n, offs_k, mask_n, mask_k, packed_ptr, bscale_ptr, bzero_ptr, wscale_ptr,
                        wzero_ptr, delta_ptr, a_ptr, b_ptr, K, WORDS, N_GROUPS, stride_dn,
                        lora_scaling, BITS, SQMIN, SQMAX, QMIN, QMAX, GROUP, HAS_BZERO, HAS_WZERO,
                        HAS_DELTA, HAS_LORA, RANK, LORA_DTYPE, BASE_DTYPE, OUT_DTYPE, INTERP,
                        BLOCK_N, BLOCK_K)
        w = cast(w, x.dtype, INTERP)  # the reference casts W_hat to x's dtype before F.linear
        if INTERP:  # interpreter: its bf16 dot is wrong; 16-bit products are exact in fp32
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    tl.store(ptrs, cast(acc, y_ptr.dtype.element_ty, INTERP), mask=mask_m[:, None] & mask_n[None, :])


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
        w = w_hat_tile(offs_n, offs_k, mask_n, mask_k, packed_ptr, bscale_ptr, bzero_ptr, wscale_ptr,
                        wzero_ptr, delta_ptr, a_ptr, b_ptr, K, WORDS, N_GROUPS, stride_dn,
                        lora_scaling, BITS, SQMIN, SQMAX, QMIN, QMAX, GROUP, HAS_BZERO, HAS_WZERO,
                        HAS_DELTA, HAS_LORA, RANK, LORA_DTYPE, BASE_DTYPE, OUT_DTYPE, INTERP,
                        BLOCK_N, BLOCK_K)
        w = cast(w, g.dtype, INTERP)
        if INTERP:  # interpreter: its bf16 dot is wrong; 16-bit products are exact in fp32
            g, w = g.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(g, w, input_precision=PRECISION)
    ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :]
    tl.store(ptrs, cast(acc, dx_ptr.dtype.element_ty, INTERP), mask=mask_m[:, None] & mask_k[None, :])


# --------------------------------------------------------------------------- launchers
def _weight_only(kernel, result_dtype, w: WeightArgs, block_n, block_k):
    """Launch a one-tile-per-program kernel over the weight alone ([out, in] ``result_dtype``)."""
    check_one_delta(w)
    ptrs, scalars, const = tile_args(w)
    n, k = w.out_features, w.in_features
    out = torch.empty(n, k, dtype=result_dtype, device=w.base_packed.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    kernel[grid](out, *ptrs, n, k, *scalars, **const, INTERP=INTERPRETED,
                 BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def launch_dequant_fakequant(w: WeightArgs, block_n: int = 32, block_k: int = 64):
    """W_hat [out, in] in ``w.out_dtype``; D from ``delta`` or from the LoRA factors."""
    return _weight_only(_dequant_kernel, w.out_dtype, w, block_n, block_k)


def launch_quant_codes(w: WeightArgs, block_n: int = 32, block_k: int = 64):
    """The codes [out, in] int8 the kernels' W_hat is built from (what export writes)."""
    return _weight_only(_codes_kernel, torch.int8, w, block_n, block_k)


def launch_lora_delta(lora_a, lora_b, lora_scaling, block_n: int = 32, block_k: int = 64):
    """D = scaling * B A [out, in] fp32 as the kernels form it tile by tile (for tests)."""
    n, k = lora_b.shape[0], lora_a.shape[1]
    factors = WeightArgs(lora_b, lora_b, None, lora_b, None, None, 1, 0, 0, 1, k, torch.float32,
                         lora_a, lora_b, lora_scaling)  # only the LoRA fields are read
    a, b, scaling, const = lora_launch_args(factors, None)
    out = torch.empty(n, k, dtype=torch.float32, device=lora_a.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _lora_delta_kernel[grid](out, a, b, n, k, scaling, RANK=const["RANK"],
                             LORA_DTYPE=const["LORA_DTYPE"], INTERP=INTERPRETED,
                             BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def launch_quant_linear_fwd(x, w: WeightArgs, block_m: int = 64, block_n: int = 64,
                            block_k: int = 64):
    """y [..., out] = x [..., in] @ W_hat^T in x's dtype."""
    if x.dtype not in TL_DTYPES:
        raise ValueError(f"triton kernels take fp32/fp16/bf16 activations, got {x.dtype}")
    check_one_delta(w)
    ptrs, scalars, const = tile_args(w)
    n, k = w.out_features, w.in_features
    x2 = as_rows(x, k)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fwd_kernel[grid](x2, y, *ptrs, m, n, k, *scalars, x2.stride(0), y.stride(0), **const,
                      PRECISION=precision(x.dtype), INTERP=INTERPRETED, BLOCK_M=block_m,
                      BLOCK_N=block_n, BLOCK_K=block_k)
    return y.reshape(*x.shape[:-1], n)


def launch_quant_linear_dx(grad_y, w: WeightArgs, block_m: int = 64, block_n: int = 64,
                           block_k: int = 64):
    """dX [..., in] = grad_y [..., out] @ W_hat in grad_y's dtype."""
    if grad_y.dtype not in TL_DTYPES:
        raise ValueError(f"triton kernels take fp32/fp16/bf16 gradients, got {grad_y.dtype}")
    check_one_delta(w)
    ptrs, scalars, const = tile_args(w)
    n, k = w.out_features, w.in_features
    g2 = as_rows(grad_y, n)
    m = g2.shape[0]
    dx = torch.empty(m, k, dtype=grad_y.dtype, device=grad_y.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(k, block_k))
    _dx_kernel[grid](g2, dx, *ptrs, m, n, k, *scalars, g2.stride(0), dx.stride(0), **const,
                     PRECISION=precision(grad_y.dtype), INTERP=INTERPRETED, BLOCK_M=block_m,
                     BLOCK_N=block_n, BLOCK_K=block_k)
    return dx.reshape(*grad_y.shape[:-1], k)
