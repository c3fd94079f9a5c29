"""Error-aware adapter initialisations: outside placement (y = x Q^T + x D^T) and inside (W_hat = Q(W0 + D)).

Notation (all [out, in] unless said):
    W   the float weight the layer was quantized from (passed in: the packed base cannot give it back)
    Q   the layer's quantized weight (fake_quant of the base with the layer's steps)
    E   = W - Q, the quantization error an adapter D should cancel
    X   calibration inputs [N, in];  G = X^T X + ridge I = R^T R  (R upper triangular)

Objectives: plain  ||E - D||_F  (LoftQ)  or activation-weighted  ||X (E - D)^T||_F = ||(E - D) R^T||_F.

Outside: closed forms (LoftQ SVD, QWHA least squares). Inside: W_hat = Q(W0 + D) rounds D with the
weight, so a closed-form D of the size of E (mostly below half a step) would largely round away or
flip codes the wrong way. The inside inits therefore start from the closed form and then minimise
the calibration output error through the rounding itself (:func:`refine_inside`): Adam on the
adapter's parameters with the straight-through estimator, i.e. a low-rank / sparse-Hadamard
"learned rounding" of W0 + D. The frozen base and the steps are left untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from qat import primitives as P
from qat.hadamard import fwht
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


def gram(X: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """G [in, in] = X^T X + ridge * mean(diag) I (float64): ||X M^T||_F^2 = tr(M G M^T).

    The ridge (relative to the mean input energy) keeps G invertible when N < in or X is rank-deficient.
    """
    X = X.double()
    G = X.T @ X
    return G + ridge * G.diagonal().mean().clamp_min(1e-12) * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)


def gram_factor(X: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """R [in, in] upper triangular with R^T R = gram(X, ridge) (float64)."""
    return torch.linalg.cholesky(gram(X, ridge), upper=True)


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
    scale, zero = layer.fake_quant_steps()
    return P.fake_quantize(w0, scale.float(), zero, layer.spec.bits, layer.group_size).float()


@torch.no_grad()
def quantized_weight(layer) -> torch.Tensor:
    """Q [out, in] fp32: the layer's own quantized weight, adapter excluded."""
    scale, zero = layer.fake_quant_steps()
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
    layer.set_base(codes, layer.base_scale, layer.base_zero_point)


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
        out.append(_spd_solve(MJ, b)[mask.bool()])
    return torch.cat(out)


