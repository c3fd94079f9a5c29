"""Layers for the kernel tests: a QuantLinear with steps moved off the base grid, so that
fake quantization really rounds (and clamps), plus a minimal dense inside adapter.

Imports nothing from triton: the test modules set TRITON_INTERPRET before they import it.
"""

from __future__ import annotations

import torch
from torch import nn

from qat import primitives as P
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


U = 2.0**-24  # fp32 unit roundoff


def exact_grads(layer, grad_y, x, w=None):
    """Float64 gradients from the forward's fp32 pieces (see test_grads_interpret's docstring),
    with the elementwise magnitudes the bounds need. ``w``: the pre-quantization weight W0 + D
    [out, in] fp32 the kernel rounds (default: the layer's own, with torch's D)."""
    bits, g = layer.spec.bits, layer.group_size
    qmin, qmax = P.qrange(bits)
    out, inp = layer.out_features, layer.in_features
    with torch.no_grad():
        w = layer.pre_quant_weight() if w is None else w              # [out, in] fp32 W0 + D
        scale, zero = layer.fake_quant_steps()
        s = scale.float().repeat_interleave(g, 1)                     # [out, in]
        v = (w.reshape(out, -1, g) / scale.float().unsqueeze(-1)).reshape(out, inp)  # fp32, as P
        z = torch.zeros_like(v) if zero is None else P.round_zero_point(zero, bits).repeat_interleave(g, 1)
        inside = ((v + z) >= qmin) & ((v + z) <= qmax)
        q = P.quantize_codes(w, scale, zero, bits, g).float()
    v, z, q, s, m = v.double(), z.double(), q.double(), s.double(), inside.double()
    gy2, x2 = grad_y.reshape(-1, out).double(), x.reshape(-1, inp).double()
    G, H = gy2.t() @ x2, gy2.abs().t() @ x2.abs()                     # [out, in]
    lsq = P.lsq_grad_scale(g, bits)
    c = (q - z) - m * v

    def group_sum(t):
        return t.reshape(out, -1, g).sum(-1)

    r = dict(scale=lsq * group_sum(G * c), scale_mag=lsq * group_sum(c.abs() * H),
             delta=G * m, delta_mag=H * m)
    if zero is not None:
        on_grid = ((torch.round(zero) >= qmin) & (torch.round(zero) <= qmax)).double()
        r["zero"] = lsq * on_grid * group_sum(-s * G * (1 - m))
        r["zero_mag"] = lsq * group_sum(s * H * (1 - m))
    return r, gy2.shape[0]


def close_within(got, want, mag, n_terms, out_dtype=torch.float32, name=""):
    """|got - want| <= 2 n_terms u mag (+ a 16-bit result's rounding): the fp32 accumulation
    bound of test_grads_interpret's docstring with a factor 2 margin."""
    tol = 2 * n_terms * U * mag + 1e-30
    if out_dtype != torch.float32:
        tol = tol + want.abs() * torch.finfo(out_dtype).eps  # a 16-bit result's rounding (2x margin)
    err = (got.double() - want).abs()
    assert (err <= tol).all(), f"{name}: max err {err.max():.3e}, worst err/tol {(err / tol).max():.2f}"


def layer_step(layer, x, mode):
    """One forward + backward of ``layer`` under kernel mode ``mode`` ("triton" / "reference"):
    (y, dx, {parameter name: grad}). The upstream gradient is a fixed ramp over outputs, so a
    gradient routed to the wrong output row or column shows up."""
    from qat.kernels import dispatch

    for p in layer.parameters():
        p.grad = None
    x = x.clone().requires_grad_()
    with dispatch.use_kernels(mode):
        y = layer(x)
        (y * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads
