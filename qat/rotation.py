"""Hadamard rotations folded into a float model's weights (QuaRot's computational invariance).

Applied BEFORE quantization: the result is a plain model of the same architecture (norm gains 1,
weights rotated) that computes the same function, with the outlier channels of its activations
spread over all channels, so per-token int8 / int4 activation steps and weight steps waste less range.

Row-vector convention (transformers' ``y = x W^T``, W [out, in]); Q [d, d] orthogonal:

    residual        h  -> h Q                      every hidden state of the residual stream
    embeddings      E  -> E Q                      E [vocab, d]
    RMSNorm gain g  folded:  W -> W diag(g), g -> 1   for each linear that reads the norm's output
    readers         W  -> W Q                      q/k/v_proj, gate/up_proj, lm_head (read the residual)
    writers         W  -> Q^T W,  b -> Q^T b       o_proj, down_proj (add to the residual)
    V / O per head  W_v -> blockdiag(R^T) W_v, b_v -> blockdiag(R^T) b_v,  W_o -> W_o blockdiag(R)

RMSNorm commutes with Q (||h Q|| = ||h||), so every block sees its input rotated and writes its
output rotated; the attention output of each head is a row-mix of V rows, so it comes out times R.

    Q = diag(s) H_d / sqrt(d),  R = diag(s') H_hd / sqrt(hd),   s, s' random signs (seeded)

applied with qat.hadamard.fwht (x @ H == fwht(x, transpose=True)), in float64.

Left out here (they need an online transform at serving time, which a plain model cannot hold):
QuaRot's Hadamard on the down_proj input (after the elementwise SiLU(gate) * up: no weight holds
it; qat.online_hadamard adds it as an online transform, exported as compressed-tensors
transform_config), the cross-head part of its o_proj-input Hadamard (the per-head part is the V/O
rotation here), and the Q/K rotation after RoPE (for KV-cache quantization). SpinQuant's learned
rotations are not built.
"""

from __future__ import annotations

import torch
from torch import nn

from qat.hadamard import factor, fwht

ROTATIONS = ("hadamard",)
# model_type -> nothing else needed: these share the Llama block (pre-RMSNorm, q/k/v/o, gate/up/down).
SUPPORTED_TYPES = ("llama", "qwen2", "mistral")


def check_rotation(kind: str | None) -> None:
    if kind is not None and kind not in ROTATIONS:
        raise ValueError(f"unknown rotation {kind!r}: use one of {ROTATIONS} or leave it unset")


def _decoder(model: nn.Module) -> nn.Module:
    """The module holding embed_tokens / layers / norm (``model.model`` of a *ForCausalLM)."""
    inner = getattr(model, "model", model)
    return inner if hasattr(inner, "layers") and hasattr(inner, "embed_tokens") else model