def _spd_solve(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve A v = b for a batch of symmetric positive (semi)definite A [c, k, k], b [c, k].

    Cholesky: half the work of LU, and torch's batched LU (MKL getrf/getrs) failed on some
    [384, 213, 213] batches here ("Parameter 6 was incorrect on entry to DLASWP"). Rows whose
    factorisation fails (numerically indefinite) fall back to least squares.
    """
    L, info = torch.linalg.cholesky_ex(A)
    v = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
    bad = info != 0
    if bad.any():
        v[bad] = torch.linalg.lstsq(A[bad], b[bad].unsqueeze(-1)).solution.squeeze(-1)
    return v


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


# ----------------------------------------------------------------------------- inside placement
@torch.no_grad()
def inside_loss_and_grad(layer, W: torch.Tensor, D: torch.Tensor, G: torch.Tensor, norm: float):
    """Calibration loss tr(M G M^T) / norm with M = W - Q(W0 + D), and its STE gradient w.r.t. D.

    Q is the layer's forward quantizer (frozen steps). The straight-through gradient of
    Q(W0 + D) w.r.t. D is 1 where (W0 + D)/s + z lies inside [qmin, qmax] and 0 where it is clamped
    (what fake_quantize's autograd gives), so dL/dD = -2 mask * (M G) / norm: one [out, in] x [in, in]
    GEMM, no autograd graph through the quantizer. All tensors [out, in] in G's dtype.
    """
    scale, zero = layer.fake_quant_steps()
    w = layer.base_weight().to(G.dtype) + D
    w_hat = P.fake_quantize(w, scale.to(G.dtype), zero, layer.spec.bits, layer.group_size)
    qmin, qmax = P.qrange(layer.spec.bits)
    v = P.grouped(w, layer.group_size) / scale.to(G.dtype).unsqueeze(-1)      # [out, G, g]
    if zero is not None:
        v = v + P.round_zero_point(zero, layer.spec.bits).to(v.dtype).unsqueeze(-1)
    mask = ((v >= qmin) & (v <= qmax)).reshape(w.shape)
    M = W - w_hat
    MG = M @ G
    loss = (MG * M).sum() / norm
    return loss, torch.where(mask, MG, torch.zeros_like(MG)) * (-2.0 / norm)


def refine_inside(layer, adapter, W: torch.Tensor, X: torch.Tensor, steps: int = 100, lr: float = 0.03,
                  ridge: float = 1e-2) -> tuple[float, float]:
    """Adam on the adapter's parameters to minimise ||X (W - Q(W0 + D))^T||^2 / ||X W^T||^2 on X.

    Per-parameter learning rate lr * rms(parameter at start): the closed-form start sets the scale,
    so one lr fits LoRA factors and WHT values alike. Keeps the best iterate; if it does not beat
    D = 0 on the calibration loss, the adapter is reset to D = 0 (an init never hurts the fit).
    Returns (calibration loss at D = 0, final calibration loss), both relative.
    """
    W = W.to(layer.base_scale.device, torch.float32)
    G = gram(X.to(W.device), ridge).float()
    norm = float((W @ G * W).sum())
    zero_loss, _ = inside_loss_and_grad(layer, W, torch.zeros_like(W), G, norm)
    params = [p for p in adapter.parameters() if p.requires_grad]
    groups = [{"params": [p], "lr": lr * float(p.detach().pow(2).mean().sqrt().clamp_min(1e-8))} for p in params]
    _best_start(layer, adapter, W, G, norm)
    opt = torch.optim.Adam(groups)
    best = (float("inf"), None)
    for step in range(steps + 1):
        with torch.enable_grad():
            D = adapter.delta_weight().float()                # [out, in], graph through the adapter only
        loss, grad_D = inside_loss_and_grad(layer, W, D.detach(), G, norm)
        if float(loss) < best[0]:
            best = (float(loss), [p.detach().clone() for p in params])
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        D.backward(grad_D)                                    # chain rule into B, A (or WHT values)
        opt.step()
    with torch.no_grad():
        if best[0] < float(zero_loss):
            for p, v in zip(params, best[1]):
                p.copy_(v)
        else:
            _zero_delta(adapter)
    return float(zero_loss), min(best[0], float(zero_loss))


START_SCALES = (1.0, 0.5, 0.25, 0.0)


@torch.no_grad()
def _best_start(layer, adapter, W, G, norm) -> None:
    """Scale the closed-form start D by the factor in START_SCALES with the lowest calibration loss.

    The closed form fits E as if nothing rounded; inside, a full-size D flips many codes the wrong
    way (an element at 0.3 steps off grid, pushed 0.3 further, lands on the far side), so a
    shrunken start is often better. Scaling B (LoRA) or the values (WHT) scales D linearly.
    """
    param = adapter.lora_B if isinstance(adapter, LoRAAdapter) else adapter.values
    start = param.detach().clone()
    losses = []
    for scale in START_SCALES:
        param.copy_(start * scale)
        losses.append(float(inside_loss_and_grad(layer, W, adapter.delta_weight().float(), G, norm)[0]))
    param.copy_(start * START_SCALES[min(range(len(losses)), key=losses.__getitem__)])


@torch.no_grad()
def _zero_delta(adapter) -> None:
    """Set D = 0 (LoRA: B = 0, keeping A so B's gradient is live; WHT: values = 0)."""
    if isinstance(adapter, LoRAAdapter):
        adapter.lora_B.zero_()
    else:
        adapter.values.zero_()


@torch.no_grad()
def inside_start(layer, adapter, W: torch.Tensor, X: torch.Tensor, ridge: float = 1e-2) -> None:
    """Closed-form start for an inside adapter: the outside init's D for E = W - Q(W0), base untouched.

    LoRA: activation-weighted rank-r SVD of E (one LoftQ_act step without rewriting the base);
    WHT: QWHA positions and least-squares values.
    """
    if isinstance(adapter, LoRAAdapter):
        W = W.double()
        R = gram_factor(X.to(W.device), ridge)
        E = W - quantized_weight(layer).double()
        B, Aw = _split_svd(E @ R.T, adapter.rank)
        A = torch.linalg.solve_triangular(R, Aw.T, upper=True).T
        adapter.lora_B.copy_(B.float() / adapter.scaling)
        adapter.lora_A.copy_(A.float())
    else:
        init_wht(layer, adapter, W, X, positions="qwha", ridge=ridge)


def init_refine(layer, adapter, W, X, steps: int = 100, lr: float = 0.03) -> tuple[float, float]:
    """'refine' init (inside placement): closed-form start, then :func:`refine_inside`. Returns the calibration losses."""
    inside_start(layer, adapter, W, X)
    return refine_inside(layer, adapter, W, X, steps=steps, lr=lr)


# ----------------------------------------------------------------------------- dispatch
INITS = ("zero", "loftq", "loftq_act", "qwha", "wht_random", "refine")
INSIDE_INITS = ("refine",)  # every other non-zero init is a closed form for the outside placement


def check_init_placement(init: str, placement: str) -> None:
    """Closed-form inits are for outside adapters; 'refine' (through the rounding) for inside ones."""
    if init == "zero":
        return
    if init in INSIDE_INITS and placement != "inside":
        raise ValueError(f"init {init!r} optimises through the weight's rounding: it needs placement='inside' "
                         "(outside adapters: use loftq / loftq_act / qwha / wht_random)")
    if init not in INSIDE_INITS and placement != "outside":
        raise ValueError(
            f"init {init!r} needs placement='outside': with the weight rounded after the adapter, its "
            f"closed-form correction (below half a step) rounds away; inside, use init='refine'"
        )


def initialise(layer, adapter, init: str, W=None, X=None, iters: int = 5, steps: int = 100):
    """Apply ``init`` to ``adapter`` (already attached to ``layer``); 'zero' leaves it as built.

    ``steps``: Adam steps of the 'refine' init. Returns (calibration loss at D = 0, after) for
    'refine', else None.
    """
    if init == "zero":
        return None
    if init not in INITS:
        raise ValueError(f"unknown adapter init {init!r}: use one of {INITS}")
    check_init_placement(init, adapter.placement)
    if W is None:
        raise ValueError(f"init {init!r} needs the float weight the layer was quantized from")
    needs_x = init in ("loftq_act", "qwha", "refine")
    if needs_x and X is None:
        raise ValueError(f"init {init!r} needs calibration inputs (see collect_inputs)")
    if init == "refine":
        return init_refine(layer, adapter, W, X, steps=steps)
    lora = isinstance(adapter, LoRAAdapter)
    if init.startswith("loftq") != lora:
        raise ValueError(f"init {init!r} does not apply to a {type(adapter).__name__}")
    if init == "loftq":
        init_lora_loftq(layer, adapter, W, iters)
    elif init == "loftq_act":
        init_lora_loftq(layer, adapter, W, iters, X=X)
    else:
        init_wht(layer, adapter, W, X, positions="qwha" if init == "qwha" else "random")
    return None
