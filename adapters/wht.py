"""Walsh-Hadamard adapter (QWHA): a sparse set of Hadamard coefficients per output row.

    D = c * S @ H / n      S [out, in] sparse: fixed positions (rows, cols) + trainable values
                           H [n, n] Hadamard, n = in_features, H H^T = n I
                           c = alpha / sqrt(out)  (keeps D's scale independent of the layer width)

Row i of D is the inverse-transform-like image of row i of S, so a few coefficients reach every
input column: a full-rank update from nnz = r * (in + out) values, LoRA rank r's parameter count.

placement "inside":  delta_weight() materialises D [out, in] (QuantLinear rounds W0 + D)
placement "outside": forward(x) = (c/n * x H^T) S^T as a sparse (CSR) matmul, O(N * nnz); never
                     builds the dense [out, in] D. The transform z = c/n x H^T goes through
                     qat.kernels.dispatch.fwht (a one-pass Triton kernel on the kernel path).
                     Backward: dz = dy S (CSC view of the same S) and
                     d values = (dy^T z) sampled at the support (sampled_addmm): no index gathers of
                     [N, nnz] tensors, which made the first version 3x slower than LoRA.

Positions are kept in row-major order (sorted by row * in + col), the CSR order, so the values
vector is the CSR values vector as is.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from qat.hadamard import factor, fwht
from qat.adapter import check_placement
from qat.kernels import dispatch


def default_budget(rank: int, in_features: int, out_features: int) -> int:
    """nnz matching a LoRA of rank r: r * (in + out), capped at the dense size."""
    return min(rank * (in_features + out_features), in_features * out_features)


def random_positions(out_features: int, in_features: int, budget: int, generator=None):
    """(rows, cols) int64 [budget], uniform over the [out, in] grid without repeats."""
    flat = torch.randperm(out_features * in_features, generator=generator)[:budget].sort().values
    return flat // in_features, flat % in_features


def _csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """S as a CSR tensor; rows/cols in row-major order (their stored order), values [nnz]."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta": the ops used here are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)


class _SparseProject(torch.autograd.Function):
    """y = z S^T for z [N, in], S [out, in] sparse with fixed support and trainable values [nnz]."""

    @staticmethod
    def forward(ctx, z, values, rows, cols, out_features):
        S = _csr(rows, cols, values, (out_features, z.shape[1]))
        ctx.save_for_backward(z, values, rows, cols)
        ctx.out_features = out_features
        return (S @ z.t()).t()                                   # [N, out]  (CSR @ dense: N * nnz work)

    @staticmethod
    def backward(ctx, grad_y):
        z, values, rows, cols = ctx.saved_tensors
        shape = (ctx.out_features, z.shape[1])
        grad_z = grad_values = None
        if ctx.needs_input_grad[0]:
            S = _csr(rows, cols, values.detach(), shape)
            grad_z = (S.t() @ grad_y.t()).t()                    # dy S: S^T is S's CSC view, [N, in]
        if ctx.needs_input_grad[1]:
            pattern = _csr(rows, cols, torch.zeros_like(values), shape)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                sampled = torch.sparse.sampled_addmm(pattern, grad_y.t().contiguous(), z, beta=0.0)
            grad_values = sampled.values()                       # (dy^T z)[rows, cols], CSR order = ours
        return grad_z, grad_values, None, None, None


def _row_major(rows: torch.Tensor, cols: torch.Tensor, in_features: int) -> torch.Tensor:
    """Permutation that sorts positions by (row, col): the CSR order."""
    return (rows * in_features + cols).argsort()


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
        """Replace positions and values (used by the initialisers); nnz may change.

        Stored in row-major order (values permuted with their positions), which the sparse forward needs.
        """
        device = self.values.device
        rows, cols = rows.to(device, torch.int64), cols.to(device, torch.int64)
        order = _row_major(rows, cols, self.in_features)
        self.rows, self.cols = rows[order].contiguous(), cols[order].contiguous()
        self.values = nn.Parameter(values.to(device, self.values.dtype).detach()[order].clone())

    def sparse_dense(self) -> torch.Tensor:
        """S [out, in] dense (scatter of the values), differentiable w.r.t. values."""
        s = self.values.new_zeros(self.out_features, self.in_features)
        return s.index_put((self.rows, self.cols), self.values, accumulate=True)

    def delta_weight(self) -> torch.Tensor:
        """D = c S H / n, [out, in]: row i is H^T S_i (fwht with H_K transposed)."""
        return fwht(self.sparse_dense(), transpose=True) * self.coef

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> x D^T = (c/n x H^T) S^T, [..., out], with no dense D."""
        # z = c/n x H^T [N, in] in the values' dtype (fp32; a bf16 transform would round at each
        # stage). dispatch.fwht: one-pass Triton kernel (coef folded into its store) on the
        # kernel path, the torch GEMM-blocked fwht otherwise; differentiable either way.
        z = dispatch.fwht(x.reshape(-1, self.in_features), scale=self.coef, out_dtype=self.values.dtype)
        if z.device.type in ("cpu", "cuda"):                               # CSR kernels exist there
            y = _SparseProject.apply(z, self.values, self.rows, self.cols, self.out_features)
        else:
            y = z @ self.sparse_dense().t()                                 # dense fallback, [N, out]
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"nnz={self.values.numel()}, rank={self.rank}, alpha={self.alpha}, placement={self.placement!r}"
