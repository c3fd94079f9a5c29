"""The W_hat tile helpers every weight kernel builds on, and the launch arguments they read.

    W0    = s0 * (q0 - z0)                      q0 unpacked from int32 words (cross-word layout)
    D     = a dense delta [out, in], or for a plain LoRA scaling * B A formed per tile in
            registers from A [r, in] and B [out, r] (a fixed fma chain over r, lora_tile)
    W_hat = s * (clamp(round((W0 + D) / s) + z) - z)        codes = clamp(round((W0 + D)/s) + z)

    lora_tile       D[offs_n, offs_k] in fp32 registers
    pre_quant_tile  (W0 + D) tile and each element's group index
    steps_tile      (s, v = w / s, z) of a tile
    codes_tile      the integer codes of a tile (what export writes)
    w_hat_tile      W_hat of a tile, rounded to OUT_DTYPE
    tile_args       launcher side: a WeightArgs as the pointers, runtime scalars and constexprs
                    the helpers above take

Constexpr parameters shared by every weight kernel, in this order after the runtime ones:
    BITS SQMIN SQMAX (storage grid)  QMIN QMAX (trained grid)  GROUP
    HAS_BZERO HAS_WZERO HAS_DELTA (dense D read)  HAS_LORA RANK LORA_DTYPE (D = scaling B A in
    registers)  BASE_DTYPE  OUT_DTYPE
and the runtime weight scalars WORDS N_GROUPS stride_dn lora_scaling after M / N / K.

Imports triton at import time: import lazily (see triton_common).
"""

from __future__ import annotations

import triton
import triton.language as tl

from qat.kernels.args import WeightArgs
from qat.kernels.triton_common import TL_DTYPES, cast, round_half_even


