"""Error-aware adapter initialisations for the outside placement: y = x Q^T + x D^T.

Notation (all [out, in] unless said):
    W   the float weight the layer was quantized from (passed in: the packed base cannot give it back)
    Q   the layer's quantized weight (fake_quant of the base with the layer's steps)
    E   = W - Q, the quantization error an adapter D should cancel
    X   calibration inputs [N, in];  G = X^T X + ridge I = R^T R  (R upper triangular)

Objectives: plain  ||E - D||_F  (LoftQ)  or activation-weighted  ||X (E - D)^T||_F = ||(E - D) R^T||_F.

Why outside only: with the inside placement W_hat = fake_quant(W0 + D) and W0 already on the grid,
a D of the size of E (below half a step) rounds away, so these inits would do nothing there.
"""

from __future__ import annotations

import torch
from torch import nn

from qat import primitives as P
from qat.adapters.hadamard import fwht
from qat.adapters.lora import LoRAAdapter
from qat.adapters.wht import WHTAdapter


# ----------------------------------------------------------------------------- calibration
@torch.no_grad()
def collect_inputs(model: nn.Module, layer_names: list[str], batches) -> dict[str, torch.Tensor]:
    """Run ``batches`` once through ``model``; return name -> X [N, in] (fp32, CPU) per layer.

    A batch is a dict (passed as ``model(**batch)``) or a tensor (``model(batch)``).
    """
    store: dict[str, list[torch.Tensor]] = {n: [] for n in layer_names}
    hooks = []
    for name in layer_names:
        module = model.get_submodule(name)

        def hook(_module, args, _name=name):
            x = args[0]
            store[_name].append(x.detach().reshape(-1, x.shape[-1]).float().cpu())

        hooks.append(module.register_forward_pre_hook(hook))
    try:
        for batch in batches:
            model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        for h in hooks:
            h.remove()
    return {n: torch.cat(xs) for n, xs in store.items() if xs}


