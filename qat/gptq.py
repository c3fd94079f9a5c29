"""GPTQ: error-compensating quantization of a linear layer from its inputs' second moments.

For a layer y = x W^T and calibration inputs X [tokens, in], H = X^T X (float64). Columns are
quantized one at a time (in input order, or by decreasing H diagonal with ``act_order``); the
rounding error of column q is spread over the columns not yet quantized so that ||X W^T - X Wq^T||
stays small (Optimal Brain Surgeon with the inverse Hessian):

    err = (w_q - quant(w_q)) / [H^-1]_qq        W[:, j] -= err * [H^-1]_qj   for the later j

computed in blocks of columns from the upper Cholesky factor of H^-1 (the rows of U are the
successive OBS rows, already restricted to the remaining columns). H is dampened by
``damp * mean(diag H)`` on the diagonal. Columns that never see an input (diag 0) get H_qq = 1.

Steps: each group's step (and zero point) comes from qat's step search (``rtn`` or ``mse``, see
qat.primitives) on the group's columns as GPTQ has updated them when the group's first column is
reached. Per-channel steps and act-order use static steps, searched on the original weight up
front, so the exported model stays plain group-wise (no column permutation, no g_idx).

:func:`quantize_model_gptq` runs it on a model sequentially: block by block (qat.blocks), each
layer's H taken on the outputs of the already-quantized layers before it; one H in memory at a time.

``target="float"`` (GPTAQ's asymmetric calibration) fits the float model's outputs instead of the
float layer applied to the quantized inputs: with X_q the layer's inputs in the quantized chain and
X_f the same tokens' inputs in the float model,

    min ||X_f W^T - X_q Wq^T||^2  =  ||X_q (W*^T - Wq^T)||^2 + const,   W* = W + W (X_q^T (X_f - X_q))^T H^-1

(W* is the least-squares weight on the quantized inputs; the residual is orthogonal to X_q's columns),
so GPTQ runs unchanged on W* with H = X_q^T X_q, H^-1 dampened as GPTQ's own. Each layer then also
undoes the error the quantized layers before it left, which plain GPTQ leaves to the next stage.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from qat import primitives as P
from qat.blocks import advance, block_output, capture_block_inputs, clone_items, find_blocks, model_kwargs, real_tokens
from qat.config import GPTQ_TARGETS, LayerSpec
from qat.quant_linear import QuantLinear, is_conv1d

COLUMN_BLOCK = 128  # columns updated together before the lazy update of the rest (GPTQ's B)


def quantize_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: float):
    """Codes and dequantized values of one column w [out] (any float dtype) with steps [out].

    The same operations, in the same fp32 order, as :func:`qat.primitives.quantize_codes` /
    :func:`~qat.primitives.dequantize`, so the layer re-derives exactly these codes."""
    qmin, qmax = P.qrange(bits)
    v = w.float() / scale
    z = None if zero is None else P.round_zero_point(zero, bits)
    if z is not None:
        v = v + z
    q = torch.round(torch.clamp(v, qmin, qmax))
    w_hat = (q - z) * scale if z is not None else q * scale
    return q, w_hat


def _steps(w: torch.Tensor, bits: float, group_size: int, symmetric: bool, method: str, scale_dtype):
    """Step search on w [out, n]; steps rounded to the dtype the layer keeps them in (what it will use)."""
    scale, zero = P.init_steps(w.float(), bits, group_size, symmetric, method)
    return scale.to(scale_dtype).float(), zero


def prepare_hessian(H: torch.Tensor, damp: float) -> torch.Tensor:
    """H [in, in] -> float64, dead inputs given H_qq = 1, plus damp * mean(diag) on the diagonal."""
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return H


def _inverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1; raises with the fix when H is not positive definite."""
    try:
        L = torch.linalg.cholesky(H)
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError:
        raise ValueError("GPTQ: the calibration Hessian is not positive definite even after dampening: "
                         "raise gptq_damp (e.g. 0.1) or give more calibration samples") from None


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    H: torch.Tensor,
    bits: float,
    group_size: int,
    symmetric: bool,
    step_init: str = "mse",
    damp: float = 0.01,
    act_order: bool = False,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ of ``weight`` [out, in] given H [in, in] = X^T X. Returns (codes [out, in] int8,
    scale [out, in/g] fp32, zero point [out, in/g] (float holding integers) or None)."""
    out_features, n = weight.shape
    W = weight.detach().double().clone()
    H = prepare_hessian(H, damp)
    static = act_order or group_size == n
    if static:  # steps fixed up front from the original weight, in the original column order
        scale, zero = _steps(W, bits, group_size, symmetric, step_init, scale_dtype)
    else:
        scale = torch.empty(out_features, n // group_size, device=W.device)
        zero = None if symmetric or P.is_ternary(bits) else torch.empty_like(scale)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_cholesky(H)
    Q = torch.zeros_like(W)
    # Column blocks hold whole groups, so a group's columns are fully updated when it starts.
    width = max(COLUMN_BLOCK // group_size, 1) * group_size if group_size < n else COLUMN_BLOCK
    for i1 in range(0, n, width):
        i2 = min(i1 + width, n)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros(out_features, i2 - i1, dtype=W.dtype, device=W.device)
        for i in range(i2 - i1):
            col = i1 + i
            g = int(perm[col]) // group_size
            if not static and col % group_size == 0:
                s, z = _steps(W1[:, i:i + group_size], bits, group_size, symmetric, step_init, scale_dtype)
                scale[:, g] = s[:, 0]
                if zero is not None:
                    zero[:, g] = z[:, 0]
            q, w_hat = quantize_column(W1[:, i], scale[:, g], None if zero is None else zero[:, g], bits)
            Q[:, col] = q.double()
            err = (W1[:, i] - w_hat.double()) / U[col, col]
            W1[:, i:] -= err.unsqueeze(1) @ U[col, col:i2].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # the lazy update of the columns after this block
    codes = torch.empty_like(Q)
    codes[:, perm] = Q
    return codes.to(torch.int8), scale, zero


# ------------------------------------------------------------------------------------ whole model
def float_target_weight(weight: torch.Tensor, H: torch.Tensor, cross: torch.Tensor, damp: float) -> torch.Tensor:
    """W* [out, in] (float64) = W + W (C - H)^T H_d^-1 with C = X_q^T X_f [in, in] and H_d GPTQ's dampened H:
    the weight whose outputs on the quantized inputs best match the float layer's on the float inputs.
    Equal to W when the two inputs are equal (C = H), whatever the dampening."""
    W = weight.detach().double()
    H_d = prepare_hessian(H, damp)
    correction = torch.cholesky_solve((cross.double() - H.double()) @ W.t(), torch.linalg.cholesky(H_d))  # [in, out]
    return W + correction.t()


def layer_from_gptq(module: nn.Module, spec: LayerSpec, H: torch.Tensor, name: str, damp: float,
                    act_order: bool, step_init: str, cross: torch.Tensor | None = None) -> QuantLinear:
    """A QuantLinear whose step-0 weight is the GPTQ solution, at any storage width. With ``cross`` =
    X_q^T X_f, GPTQ fits the float model's outputs (:func:`float_target_weight`).

    The GPTQ codes q and steps s (grid ``spec.bits``) become the frozen base (W0 = s (q - z));
    the trained steps start at s, so W_hat = s (round(W0 / s + z) - z) = W0: at storage = bits the
    base is the codes themselves, at a wider storage the same integers sit in the wider grid."""
    weight = module.weight.detach()
    weight = weight.t() if is_conv1d(module) else weight
    dtype = weight.dtype if weight.is_floating_point() else torch.float32
    group = P.check_group_size(weight.shape[1], spec.group_size, name)
    target = weight.float() if cross is None else float_target_weight(weight, H, cross, damp).float()
    codes, scale, zero = gptq_quantize(target, H, spec.bits, group, spec.symmetric, step_init,
                                       damp, act_order, scale_dtype=dtype)
    bias = None if module.bias is None else module.bias.detach()
    layer = QuantLinear.from_codes(codes, scale, zero, spec, bias=bias, dtype=dtype, name=name)
    layer.source_type = "Conv1D" if is_conv1d(module) else "Linear"
    return layer


class _HessianHook:
    """Forward pre-hook adding the real tokens' x x^T (float64) of one layer's input into H."""

    def __init__(self, in_features: int, device):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.token_mask = None

    def __call__(self, _module, args):
        self.add(args[0])  # returns nothing: a pre-hook's return value would replace the layer's input

    def add(self, inputs: torch.Tensor) -> torch.Tensor:
        """H += x x^T of the real tokens x [tokens, in] (float64) of ``inputs``; returns x."""
        x = real_tokens(inputs, self.token_mask).double()
        self.H += x.T @ x
        return x


class _FloatInputHook:
    """Forward pre-hook keeping the real tokens of one layer's input in the float model (one batch)."""

    def __init__(self):
        self.x, self.token_mask = None, None

    def __call__(self, _module, args):
        self.x = real_tokens(args[0], self.token_mask).double()


