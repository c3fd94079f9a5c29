"""Online Hadamard transforms on linear inputs (QuaRot's R4 on the MLP ``down_proj`` input), exported
as a compressed-tensors ``transform_config``.

The residual-stream rotation of qat.rotation folds into weights; the ``down_proj`` input (the
elementwise ``SiLU(gate) * up``) has no weight before it to fold into, so its rotation must run at
inference. With V = blockdiag(H_b, ..., H_b) / sqrt(b) (H_b Sylvester, symmetric, V V^T = I):

    y = x W^T = (x V) (W V)^T          the weight is folded once (W <- W V, float64, before quantizing);
                                       the input is rotated every forward (x <- x V, before its fake-quantizer)

so the float model computes the same function, and the 4-bit rounding of the down_proj input acts on
x V, whose outliers are spread over each block of b channels. This is compressed-tensors' "hadamard"
transform with ``head_dim = b`` at location ``input`` (deterministic Sylvester matrix, no
permutation, applied in float32 and divided by sqrt(b)); the export's config.json carries it under
``quantization_config.transform_config``, and each layer's b x b matrix is saved as
``<layer>.<scheme>_input.weight`` (the tensor name vLLM's transform loader reads).

transformers (5.25) loads such an export but does not apply the transform: apply it with
:func:`apply_export_transforms` (compressed-tensors' own ``apply_transform_config``), as qat's reload
check does, or load with ``qat.load_quantized``, which rebuilds it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

SCHEME = "R4"  # QuaRot's name for the down_proj-input rotation; also the tensor prefix <layer>.R4_input.weight
TARGET_SUFFIX = "mlp.down_proj"


def sylvester(b: int) -> torch.Tensor:
    """H_b [b, b] of +-1 by Sylvester's doubling (compressed-tensors' deterministic_hadamard_matrix)."""
    if b < 2 or b & (b - 1):
        raise ValueError(f"online_hadamard={b}: the block size must be a power of two >= 2 (e.g. 64)")
    h = torch.ones(1, 1)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


class InputHadamard(nn.Module):
    """x [..., n] -> x V, V = blockdiag(H_b) / sqrt(b): the online half of the rotation. No state to save:
    the matrix is a non-persistent buffer, rebuilt from b."""

    def __init__(self, block: int):
        super().__init__()
        self.block = block
        self.register_buffer("matrix", sylvester(block), persistent=False)
        self.scale = torch.tensor(float(block), dtype=torch.float64).sqrt()  # as compressed-tensors divides

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.to(torch.float32).unflatten(-1, (-1, self.block))  # [..., n / b, b]
        return ((blocks @ self.matrix) / self.scale).flatten(-2).to(x.dtype)

    def extra_repr(self) -> str:
        return f"block={self.block}"


def _rotate_input(module: nn.Module, args: tuple):
    return (module.input_hadamard(args[0]), *args[1:])


def target_layers(model: nn.Module, suffixes=(TARGET_SUFFIX,)) -> list[tuple[str, nn.Linear]]:
    """The nn.Linear modules whose names end with one of ``suffixes`` ("" selects every linear)."""
    return [(n, m) for n, m in model.named_modules() if n.endswith(tuple(suffixes)) and isinstance(m, nn.Linear)]


def refusal(model: nn.Module, block: int, suffixes=(TARGET_SUFFIX,)) -> str | None:
    """Why ``add_online_hadamard`` cannot run on this model (None: it can)."""
    try:
        sylvester(block)
    except ValueError as e:
        return str(e)
    layers = target_layers(model, suffixes)
    if not layers and tuple(suffixes) == (TARGET_SUFFIX,):
        return (f"online_hadamard needs MLP down_proj linears ({type(model).__name__} has no '*.{TARGET_SUFFIX}' "
                "nn.Linear): use a Llama / Qwen2 / Mistral-style model, online_hadamard_targets 'all', "
                "or online_hadamard 0")
    if not layers:
        return f"online_hadamard: no nn.Linear of {type(model).__name__} ends with {list(suffixes)[:3]}"
    if any(getattr(m, "input_hadamard", None) is not None for _, m in layers):
        return "the model already has online Hadamard transforms: apply online_hadamard once"
    bad = next((n for n, m in layers if m.in_features % block), None)
    if bad:
        width = model.get_submodule(bad).in_features
        return f"online_hadamard={block} does not divide {bad}'s input width {width}: pick a power of two that divides it"
    return None


@torch.no_grad()
def add_online_hadamard(model: nn.Module, block: int, suffixes=(TARGET_SUFFIX,)) -> list[str]:
    """Fold V into every float ``*.mlp.down_proj`` weight (or those ``suffixes`` name) (W <- W V) and rotate
    its input online (x <- x V): the same function. Raises ValueError (one sentence) before any change when
    it cannot. Returns the layer names; ``qat.quantize_model`` carries the transform into each QuantLinear."""
    reason = refusal(model, block, suffixes)
    if reason:
        raise ValueError(reason)
    names = []
    for name, linear in target_layers(model, suffixes):
        transform = InputHadamard(block).to(linear.weight.device)
        w = linear.weight.detach().double()  # [out, in]
        v = transform.matrix.double() / block ** 0.5
        linear.weight.copy_((w.unflatten(-1, (-1, block)) @ v).flatten(-2).to(linear.weight.dtype))
        linear.input_hadamard = transform
        linear.register_forward_pre_hook(_rotate_input)  # a module-level function: deepcopy keeps it
        names.append(name)
    model.config.qat_online_hadamard = {"block": block, "layers": len(names)}
    return names


# ----------------------------------------------------------------------------------------- export
def transform_layers(model: nn.Module) -> dict[str, int]:
    """{layer name: block} of every module whose input is rotated online."""
    return {n: m.input_hadamard.block for n, m in model.named_modules()
            if isinstance(getattr(m, "input_hadamard", None), InputHadamard)}


def transform_config(model: nn.Module) -> dict | None:
    """compressed-tensors ``transform_config`` for the model's online transforms (None when it has none)."""
    layers = transform_layers(model)
    if not layers:
        return None
    blocks = set(layers.values())
    if len(blocks) > 1:
        raise ValueError(f"online Hadamard blocks differ between layers ({sorted(blocks)}): export needs one size")
    return {"config_groups": {SCHEME: {
        "type": "hadamard", "head_dim": blocks.pop(), "randomize": False, "requires_grad": False,
        "precision": "float32",
        "apply": [{"targets": sorted(layers), "location": "input", "inverse": False, "ignore": []}],
    }}}


