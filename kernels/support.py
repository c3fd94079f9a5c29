"""What the Triton kernels accept, decided without importing triton.

Shared by ``dispatch`` (which path a call takes) and ``ops`` (whether an op's CUDA
implementation may launch a kernel), so both ask the same questions in the same words:
dtypes, the grads kernel's tile, the fwht kernel's tile, and whether triton imports at all.
"""

from __future__ import annotations

import functools

import torch

from qat.hadamard import factor

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# Integer dtypes the pack kernel reads codes from (qat.packing accepts any integer dtype).
PACK_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)

# The fwht kernel holds whole rows in registers, K_PAD * P fp32 values each, and the padded H_K
# factor, K_PAD^2 fp32 (kernels/hadamard_kernels.py). The caps keep both within one SM's
# registers and shared memory (16384 fp32 = 64 KiB per row; H_64 = 16 KiB); wider rows (e.g.
# 13824 = 108 * 128, K_PAD 128) run the torch reference until a GPU session measures a
# split-row variant.
FWHT_MAX_ROW = 16384
FWHT_MAX_K_PAD = 64


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401  (optional dependency: probed, never required)
    except Exception:
        return False
    return True


def floats(*tensors) -> bool:
    """Whether every given tensor (None skipped) has a dtype the kernels compute in."""
    return all(t is None or t.dtype in FLOATS for t in tensors)


def grads_block_k(group_size: int, block_k: int = 64) -> int:
    """Tile width along `in` for the grads kernel: a tile lies inside one group or holds whole
    groups, so per-group sums need no cross-tile bookkeeping. 0 when none works (a group whose
    largest power-of-two divisor is below 16, tl.dot's minimum): the caller uses the reference."""
    if group_size % block_k == 0 or block_k % group_size == 0:
        return block_k
    bk = group_size & -group_size  # largest power of two dividing the group
    bk = min(bk, block_k)
    return bk if bk >= 16 else 0


def fwht_tile(n: int) -> tuple[int, int, int] | None:
    """(K, K_PAD, P) of the fwht kernel's per-row tile [K_PAD, P] for width n = K * P (K_PAD:
    K rounded up to a power of two); None when n has no Hadamard factorisation or the padded
    row or H_K exceeds the caps above (those widths run the torch reference)."""
    try:
        k, p = factor(n)
    except ValueError:
        return None
    k_pad = 1 << (k - 1).bit_length()
    return (k, k_pad, p) if k_pad * p <= FWHT_MAX_ROW and k_pad <= FWHT_MAX_K_PAD else None