class _CrossHook(_HessianHook):
    """Adds x_q x_q^T into H and x_q x_f^T into C, x_f the float model's input of the same tokens."""

    def __init__(self, in_features: int, device, float_input: _FloatInputHook):
        super().__init__(in_features, device)
        self.C = torch.zeros_like(self.H)
        self.float_input = float_input

    def __call__(self, _module, args):
        self.C += self.add(args[0]).T @ self.float_input.x


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1]


def _hessian(module: nn.Module, runs) -> torch.Tensor:
    """H of ``module``'s inputs over ``runs`` = [(token_mask, callable running one batch)]."""
    hook = _HessianHook(_in_features(module), module.weight.device)
    handle = module.register_forward_pre_hook(hook)
    try:
        for mask, run in runs:
            hook.token_mask = mask
            run()
    finally:
        handle.remove()
    return hook.H


def _hessian_and_cross(module: nn.Module, float_module: nn.Module, runs) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, C) of ``module``'s inputs X_q and ``float_module``'s X_f over ``runs`` = [(token_mask, run the
    float model's batch, run the quantized model's same batch)]: H = X_q^T X_q, C = X_q^T X_f."""
    float_input = _FloatInputHook()
    hook = _CrossHook(_in_features(module), module.weight.device, float_input)
    handles = [float_module.register_forward_pre_hook(float_input), module.register_forward_pre_hook(hook)]
    try:
        for mask, run_float, run_quantized in runs:
            float_input.token_mask = hook.token_mask = mask
            run_float()
            run_quantized()
    finally:
        for handle in handles:
            handle.remove()
    return hook.H, hook.C


@torch.no_grad()
def quantize_model_gptq(model: nn.Module, plans: list[tuple[str, nn.Module, LayerSpec]], batches: list[dict],
                        damp: float = 0.01, act_order: bool = False, step_init: str = "mse",
                        on_layer=None, target: str = "quantized") -> None:
    """Replace each planned layer by its GPTQ QuantLinear, sequentially, in place.

    Block by block: block i's inputs are the outputs of blocks < i as already quantized, and each
    layer's H is taken with the layers before it in its block already replaced. Layers outside the
    blocks (a pooler, a head) follow, their H taken by whole-model forwards of the quantized model.
    ``on_layer(name, float_module, layer)`` is called after each replacement (e.g. for a report).
    ``target="float"``: each block layer fits the float model's outputs (module docstring); the float
    chain is a copy of each block taken before its layers are replaced.
    """
    from qat.surgery import set_submodule

    if target not in GPTQ_TARGETS:
        raise ValueError(f"gptq_target={target!r}: use one of {GPTQ_TARGETS}")

    def replace(group, runs, float_module=None):
        """Quantize a group of layers that read one input (q/k/v, gate/up): one H (and C) serves them all."""
        module = group[0][1]
        if float_module is None:
            H, C = _hessian(module, runs), None
        else:
            H, C = _hessian_and_cross(module, float_module, runs)
        for name, member, spec in group:
            layer = layer_from_gptq(member, spec, H, name, damp, act_order, step_init, cross=C)
            set_submodule(model, name, layer)
            if on_layer is not None:
                on_layer(name, member, layer)
        del H, C  # one group's H (and C) at a time

    was_training = model.training
    model.eval()  # no dropout in the statistics
    try:
        _sequential(model, plans, batches, replace, float_chain=target == "float")
    finally:
        model.train(was_training)


def _sequential(model, plans, batches, replace, float_chain: bool = False) -> None:
    try:
        blocks_name, blocks = find_blocks(model)
    except ValueError:
        blocks_name, blocks = None, []
    done = set()
    if blocks_name is not None and any(n.startswith(blocks_name + ".") for n, _, _ in plans):
        items = capture_block_inputs(model, blocks, batches)
        float_items = clone_items(items) if float_chain else None  # block 0's inputs are float in both
        for i, block in enumerate(blocks):
            prefix = f"{blocks_name}.{i}."
            float_block = copy.deepcopy(block) if float_chain else None  # before any of its layers is replaced
            for group in shared_input_groups(block, [p for p in plans if p[0].startswith(prefix)], items[0]):
                if float_chain:
                    runs = [(it.token_mask, lambda f=f: block_output(float_block, f), lambda it=it: block_output(block, it))
                            for it, f in zip(items, float_items)]
                    replace(group, runs, float_block.get_submodule(group[0][0][len(prefix):]))
                else:
                    runs = [(it.token_mask, lambda it=it: block_output(block, it)) for it in items]
                    replace(group, runs)
                done.update(name for name, _, _ in group)
            advance(block, items)
            if float_chain:
                advance(float_block, float_items)
                del float_block
        del items, float_items
    for name, module, spec in plans:
        if name not in done:
            runs = [(b.get("attention_mask", None), lambda b=b: model(**model_kwargs(model, b))) for b in batches]
            runs = [(None if m is None else m.bool(), r) for m, r in runs]
            replace([(name, module, spec)], runs)


def shared_input_groups(block: nn.Module, block_plans: list, item) -> list[list]:
    """The block's planned layers in plan order, consecutive layers that read the same input tensor in
    one forward (attention's q/k/v, an MLP's gate/up) put in one group: their H (and C) are equal, since
    quantizing one member cannot change what the others read, so one pass of the calibration set
    serves the group (GPTQ's usual grouping; 2 of a BERT block's 6 passes saved, 3 of a Llama's 7)."""
    inputs = {}  # name -> the tensor its layer read (kept alive, so identity is meaningful)
    handles = [module.register_forward_pre_hook(lambda _m, args, name=name: inputs.setdefault(name, args[0]))
               for name, module, _ in block_plans]
    try:
        block_output(block, item)
    finally:
        for handle in handles:
            handle.remove()
    groups = []
    for plan in block_plans:
        x = inputs.get(plan[0])
        if groups and x is not None and inputs.get(groups[-1][0][0]) is x:
            groups[-1].append(plan)
        else:
            groups.append([plan])
    return groups

