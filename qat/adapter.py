"""The adapter protocol: what ``QuantLinear.adapter`` holds and what the kernels may ask of it.

    placement        "inside": D is added to W0 before fake quantization (W_hat rounds W0 + D)
                     "outside": forward(x) is added after the quantized matmul (QLoRA-style)
    delta_weight()   D [out, in], differentiable w.r.t. the adapter's parameters (inside)
    forward(x)       x [..., in] -> [..., out] (outside)
    low_rank_factors()  optional: ``LowRankFactors(a [r, in], b [out, r], scaling)`` when D is
                     exactly ``(b @ a) * scaling`` as ``delta_weight`` computes it, else None.
                     The fused kernels then form D tile by tile in registers and reduce the
                     factors' gradients themselves, never building a dense D.

The core (``qat.quant_linear``, ``qat.kernels``) depends on this protocol only; concrete
adapters (``qat.adapters``) implement it. Imports flow one way: adapters -> qat -> kernels.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, runtime_checkable

import torch

PLACEMENTS = ("inside", "outside")


def check_placement(placement: str) -> str:
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown adapter placement {placement!r}: use one of {PLACEMENTS}")
    return placement


class LowRankFactors(NamedTuple):
    a: torch.Tensor        # [r, in]
    b: torch.Tensor        # [out, r]
    scaling: float         # D = (b @ a) * scaling


@runtime_checkable
class Adapter(Protocol):
    placement: str

    def delta_weight(self) -> torch.Tensor: ...

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...


def inside_adapter(layer) -> Optional[Adapter]:
    """The layer's adapter when it is placed inside (its D is rounded with the weight)."""
    adapter = layer.adapter
    return adapter if adapter is not None and adapter.placement == "inside" else None


def low_rank_factors(adapter) -> Optional[LowRankFactors]:
    """The adapter's ``low_rank_factors()`` (the optional method of the protocol), else None."""
    method = getattr(adapter, "low_rank_factors", None)
    return None if method is None else method()