def transform_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``<layer>.R4_input.weight``: each layer's H_b (+-1, float32), as compressed-tensors saves its transforms."""
    return {f"{n}.{SCHEME}_input.weight": sylvester(b).contiguous() for n, b in transform_layers(model).items()}


def export_transform_config(folder: str | Path) -> dict | None:
    """The ``transform_config`` an export's config.json records (None when it has none)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    qc = json.loads(path.read_text()).get("quantization_config") or {}
    return qc.get("transform_config") or None


def apply_export_transforms(model: nn.Module, folder: str | Path) -> nn.Module:
    """Apply an export's online transforms to a model transformers loaded from it (transformers 5.25 reads
    the weights but not ``transform_config``), with compressed-tensors' own ``apply_transform_config``."""
    config = online_part(export_transform_config(folder))
    if config:
        from compressed_tensors.transform import TransformConfig, apply_transform_config

        apply_transform_config(model, TransformConfig.model_validate(config))
    return model


def online_part(config: dict | None) -> dict | None:
    """A transform_config with only its online applications (input / output ...). Another tool's export
    (llm-compressor's QuIP) also lists the weight-side half (``weight_input``), which is already fused into
    the saved weights: applied again on load it would rotate them twice."""
    groups = {}
    for name, scheme in ((config or {}).get("config_groups") or {}).items():
        online = [a for a in scheme.get("apply", []) if not str(a.get("location", "")).startswith("weight")]
        if online:
            groups[name] = {**scheme, "apply": online}
    return {"config_groups": groups} if groups else None


def attach_from_config(model: nn.Module, config: dict | None) -> None:
    """Rebuild InputHadamard on the QuantLinear layers a ``transform_config`` names (qat.load_quantized)."""
    for name, scheme in ((config or {}).get("config_groups") or {}).items():
        if scheme.get("type") != "hadamard" or scheme.get("randomize") or not scheme.get("head_dim"):
            raise ValueError(f"transform_config group {name!r} is not a deterministic block Hadamard (type "
                             f"{scheme.get('type')!r}): qat.load_quantized rebuilds only those; load it with transformers")
        for args in scheme.get("apply", []):
            if args.get("location") != "input" or args.get("inverse"):
                raise ValueError(f"transform_config group {name!r} applies at {args.get('location')!r}: "
                                 "qat.load_quantized rebuilds only online input transforms")
            for target in args["targets"]:
                for layer in _matching(model, target):
                    layer.input_hadamard = InputHadamard(scheme["head_dim"])


def _matching(model: nn.Module, target: str) -> list[nn.Module]:
    """The modules a compressed-tensors target names: an exact module name, or "re:PATTERN" (full match)."""
    if target.startswith("re:"):
        found = [m for n, m in model.named_modules() if re.fullmatch(target[3:], n)]
    else:
        found = [model.get_submodule(target)] if target in dict(model.named_modules()) else []
    if not found:
        raise ValueError(f"transform_config target {target!r} matches no module of the model: the checkpoint "
                         "does not belong to this architecture")
    return found
