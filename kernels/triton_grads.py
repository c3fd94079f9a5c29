"""Triton kernel: the backward reductions of y = x W_hat^T (steps, zero points, inside adapter).

    launch_quant_linear_grads(grad_y, x, w, lsq_scale, delta_grad)
        -> (d weight_scale [out, G], d weight_zero [out, G], d delta [out, in],
            d lora_A [r, in], d lora_B [out, r])                  (empty [0] where not asked)

G = grad_y^T x is accumulated tile by tile in registers and never stored; see
``_grads_kernel``. ``w`` is a ``WeightArgs`` (kernels/args.py); the W_hat tile helpers are in
triton_tiles.py. Imports triton at import time: import lazily (see triton_common).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qat.kernels.args import WeightArgs
from qat.kernels.support import grads_block_k
from qat.kernels.triton_common import INTERPRETED, TL_DTYPES, as_rows, cast, precision, round_half_even
from qat.kernels.triton_tiles import pre_quant_tile, steps_tile, tile_args


@triton.jit
def store_group_sums(ptr, e, offs_n, mask_n, pid_k, NSLOTS,
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
        x = cast(x, g.dtype, INTERP)  # the reference multiplies x.to(grad_y.dtype)
        if INTERP:  # interpreter: its bf16 dot is wrong; 16-bit products are exact in fp32
            g, x = g.to(tl.float32), x.to(tl.float32)
        acc += tl.dot(tl.trans(g), x, input_precision=PRECISION)                     # [BN, BK]

    mask = mask_n[:, None] & mask_k[None, :]
    w, gidx = pre_quant_tile(offs_n, offs_k, mask_n, mask_k, packed_ptr, bscale_ptr, bzero_ptr,
                              delta_ptr, a_ptr, b_ptr, K, WORDS, N_GROUPS, stride_dn, lora_scaling,
                              BITS, SQMIN, SQMAX, GROUP, HAS_BZERO, HAS_DELTA, HAS_LORA, RANK,
                              LORA_DTYPE, BASE_DTYPE, INTERP, BLOCK_N, BLOCK_K)
    s, v, z = steps_tile(w, gidx, mask, wscale_ptr, wzero_ptr, QMIN, QMAX, HAS_WZERO)
    u = v + z
    # torch.clamp passes the gradient where QMIN <= u <= QMAX (bounds included).
    inside = (u >= QMIN) & (u <= QMAX)
    q = round_half_even(tl.minimum(tl.maximum(u, QMIN), QMAX))
    G = tl.where(mask, acc, 0.0)
    # (q - z) - v is formed from the two terms separately, as the reference's autograd does.
    store_group_sums(ds_ptr, G * ((q - z) - tl.where(inside, v, 0.0)), offs_n, mask_n, pid_k,
                      NSLOTS, GPB, BLOCK_N, BLOCK_K)
    if HAS_WZERO:
        store_group_sums(dz_ptr, tl.where(inside, 0.0, -(G * s)), offs_n, mask_n, pid_k, NSLOTS,
                          GPB, BLOCK_N, BLOCK_K)
    dd = tl.where(inside, G, 0.0)  # [BN, BK] fp32, the STE-masked gradient w.r.t. W0 + D
    if DELTA_GRAD:
        ptrs = dd_ptr + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
        tl.store(ptrs, cast(dd, dd_ptr.dtype.element_ty, INTERP), mask=mask)
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


# --------------------------------------------------------------------------- launcher
def launch_quant_linear_grads(grad_y, x, w: WeightArgs, lsq_scale: float, delta_grad: bool = False,
                              block_m: int = 64, block_n: int = 64, block_k: int = 64):
    """(grad weight_scale, grad weight_zero, grad delta, grad lora_A, grad lora_B), empty [0]
    tensors for the ones not asked for; the semantics of ``qat::quant_linear_grads``.
    With LoRA factors and no ``delta``, D is formed in-kernel (as the forward kernels do);
    with both, ``delta`` must be scaling * B A and is read (the dense-D path)."""
    if grad_y.dtype not in TL_DTYPES or x.dtype not in TL_DTYPES:
        raise ValueError(f"triton kernels take fp32/fp16/bf16 activations, got {grad_y.dtype} / {x.dtype}")
    bk = grads_block_k(w.group_size, block_k)
    if not bk:
        raise ValueError(f"group size {w.group_size} has no power-of-two tile >= 16: use the reference")
    lora = w.has_lora
    if lora and w.lora_b is None:
        raise ValueError("LoRA gradients need both lora_a and lora_b")
    ptrs, scalars, const = tile_args(w)
    n, in_features = w.out_features, w.in_features
    g2, x2 = as_rows(grad_y, n), as_rows(x, in_features)
    m, dev = g2.shape[0], grad_y.device
    n_groups = in_features // w.group_size
    gpb = max(1, bk // w.group_size)          # whole groups per tile (1 when a tile is inside a group)
    kt, nt = triton.cdiv(in_features, bk), triton.cdiv(n, block_n)
    nslots = n_groups if gpb > 1 else kt      # gpb == 1: kt = n_groups * (group_size // bk) parts
    f32 = dict(dtype=torch.float32, device=dev)

    def empty():  # a fresh [0] tensor per unused output (op outputs may not alias each other)
        return w.weight_scale.new_empty(0)

    ds_part = torch.empty(n, nslots, **f32)
    dz_part = torch.empty(n, nslots, **f32) if w.weight_zero is not None else ds_part
    want_dd = delta_grad and w.delta is not None and not lora
    dd = torch.empty(n, in_features, dtype=w.delta.dtype, device=dev) if want_dd else ds_part
    r = w.lora_a.shape[0] if lora else 0
    r_pad = max(16, triton.next_power_of_2(r)) if lora else 16
    db_part = da_part = ds_part
    if lora:
        db_part = torch.empty(kt, n, r_pad, **f32)             # per-k-tile dDelta A^T
        da_part = torch.empty(nt, r_pad, in_features, **f32)   # per-n-tile B^T dDelta
        # The dA / dB reduction reads the factors through the a / b pointers the D tile uses;
        # on the dense-D path (delta given too) tile_args left dummies there.
        ptrs = ptrs[:6] + (w.lora_a.contiguous(), w.lora_b.contiguous())
        const["RANK"] = r
    _grads_kernel[(nt, kt)](
        g2, x2, *ptrs, ds_part, dz_part, dd, db_part, da_part,
        m, n, in_features, *scalars, g2.stride(0), x2.stride(0), nslots, **const,
        PRECISION=precision(grad_y.dtype), INTERP=INTERPRETED, DELTA_GRAD=want_dd, LORA=lora,
        R_PAD=r_pad, GPB=gpb, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=bk)
    # [N, NSLOTS] -> [N, G]: sum a group's parts (a no-op view when tiles hold whole groups).
    ds = ds_part.reshape(n, n_groups, -1).sum(-1)
    grad_scale = (ds * lsq_scale).to(w.weight_scale.dtype)
    grad_zero = empty()
    if w.weight_zero is not None:
        dz = dz_part.reshape(n, n_groups, -1).sum(-1)
        # The zero point is used as clamp(round(z)): no gradient where round(z) is off the grid.
        zr = torch.round(w.weight_zero)
        on_grid = (zr >= w.bits_qmin) & (zr <= w.bits_qmax)
        grad_zero = torch.where(on_grid, dz * lsq_scale, 0.0).to(w.weight_zero.dtype)
    grad_a, grad_b = empty(), empty()
    if lora:
        grad_b = (db_part.sum(0)[:, :r] * w.lora_scaling).to(w.lora_b.dtype)   # [N, r]
        grad_a = (da_part.sum(0)[:r] * w.lora_scaling).to(w.lora_a.dtype)       # [r, K]
    return grad_scale, grad_zero, dd if want_dd else empty(), grad_a, grad_b