def refusal(model: nn.Module) -> str | None:
    """Why ``model`` cannot be rotated (one sentence), or None."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        return (f"cannot rotate a {model_type or type(model).__name__} model: the Hadamard rotation folds into "
                f"Llama-family blocks ({', '.join(SUPPORTED_TYPES)}: RMSNorm before attention and MLP) only")
    if any(type(m).__name__ == "QuantLinear" for m in model.modules()):
        return "the model is already quantized: rotate the float model first, then quantize it"
    decoder = _decoder(model)
    if not (hasattr(decoder, "layers") and hasattr(decoder, "embed_tokens") and hasattr(decoder, "norm")):
        return f"cannot rotate {type(model).__name__}: it has no embed_tokens / layers / norm to fold into"
    if not isinstance(getattr(model, "lm_head", None), nn.Linear):
        return (f"cannot rotate {type(model).__name__}: without an lm_head to fold the inverse rotation into, "
                "its hidden states would come out rotated; rotate the *ForCausalLM model")
    for name, module in model.named_modules():
        if name.endswith("norm") and "RMSNorm" not in type(module).__name__:
            return f"cannot rotate: {name} is a {type(module).__name__}, and only RMSNorm (x / rms(x) * g) commutes with a rotation"
    for width, what in ((config.hidden_size, "hidden size"), (_head_dim(config), "head dim")):
        try:
            factor(width)
        except ValueError as err:
            return f"cannot rotate: the {what} {width} has no Hadamard matrix here ({err})"
    return None


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    """s [n] float64 of +-1: the random diagonal that makes H_n a random orthogonal rotation."""
    return torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1


def rotate_rows(m: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """m @ Q with Q = diag(signs) H / sqrt(n), along the last dim of m [..., n]; float64 in, float64 out."""
    n = m.shape[-1]
    return fwht(m * signs, transpose=True) / n ** 0.5


def _set(param: nn.Parameter, value: torch.Tensor) -> None:
    param.data = value.to(dtype=param.dtype, device=param.device).contiguous()


@torch.no_grad()
def _fold_and_read(norm: nn.Module, readers: list[nn.Linear], signs: torch.Tensor) -> None:
    """W -> (W diag(g)) Q for every linear reading ``norm``; then g -> 1."""
    gain = norm.weight.detach().double()
    for linear in readers:
        _set(linear.weight, rotate_rows(linear.weight.detach().double() * gain, signs))
    norm.weight.data.fill_(1.0)


@torch.no_grad()
def _rotate_writer(linear: nn.Linear, signs: torch.Tensor) -> None:
    """W -> Q^T W (= (W^T Q)^T), b -> Q^T b: the linear's output lands in the rotated residual."""
    _set(linear.weight, rotate_rows(linear.weight.detach().double().T, signs).T)
    if linear.bias is not None:
        _set(linear.bias, rotate_rows(linear.bias.detach().double(), signs))


@torch.no_grad()
def _rotate_value_output(attn: nn.Module, head_dim: int, signs: torch.Tensor) -> None:
    """Per head: W_v -> R^T W_v (b_v -> R^T b_v), W_o -> W_o R; one R for all heads (GQA-safe)."""
    v, o = attn.v_proj, attn.o_proj
    w_v = v.weight.detach().double()                     # [kv_heads * hd, d]
    heads = w_v.shape[0] // head_dim
    per_head = w_v.view(heads, head_dim, -1).transpose(1, 2)   # [kv_heads, d, hd]
    _set(v.weight, rotate_rows(per_head, signs).transpose(1, 2).reshape(w_v.shape))
    if v.bias is not None:
        _set(v.bias, rotate_rows(v.bias.detach().double().view(heads, head_dim), signs).reshape(-1))
    w_o = o.weight.detach().double()                     # [d, heads * hd]
    _set(o.weight, rotate_rows(w_o.view(w_o.shape[0], -1, head_dim), signs).reshape(w_o.shape))


def _untie_head(model: nn.Module, decoder: nn.Module) -> None:
    """A tied lm_head shares E; after E -> E Q the head needs (E diag(g)) Q: give it its own copy."""
    head = getattr(model, "lm_head", None)
    if head is not None and head.weight is decoder.embed_tokens.weight:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", lambda: None)()
    if text_config is not None and getattr(text_config, "tie_word_embeddings", False):
        text_config.tie_word_embeddings = False


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fold norms and Hadamard rotations into a float Llama / Qwen2 / Mistral model, in place.

    Raises ValueError (one sentence) for a model it cannot rotate, before any weight changes.
    The model computes the same function afterwards (up to rounding in its dtype); its config
    records ``qat_rotation`` and a tied head is untied (``tie_word_embeddings`` False).
    """
    reason = refusal(model)
    if reason:
        raise ValueError(reason)
    decoder = _decoder(model)
    gen = torch.Generator().manual_seed(seed)
    signs = random_signs(model.config.hidden_size, gen)
    head_dim = _head_dim(model.config)
    head_signs = random_signs(head_dim, gen)
    _untie_head(model, decoder)
    emb = decoder.embed_tokens.weight
    _set(emb, rotate_rows(emb.detach().double(), signs))
    for layer in decoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _fold_and_read(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], signs)
        _rotate_writer(attn.o_proj, signs)
        _rotate_value_output(attn, head_dim, head_signs)
        _fold_and_read(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], signs)
        _rotate_writer(mlp.down_proj, signs)
    _fold_and_read(decoder.norm, [model.lm_head], signs)
    model.config.qat_rotation = {"kind": "hadamard", "seed": seed}
    return model
