"""README.md model card with Hub metadata, so an export folder is ready to upload."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from qat import __version__
from qat.online_hadamard import transform_layers


def bits_per_weight(layers, state: dict[str, torch.Tensor]) -> float:
    """(packed codes + scales + zero points) bits over quantized weight count, from the saved tensors."""
    n_weights, n_bytes = 0, 0
    for name, layer in layers:
        n_weights += layer.in_features * layer.out_features
        for suffix in ("weight_packed", "weight", "weight_scale", "weight_zero_point"):  # weight: int-quantized
            t = state.get(f"{name}.{suffix}")
            if t is not None:
                n_bytes += t.numel() * t.element_size()
    return 8 * n_bytes / max(n_weights, 1)


def _format_tags(layers) -> list[str]:
    from qat.export import weight_format  # qat.export imports this module

    bits = sorted({layer.spec.bits for _, layer in layers}, key=float)
    tags = ["qat", "quantized", "compressed-tensors"] + sorted({weight_format(layer) for _, layer in layers})
    tags += ["ternary" if b == 1.58 else f"int{b}" for b in bits]
    return tags


def write_model_card(folder: Path, model, layers, *, base_model, recipe, state) -> None:
    bpw = bits_per_weight(layers, state)
    meta = {
        "library_name": "transformers",
        "tags": _format_tags(layers),
        "pipeline_tag": None,
    }
    if base_model:
        meta["base_model"] = base_model
        meta["base_model_relation"] = "quantized"
    meta = {k: v for k, v in meta.items() if v is not None}
    formats = sorted({(l.spec.bits, l.group_size, l.spec.symmetric) for _, l in layers}, key=str)
    fmt_lines = "\n".join(
        f"| {b} | {g} | {'symmetric' if s else 'asymmetric'} | "
        f"{sum(1 for _, l in layers if (l.spec.bits, l.group_size, l.spec.symmetric) == (b, g, s))} |"
        for b, g, s in formats
    )
    recipe_block = json.dumps(recipe, indent=2, default=str) if recipe else "(post-training quantization, no training)"
    transforms = ""
    if transform_layers(model):  # transformers loads the weights but does not run the online transforms
        transforms = """
# The export rotates some layers' inputs online (quantization_config.transform_config), which transformers
# does not apply by itself: compressed-tensors does (vLLM applies it on its own).
from qat.online_hadamard import apply_export_transforms  # compressed_tensors.transform.apply_transform_config
model = apply_export_transforms(model, "<this folder>")"""
    text = f"""---
{yaml.safe_dump(meta, sort_keys=False).strip()}
---

# {getattr(model.config, "_name_or_path", "") or "qat model"} — quantized with qat

Low-bit weights in the compressed-tensors `pack-quantized` format, written by
[qat](https://github.com/) {__version__} from the integer codes the model was trained with.
**{bpw:.3f} bits per quantized weight** (codes + scales + zero points), {len(layers)} layers.

| bits | group size | grid | layers |
|---|---|---|---|
{fmt_lines}

## Load

```python
# pip install transformers compressed-tensors
from transformers import AutoModel  # or AutoModelForCausalLM
model = AutoModel.from_pretrained("<this folder or repo id>"){transforms}
```

## Recipe

```json
{recipe_block}
```
"""
    (folder / "README.md").write_text(text)
