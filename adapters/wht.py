"""Walsh-Hadamard adapter (QWHA): a sparse set of Hadamard coefficients per output row.

    D = c * S @ H / n      S [out, in] sparse: fixed positions (rows, cols) + trainable values
                           H [n, n] Hadamard, n = in_features, H H^T = n I
                           c = alpha / sqrt(out)  (keeps D's scale independent of the layer width)

Row i of D is the inverse-transform-like image of row i of S, so a few coefficients reach every
input column: a full-rank update from nnz = r * (in + out) values, LoRA rank r's parameter count.

placement "inside":  delta_weight() materialises D [out, in] (QuantLinear rounds W0 + D)
placement "outside": forward(x) = c/n * (H x) gathered at cols, scaled by values, summed into
                     rows; never builds the dense [out, in] D.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qat.adapters.hadamard import factor, fwht
from qat.adapters.lora import check_placement


def default_budget(rank: int, in_features: int, out_features: int) -> int:
    """nnz matching a LoRA of rank r: r * (in + out), capped at the dense size."""
    return min(rank * (in_features + out_features), in_features * out_features)


def random_positions(out_features: int, in_features: int, budget: int, generator=None):
    """(rows, cols) int64 [budget], uniform over the [out, in] grid without repeats."""
    flat = torch.randperm(out_features * in_features, generator=generator)[:budget].sort().values
    return flat // in_features, flat % in_features


class WHTAdapter(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int = 8, alpha: float = 1.0,
                 placement: str = "inside", budget: int | None = None, name: str = "layer",
                 device=None, dtype=torch.float32, generator=None):
        super().__init__()
        try:
            factor(in_features)
        except ValueError as err:
            raise ValueError(f"{name}: WHT adapter needs a Hadamard size for in_features: {err}") from None
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"WHT rank {rank!r}: use a positive integer (it sets the budget r * (in + out))")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.alpha = float(alpha)
        self.placement = check_placement(placement)
        budget = default_budget(rank, in_features, out_features) if budget is None else int(budget)
        rows, cols = random_positions(out_features, in_features, budget, generator)
        # Positions are fixed buffers (saved with the state dict, never trained).
        self.register_buffer("rows", rows.to(device))
        self.register_buffer("cols", cols.to(device))
        self.values = nn.Parameter(torch.zeros(budget, device=device, dtype=dtype))

    @property
    def coef(self) -> float:
        """c / n: the whole constant in front of S @ H."""
        return self.alpha / math.sqrt(self.out_features) / self.in_features

    def set_support(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> None:
        """Replace positions and values (used by the initialisers); nnz may change."""
        self.rows = rows.to(self.values.device, torch.int64)
        self.cols = cols.to(self.values.device, torch.int64)
        self.values = nn.Parameter(values.to(self.values.device, self.values.dtype).detach().clone())

    def sparse_dense(self) -> torch.Tensor:
        """S [out, in] dense (scatter of the values), differentiable w.r.t. values."""
        s = self.values.new_zeros(self.out_features, self.in_features)
        return s.index_put((self.rows, self.cols), self.values, accumulate=True)

    def delta_weight(self) -> torch.Tensor:
        """D = c S H / n, [out, in]: row i is H^T S_i (fwht with H_K transposed)."""
        return fwht(self.sparse_dense(), transpose=True) * self.coef

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> x D^T = c/n (H x) S^T, [..., out], with no dense D."""
        # In the values' dtype (fp32): a bf16 butterfly would round at each of its log2(n) stages.
        z = fwht(x.to(self.values.dtype))                            # [..., in]  = x H^T
        picked = z[..., self.cols] * self.values                     # [..., nnz]
        y = z.new_zeros(*x.shape[:-1], self.out_features)
        return (y.index_add(-1, self.rows, picked) * self.coef).to(x.dtype)  # [..., out]

    def extra_repr(self) -> str:
        return f"nnz={self.values.numel()}, rank={self.rank}, alpha={self.alpha}, placement={self.placement!r}"