def gram_factor(X: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """R [in, in] upper triangular with R^T R = X^T X + ridge * mean(diag) I (float64).

    The ridge (relative to the mean input energy) keeps R invertible when N < in or X is rank-deficient.
    """
    X = X.double()
    G = X.T @ X
    G = G + ridge * G.diagonal().mean().clamp_min(1e-12) * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.cholesky(G, upper=True)


# ----------------------------------------------------------------------------- quantizer
@torch.no_grad()
def base_codes_for(layer, w: torch.Tensor) -> torch.Tensor:
    """Codes [out, in] that store ``w`` in the layer's frozen-base grid (packed at storage_bits)."""
    return P.quantize_codes(w.float(), layer.base_scale, layer.base_zero_point,
                            layer.base_grid_bits, layer.group_size)


@torch.no_grad()
def layer_quant(layer, w: torch.Tensor) -> torch.Tensor:
    """Q(w): what the layer computes if its base stored ``w`` (base grid, then the layer's steps)."""
    w0 = P.dequantize(base_codes_for(layer, w), layer.base_scale, layer.base_zero_point,
                      layer.base_grid_bits, layer.group_size)
    scale, zero = layer._steps()
    return P.fake_quantize(w0, scale.float(), zero, layer.spec.bits, layer.group_size).float()


@torch.no_grad()
def quantized_weight(layer) -> torch.Tensor:
    """Q [out, in] fp32: the layer's own quantized weight, adapter excluded."""
    scale, zero = layer._steps()
    return P.fake_quantize(layer.base_weight(), scale.float(), zero, layer.spec.bits, layer.group_size).float()


# ----------------------------------------------------------------------------- LoRA
def _split_svd(M: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors of M [out, in]: (U sqrt(S) [out, r], sqrt(S) V^T [r, in])."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = S[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


@torch.no_grad()
def loftq(layer, W: torch.Tensor, rank: int, iters: int = 5, X: torch.Tensor | None = None,
          ridge: float = 1e-2):
    """LoftQ alternation; returns (B [out, r], A [r, in], base codes [out, in] for Q).

    Each step: Q = Q(W - B A) with the layer's grid; (B, A) = best rank-r fit of W - Q, either in
    Frobenius norm (X None) or activation-weighted (X given): SVD of (W - Q) R^T, then un-whiten A by
    R^{-T}. Returns the codes so the caller can store Q as the new frozen base.
    """
    W = W.double()
    R = None if X is None else gram_factor(X.to(W.device), ridge)
    B = W.new_zeros(W.shape[0], rank)
    A = W.new_zeros(rank, W.shape[1])
    for _ in range(max(1, iters)):
        stored = (W - B @ A).float()                 # what the base will hold: Q = Q(stored)
        Q = layer_quant(layer, stored).double()
        E = W - Q
        if R is None:
            B, A = _split_svd(E, rank)
        else:
            B, Aw = _split_svd(E @ R.T, rank)
            # A R^T = Aw  ->  A = Aw R^{-T}  (solve R A^T = Aw^T, R upper triangular)
            A = torch.linalg.solve_triangular(R, Aw.T, upper=True).T
    # The factors fit W - Q for the last Q, so the base keeps that Q (not a re-quantization of W - B A).
    return B.float(), A.float(), base_codes_for(layer, stored)


@torch.no_grad()
def init_lora_loftq(layer, adapter: LoRAAdapter, W, iters=5, X=None, ridge=1e-2) -> None:
    """Write LoftQ factors into ``adapter`` (undoing alpha/r) and Q into the layer's frozen base."""
    B, A, codes = loftq(layer, W, adapter.rank, iters, X, ridge)
    adapter.lora_B.copy_(B / adapter.scaling)
    adapter.lora_A.copy_(A)
    layer._set_base(codes, layer.base_scale, layer.base_zero_point)


# ----------------------------------------------------------------------------- WHT (QWHA)
def channel_budgets(E: torch.Tensor, total: int) -> torch.Tensor:
    """k_i [out] int64, sum = total, k_i proportional to ||E_i|| (largest remainders), k_i <= in."""
    out_features, in_features = E.shape
    weight = E.norm(dim=1).double().clamp_min(1e-30)
    share = weight / weight.sum() * total
    k = share.floor().long().clamp_max(in_features)
    for _ in range(out_features + 1):  # hand out what rounding and the cap left, largest remainders first
        left = total - int(k.sum())
        if left <= 0:
            break
        room = k < in_features
        rem = torch.where(room, share - k, torch.full_like(share, -float("inf")))
        take = rem.argsort(descending=True)[: min(left, int(room.sum()))]
        k[take] += 1
    return k


def _support_from_scores(score: torch.Tensor, k: torch.Tensor):
    """Top-k_i columns of each row of score [out, in] -> (rows, cols) flat, and padded cols [out, kmax]."""
    kmax = int(k.max())
    order = score.argsort(dim=1, descending=True)[:, :kmax]               # [out, kmax]
    keep = torch.arange(kmax, device=score.device)[None, :] < k[:, None]  # [out, kmax]
    rows = torch.arange(score.shape[0], device=score.device)[:, None].expand_as(order)
    return rows[keep], order[keep], order, keep


@torch.no_grad()
def _solve_values(E, R, cols_pad, keep, coef, chunk=1024) -> torch.Tensor:
    """Least squares per row on its support, batched: values [nnz] in row-major support order.

    Row i: minimise ||R (e_i - coef H^T s_i)||, s_i supported on J_i. With M = H G H^T (G = R^T R):
        (coef * M[J, J]) v = (H G e_i)[J]
    Padded slots (keep False) get an identity row and zero right side, so they solve to 0.
    """
    G = R.T @ R                                          # [in, in]
    M = fwht(fwht(G).T).T                                # H G H^T: fwht applies H to rows' last dim
    rhs_full = fwht(E @ G)                               # rows: (H G e_i)^T, [out, in]
    out = []
    for start in range(0, E.shape[0], chunk):            # chunks of rows bound memory (out x kmax^2)
        J = cols_pad[start:start + chunk]                 # [c, kmax]
        mask = keep[start:start + chunk].double()         # [c, kmax]
        MJ = M[J[:, :, None], J[:, None, :]] * coef       # [c, kmax, kmax]
        MJ = MJ * mask[:, :, None] * mask[:, None, :]
        eye = torch.eye(J.shape[1], dtype=MJ.dtype, device=MJ.device)
        MJ = MJ + eye * (1 - mask)[:, :, None]            # identity on padded slots
        MJ = MJ + eye * (1e-10 * coef * M.diagonal().mean())  # relative jitter: ill-conditioned supports stay solvable
        b = torch.gather(rhs_full[start:start + chunk], 1, J) * mask
        v = torch.linalg.solve(MJ, b.unsqueeze(-1)).squeeze(-1)
        out.append(v[mask.bool()])
    return torch.cat(out)


@torch.no_grad()
def init_wht(layer, adapter: WHTAdapter, W: torch.Tensor, X: torch.Tensor | None = None,
             positions: str = "qwha", ridge: float = 1e-2, generator=None) -> None:
    """QWHA init (positions='qwha') or the random-position baseline (positions='random').

    Budget k_i ∝ ||E_i||; QWHA scores column j of row i by ||b_j||^2 (H e_i)_j^2 with B = R H^T / n
    (the part of R e_i that coefficient j explains); values by batched least squares on the support.
    """
    W = W.double()
    E = W - quantized_weight(layer).double()                            # [out, in]
    n = E.shape[1]
    R = gram_factor(X.to(E.device), ridge) if X is not None else torch.eye(n, dtype=E.dtype, device=E.device)
    k = channel_budgets(E, adapter.values.numel())
    if positions == "qwha":
        b_norm2 = (fwht(R).pow(2).sum(0)) / n**2                         # ||b_j||^2 = ||R H^T e_j||^2 / n^2
        score = fwht(E).pow(2) * b_norm2[None, :]                         # [out, in]
    elif positions == "random":
        score = torch.rand(E.shape, generator=generator, dtype=E.dtype).to(E.device)
    else:
        raise ValueError(f"unknown WHT positions {positions!r}: use 'qwha' or 'random'")
    rows, cols, cols_pad, keep = _support_from_scores(score, k)
    values = _solve_values(E, R, cols_pad, keep, adapter.coef)  # coef = c / n, as in delta_weight
    adapter.set_support(rows, cols, values.float())


# ----------------------------------------------------------------------------- dispatch
INITS = ("zero", "loftq", "loftq_act", "qwha", "wht_random")


def initialise(layer, adapter, init: str, W=None, X=None, iters: int = 5) -> None:
    """Apply ``init`` to ``adapter`` (already attached to ``layer``); 'zero' leaves it as built."""
    if init == "zero":
        return
    if init not in INITS:
        raise ValueError(f"unknown adapter init {init!r}: use one of {INITS}")
    if adapter.placement != "outside":
        raise ValueError(
            f"init {init!r} needs placement='outside': with the weight rounded after the adapter, "
            "a correction below half a step rounds away (use init='zero' inside)"
        )
    if W is None:
        raise ValueError(f"init {init!r} needs the float weight the layer was quantized from")
    needs_x = init in ("loftq_act", "qwha")
    if needs_x and X is None:
        raise ValueError(f"init {init!r} needs calibration inputs (see collect_inputs)")
    lora = isinstance(adapter, LoRAAdapter)
    if init.startswith("loftq") != lora:
        raise ValueError(f"init {init!r} does not apply to a {type(adapter).__name__}")
    if init == "loftq":
        init_lora_loftq(layer, adapter, W, iters)
    elif init == "loftq_act":
        init_lora_loftq(layer, adapter, W, iters, X=X)
    else:
        init_wht(layer, adapter, W, X, positions="qwha" if init == "qwha" else "random")
