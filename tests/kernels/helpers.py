"""Layers for the kernel tests: a QuantLinear with steps moved off the base grid, so that
fake quantization really rounds (and clamps), plus a minimal dense inside adapter.

Imports nothing from triton: the test modules set TRITON_INTERPRET before they import it.
"""

from __future__ import annotations

import torch
from torch import nn

from qat.config import LayerSpec
from qat.quant_linear import QuantLinear


class InsideDelta(nn.Module):
    """Minimal inside adapter: a dense delta D [out, in] added to W0 before fake quantization."""

    placement = "inside"

    def __init__(self, out_features, in_features, scale):
        super().__init__()
        self.d = nn.Parameter(torch.randn(out_features, in_features) * scale)

    def delta_weight(self):
        return self.d


def make_layer(bits, symmetric, storage_bits=None, group=32, out=24, inp=64, delta=True, seed=0,
               dtype=torch.float32):
    """QuantLinear [out, in] over a random base; steps scaled by 1..1.3 and (asymmetric) zero
    points moved by N(0, 1), so W_hat != W0; ``delta`` attaches an InsideDelta of scale 0.01."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(inp, out, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out, inp, generator=g) * 0.05)
    spec = LayerSpec(bits=bits, group_size=group, symmetric=symmetric, storage_bits=storage_bits,
                     init="rtn")
    layer = QuantLinear.from_linear(linear, spec)
    with torch.no_grad():  # move the steps off the base grid so fake-quant really rounds
        layer.weight_scale.mul_(1 + 0.3 * torch.rand(layer.weight_scale.shape, generator=g))
        if layer.weight_zero_point is not None:
            layer.weight_zero_point.add_(torch.randn(layer.weight_zero_point.shape, generator=g))
    if delta:
        torch.manual_seed(seed)
        layer.adapter = InsideDelta(out, inp, 0.01)
    return layer
