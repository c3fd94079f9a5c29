"""What trains in a quantized model: the quantizer's mode per layer, biases, LayerNorm parameters.

    fake_quant    codes re-rounded from the frozen base (+ inside adapter) every step (default)
    frozen_codes  the base codes fixed, only steps (and zero points) train: EfficientQAT's E2E-QP
    full_weight   trainable float master weights under fake quantization (torchao-style QAT)

See ``qat.quant_linear`` for the formulas. :func:`check_train_mode` validates a recipe before any
model is loaded; :func:`apply_train_mode` switches every QuantLinear of a quantized model.
"""

from __future__ import annotations

import torch
from torch import nn

from qat.config import QuantConfig
from qat.quant_linear import TRAIN_MODES, QuantLinear


def check_train_mode(mode: str, config: QuantConfig, adapter: str, placement: str) -> None:
    """Raise one sentence naming the problem and the fix for a mode the recipe cannot train."""
    if mode not in TRAIN_MODES:
        raise ValueError(f"train_mode={mode!r}: use one of {TRAIN_MODES}")
    if mode != "frozen_codes":
        return
    if adapter != "none" and placement == "inside":
        raise ValueError("train_mode 'frozen_codes' keeps the base codes fixed, so an inside adapter could not "
                         "change them: set adapter: none (or adapter_placement: outside), or train_mode: fake_quant "
                         "to train an inside adapter (the default recipe's train_mode is frozen_codes)")
    specs = [("the recipe", config.default_spec())]
    specs += [(f"override {p!r}", config.spec_for(p, _pattern=p)) for p in config.overrides]
    for where, spec in specs:
        if spec.storage_bits != spec.export_bits:
            raise ValueError(f"train_mode 'frozen_codes' scales the base codes, but {where} stores them at "
                             f"{spec.storage_bits} bits for a {spec.bits}-bit grid: drop storage_bits "
                             f"(or set it to {spec.export_bits})")


def float_weights(model: nn.Module, config: QuantConfig) -> dict[str, torch.Tensor]:
    """name -> float weight [out, in] (fp32 copy) of each layer ``config`` will quantize; call
    before ``quantize_model`` to start full_weight's master weights from the float model."""
    from qat.surgery import linear_layers
    from qat.quant_linear import is_conv1d

    out = {}
    for name, module in linear_layers(model):
        if config.selects(name):
            w = module.weight.detach().float()
            out[name] = (w.t() if is_conv1d(module) else w).clone()
    return out


def apply_train_mode(model: nn.Module, mode: str, weights: dict[str, torch.Tensor] | None = None) -> int:
    """Set every QuantLinear's train mode; full_weight masters start from ``weights[name]`` when
    given (else from the layer's W0). Returns the number of layers switched."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name, layer in layers:
        layer.set_train_mode(mode, (weights or {}).get(name))
    return len(layers)


def bias_and_norm_names(model: nn.Module, biases: bool, norms: bool) -> list[str]:
    """Names of the quantized layers' biases (``biases``) and of every LayerNorm / RMSNorm
    parameter (``norms``): what ``train_biases`` / ``train_norms`` make trainable."""
    names = []
    for prefix, module in model.named_modules():
        is_norm = isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()
        for pname, p in module.named_parameters(recurse=False):
            take = (biases and isinstance(module, QuantLinear) and pname == "bias") or (norms and is_norm)
            if take and p.is_floating_point():
                names.append(f"{prefix}.{pname}" if prefix else pname)
    return names


def unfreeze_biases_and_norms(model: nn.Module, biases: bool, norms: bool) -> list[str]:
    """Make the quantized layers' biases and every LayerNorm / RMSNorm parameter trainable (they
    export as they are, in float); returns the names made trainable."""
    names = bias_and_norm_names(model, biases, norms)
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(True)
    return names
