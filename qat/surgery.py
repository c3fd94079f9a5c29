"""Model surgery: swap a Hugging Face model's linear layers for QuantLinear."""

from __future__ import annotations

import re

import torch
from torch import nn

from qat.act_quant import act_quantizer_for
from qat.config import QuantConfig
from qat.primitives import check_group_size
from qat.quant_linear import QuantLinear, is_conv1d


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every nn.Linear and GPT-2 Conv1D in the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


@torch.no_grad()
def quantize_model(model: nn.Module, config: QuantConfig | None = None,
                   calibration: list[dict] | None = None) -> nn.Module:
    """Replace selected linear layers with QuantLinear, in place; returns the model.

    Layers are chosen by ``config.include`` / ``config.exclude`` (regexes on module names; the
    output head is excluded by default) and quantized to ``config.spec_for(name)``. Every layer's
    spec is validated before the first one is replaced, so a bad group size leaves the model
    untouched. Each QuantLinear records ``quant_error`` = ||W_hat - W|| / ||W|| for the report.

    Layers with init ``gptq`` need ``calibration`` (model input batches, e.g. tokenizer outputs
    with an attention mask): they are quantized last, sequentially (qat.gptq), so each sees the
    other layers already quantized.
    """
    config = config or QuantConfig()
    candidates = linear_layers(model)
    chosen = [(n, m) for n, m in candidates if config.selects(n)]
    if not chosen:
        names = ", ".join(n for n, _ in candidates[:8]) or "none"
        raise ValueError(
            f"no linear layer matches include={config.include} exclude={config.exclude} "
            f"(the model's linear layers start: {names}); widen `include` or narrow `exclude`"
        )
    unmatched = [p for p in config.overrides if not any(re.search(p, n) for n, _ in chosen)]
    if unmatched:  # a typo would otherwise silently leave every layer at the default format
        names = ", ".join(n for n, _ in chosen[:4])
        raise ValueError(f"override pattern {unmatched[0]!r} matches no quantized layer (they are named like {names}): "
                         "fix the pattern (a regular expression searched in the layer name)")
    plans = []
    for name, module in chosen:
        spec = config.spec_for(name)
        in_features = module.weight.shape[0] if is_conv1d(module) else module.in_features
        check_group_size(in_features, spec.group_size, name)  # fail before any layer changes
        plans.append((name, module, spec))
    gptq_plans = [p for p in plans if p[2].init == "gptq"]
    if gptq_plans and not calibration:
        raise ValueError("init 'gptq' needs calibration data: pass calibration batches (qat quantize "
                         "--calibration-text, or the training data in qat train), or use init 'mse'")

    def finish(name, module, layer):
        layer.act_quant = act_quantizer_for(config.act_bits, config.act_scheme, config.learn_scale)
        layer.input_hadamard = getattr(module, "input_hadamard", None)  # qat.online_hadamard: rotated input
        layer.weight_scale.requires_grad_(config.learn_scale)
        if layer.weight_zero_point is not None:
            layer.weight_zero_point.requires_grad_(config.learn_zero_point)
        w = module.weight.detach().float()
        w = w.t() if is_conv1d(module) else w
        layer.quant_error = float((layer.fake_quant_weight().float() - w).norm() / w.norm().clamp_min(1e-12))
        set_submodule(model, name, layer)

    for name, module, spec in plans:
        if spec.init != "gptq":
            finish(name, module, QuantLinear.from_linear(module, spec, name=name))
    if gptq_plans:
        from qat.gptq import quantize_model_gptq

        quantize_model_gptq(model, gptq_plans, calibration, damp=config.gptq_damp, act_order=config.gptq_act_order,
                            step_init=config.gptq_step_init, on_layer=finish, target=config.gptq_target)
    model.qat_config = config
    return model


def quantization_report(model: nn.Module) -> list[dict]:
    """One row per QuantLinear: bits, group, storage, relative weight error, exported bytes."""
    rows = []
    for name, layer in quant_layers(model):
        n = layer.in_features * layer.out_features
        float_bytes = n * torch.empty(0, dtype=layer.scale_dtype).element_size()
        rows.append(
            dict(
                name=name,
                shape=[layer.out_features, layer.in_features],
                bits=layer.spec.bits,
                storage_bits=layer.spec.storage_bits,
                group_size=layer.group_size,
                symmetric=layer.spec.symmetric,
                rel_error=getattr(layer, "quant_error", float("nan")),
                bytes=layer.nbytes_exported(),
                float_bytes=float_bytes,
                bits_per_weight=8 * layer.nbytes_exported() / n,
            )
        )
    return rows


def format_report(rows: list[dict]) -> str:
    header = f"{'layer':48s} {'bits':>5s} {'store':>5s} {'group':>6s} {'rel.err':>8s} {'bpw':>6s} {'bytes':>10s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['name'][-48:]:48s} {r['bits']!s:>5s} {r['storage_bits']:>5d} {r['group_size']:>6d} "
            f"{r['rel_error']:8.4f} {r['bits_per_weight']:6.2f} {r['bytes']:>10d}"
        )
    total = sum(r["bytes"] for r in rows)
    total_float = sum(r["float_bytes"] for r in rows)
    lines.append(f"{len(rows)} layers, {total} bytes quantized vs {total_float} float ({total / max(total_float, 1):.3f}x)")
    return "\n".join(lines)
