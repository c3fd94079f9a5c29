"""LoRA adapter for QuantLinear's adapter slot: D = (alpha / r) B A.

    lora_A [r, in]   kaiming-uniform (as peft), so B's gradient is nonzero from step one
    lora_B [out, r]  zeros, so the adapter starts as the identity change (D = 0)

placement "inside":  QuantLinear rounds W0 + D (delta_weight), so the adapter trains through the STE
placement "outside": QuantLinear adds forward(x) = dropout(x) A^T B^T (alpha / r) after the quantized matmul
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qat.adapter import LowRankFactors, check_placement



def check_rank(rank: int, in_features: int, out_features: int, name: str = "layer") -> int:
    limit = min(in_features, out_features)
    if not isinstance(rank, int) or rank < 1 or rank > limit:
        raise ValueError(
            f"LoRA rank {rank!r} does not fit {name} ([{out_features}, {in_features}]): "
            f"use an integer rank between 1 and {limit} = min(in, out)"
        )
    return rank


class LoRAAdapter(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, placement: str = "inside", name: str = "layer",
                 device=None, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank = check_rank(rank, in_features, out_features, name)
        self.alpha = float(alpha)
        self.placement = check_placement(placement)
        if placement == "inside" and dropout:
            # Dropout acts on x; an inside adapter never sees x (it is folded into the weight).
            raise ValueError("dropout needs placement='outside': an inside adapter is merged into the weight")
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's default

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        """D = (alpha / r) B A, [out, in]."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def low_rank_factors(self) -> LowRankFactors | None:
        """(A, B, scaling) for the fused kernels (qat.adapter's optional method): D is exactly
        (B @ A) * scaling. None for a subclass that computes D some other way."""
        if type(self).delta_weight is not LoRAAdapter.delta_weight:
            return None
        return LowRankFactors(self.lora_A, self.lora_B, self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out] without building D: two thin matmuls through rank r."""
        h = self.dropout(x) @ self.lora_A.t().to(x.dtype)  # [..., r]
        return (h @ self.lora_B.t().to(x.dtype)) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, placement={self.placement!r}"
