"""Triton helpers every kernel module shares: dtypes, rounding and interpreter switches.

    TL_DTYPES         torch float dtype -> triton dtype (the kernels compute in these only)
    INTERPRETED       whether triton.jit runs the interpreter (TRITON_INTERPRET=1, the CPU tests)
    cast              x.to(DTYPE), rounding bf16 to nearest even also under the interpreter
    round_half_even   torch.round's ties-to-even, portable
    precision, as_rows  launcher-side: tl.dot precision for a dtype, a [rows, width] view

This module imports triton at import time: import it lazily, after setting TRITON_INTERPRET
for CPU tests (as every kernel module here).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
SUPPORTED_DTYPES = tuple(TL_DTYPES)
# triton.jit picks the interpreter when it decorates, i.e. at this module's import.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def rne_bf16(x):
    """fp32 -> fp32 holding the nearest bf16, ties to even (the interpreter's cast truncates)."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.to(tl.float32, bitcast=True)


@triton.jit
def cast(x, DTYPE: tl.constexpr, INTERP: tl.constexpr):
    """x.to(DTYPE) rounding to nearest even, also under the interpreter."""
    if INTERP:
        if DTYPE == tl.bfloat16:
            x = rne_bf16(x.to(tl.float32))
    return x.to(DTYPE)


@triton.jit
def round_half_even(x):
    """torch.round semantics (ties to even), portable (no libdevice, works in the interpreter)."""
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


def precision(dtype) -> str:
    """tl.dot's input precision for activations of ``dtype``: exact fp32 products for fp32,
    tf32 otherwise (ignored for 16-bit inputs)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def as_rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """t [..., width] as a 2-D [rows, width] view with unit inner stride (a copy if needed)."""
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()