@triton.jit
def lora_tile(offs_n, offs_k, mask_n, mask_k, a_ptr, b_ptr, K, lora_scaling,
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
    acc = cast(acc, LORA_DTYPE, INTERP).to(tl.float32)
    return cast(acc * lora_scaling, LORA_DTYPE, INTERP).to(tl.float32)


@triton.jit
def pre_quant_tile(
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
        z0 = tl.minimum(tl.maximum(round_half_even(z0), SQMIN), SQMAX)
        q0 = q0 - z0
    w = cast(q0 * s0, BASE_DTYPE, INTERP).to(tl.float32)
    if HAS_DELTA:
        w += tl.load(delta_ptr + rows * stride_dn + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_LORA:
        w += lora_tile(offs_n, offs_k, mask_n, mask_k, a_ptr, b_ptr, K, lora_scaling, RANK,
                        LORA_DTYPE, INTERP, BLOCK_N, BLOCK_K)
    return w, gidx


@triton.jit
def steps_tile(w, gidx, mask, wscale_ptr, wzero_ptr,
                QMIN: tl.constexpr, QMAX: tl.constexpr, HAS_WZERO: tl.constexpr):
    """(s, v = w / s, z) for a [BN, BK] tile: the learned step, the scaled weight (division
    rounded to nearest, as torch's) and the zero point rounded and clamped to the grid (zeros
    when symmetric)."""
    s = tl.load(wscale_ptr + gidx, mask=mask, other=1.0).to(tl.float32)
    v = tl.math.div_rn(w, s)
    if HAS_WZERO:
        z = tl.load(wzero_ptr + gidx, mask=mask, other=0.0).to(tl.float32)
        z = tl.minimum(tl.maximum(round_half_even(z), QMIN), QMAX)
    else:
        z = tl.zeros_like(v)
    return s, v, z


@triton.jit
def codes_tile(
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
    w, gidx = pre_quant_tile(offs_n, offs_k, mask_n, mask_k, packed_ptr, bscale_ptr, bzero_ptr,
                              delta_ptr, a_ptr, b_ptr, K, WORDS, N_GROUPS, stride_dn, lora_scaling,
                              BITS, SQMIN, SQMAX, GROUP, HAS_BZERO, HAS_DELTA, HAS_LORA, RANK,
                              LORA_DTYPE, BASE_DTYPE, INTERP, BLOCK_N, BLOCK_K)
    s, v, z = steps_tile(w, gidx, mask, wscale_ptr, wzero_ptr, QMIN, QMAX, HAS_WZERO)
    # Same order as qat.primitives.fake_quantize: add z, clamp, round (ties to even).
    if HAS_WZERO:
        v = v + z
    c = round_half_even(tl.minimum(tl.maximum(v, QMIN), QMAX))
    return c, s, z


@triton.jit
def w_hat_tile(
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
    c, s, z = codes_tile(offs_n, offs_k, mask_n, mask_k, packed_ptr, bscale_ptr, bzero_ptr,
                          wscale_ptr, wzero_ptr, delta_ptr, a_ptr, b_ptr, K, WORDS, N_GROUPS,
                          stride_dn, lora_scaling, BITS, SQMIN, SQMAX, QMIN, QMAX, GROUP, HAS_BZERO,
                          HAS_WZERO, HAS_DELTA, HAS_LORA, RANK, LORA_DTYPE, BASE_DTYPE, INTERP,
                          BLOCK_N, BLOCK_K)
    # (c - z) * s is exact in fp32 (small integer times a step): one rounding, to OUT_DTYPE.
    if HAS_WZERO:
        c = c - z
    w_hat = cast(c * s, OUT_DTYPE, INTERP)
    return tl.where(mask_n[:, None] & mask_k[None, :], w_hat, 0.0)


# --------------------------------------------------------------------------- launcher side
def lora_launch_args(w: WeightArgs, dummy):
    """(a, b pointer tensors, scaling, constexpr kwargs) for D = scaling * B A formed in the
    kernels; D is formed there only when the factors come without a dense ``delta``."""
    in_kernel = w.has_lora and w.delta is None
    lora_a, lora_b = w.lora_a, w.lora_b
    if in_kernel:
        if lora_b is None or lora_a.dtype not in TL_DTYPES or lora_b.dtype != lora_a.dtype:
            raise ValueError("in-kernel LoRA needs lora_a [r, in] and lora_b [out, r] of one "
                             f"float dtype, got {lora_a.dtype} / {None if lora_b is None else lora_b.dtype}")
        lora_a, lora_b = lora_a.contiguous(), lora_b.contiguous()
    const = dict(HAS_LORA=in_kernel, RANK=lora_a.shape[0] if in_kernel else 0,
                 LORA_DTYPE=TL_DTYPES[lora_a.dtype] if in_kernel else tl.float32)
    if not in_kernel:
        return dummy, dummy, 1.0, const
    return lora_a, lora_b, float(w.lora_scaling), const


def tile_args(w: WeightArgs) -> tuple:
    """(pointer tensors, runtime scalars, constexpr kwargs) of the weight for every kernel.
    D is ``delta`` [out, in] when given, else scaling * B A formed in-kernel when the LoRA
    factors are given, else 0."""
    if w.out_dtype not in TL_DTYPES or w.base_scale.dtype not in TL_DTYPES:
        raise ValueError(f"triton kernels take fp32/fp16/bf16, got {w.out_dtype} / {w.base_scale.dtype}")
    words = w.base_packed.shape[1]
    n_groups = w.in_features // w.group_size
    base_scale = w.base_scale.contiguous()
    sq_half = 1 << (w.storage_bits - 1)
    dummy = base_scale  # never read when the matching HAS_* flag is False
    delta = w.delta
    if delta is not None:
        delta = delta if delta.stride(-1) == 1 else delta.contiguous()
    a, b, scaling, lora_const = lora_launch_args(w, dummy)
    ptrs = (
        w.base_packed.contiguous(), base_scale,
        dummy if w.base_zero is None else w.base_zero.contiguous(),
        w.weight_scale.contiguous(),
        dummy if w.weight_zero is None else w.weight_zero.contiguous(),
        dummy if delta is None else delta,
        a, b,
    )
    scalars = (words, n_groups, 0 if delta is None else delta.stride(0), scaling)
    const = dict(
        BITS=w.storage_bits, SQMIN=-sq_half, SQMAX=sq_half - 1, QMIN=w.bits_qmin, QMAX=w.bits_qmax,
        GROUP=w.group_size, HAS_BZERO=w.base_zero is not None, HAS_WZERO=w.weight_zero is not None,
        HAS_DELTA=delta is not None, **lora_const, BASE_DTYPE=TL_DTYPES[base_scale.dtype],
        OUT_DTYPE=TL_DTYPES[w.out_dtype],
    )
    return ptrs, scalars, const
