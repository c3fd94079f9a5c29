import pytest
import torch
from torch import nn

from qat import LayerSpec, QuantLinear
from qat import primitives as P


class DenseDelta(nn.Module):
    """The simplest adapter for the slot: a trainable dense delta D [out, in]."""

    def __init__(self, out_features, in_features, placement):
        super().__init__()
        self.placement = placement
        self.delta = nn.Parameter(torch.randn(out_features, in_features) * 0.05)

    def delta_weight(self):
        return self.delta

    def forward(self, x):
        return x @ self.delta.t()


def make_layer(bits=4, storage_bits=None, symmetric=True, group=16, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    linear = nn.Linear(32, 12, dtype=dtype)
    return linear, QuantLinear.from_linear(linear, LayerSpec(bits, group, symmetric, storage_bits, "mse"))


@pytest.mark.parametrize("bits,symmetric", [(2, True), (3, False), (4, True), (8, False), (1.58, True)])
def test_same_grid_starts_at_base(bits, symmetric):
    """storage_bits == bits: the steps start at the base's, so W_hat == W0 exactly."""
    _, layer = make_layer(bits, None, symmetric)
    assert torch.equal(layer.fake_quant_weight(), layer.base_weight())


def test_storage8_base_is_near_lossless():
    linear, layer = make_layer(2, 8)
    err = (layer.base_weight() - linear.weight).norm() / linear.weight.norm()
    assert err < 0.01  # int8 group-16 RTN of a Gaussian: ~0.3% relative error
    assert layer.base_packed.dtype == torch.int32 and layer.base_packed.shape == (12, 8)


def reference_forward(layer, x, placement):
    """Plain-autograd reference (no recompute Function): the formula of DESIGN section 1."""
    w0 = layer.base_weight()
    d = layer.adapter.delta_weight().float() if placement == "inside" else 0  # W0 + D is fp32
    s = layer.weight_scale.to(layer.scale_dtype)  # the step as saved (fp32 master, cast)
    z = layer.weight_zero_point
    w_hat = P.fake_quantize(w0 + d, s, z, layer.spec.bits, layer.group_size,
                            lsq_scale=P.lsq_grad_scale(layer.group_size, layer.spec.bits))
    y = x @ w_hat.t() + layer.bias
    return y + layer.adapter(x) if placement == "outside" else y


@pytest.mark.parametrize("placement", ["inside", "outside"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_recomputed_backward_matches_autograd(placement, symmetric):
    """The recomputed backward (W_hat rebuilt from the codes, G = grad_y^T x reduced by hand)
    against plain autograd through the same formula. Run in float64 (a float64 layer: W_hat, G
    and every product in float64), so the two differ only by summation order: at most
    (10 tokens + 32 inputs) terms, |error| <= 42 u |sum of magnitudes| with u = 2^-53, and
    the magnitudes here are below 1e3: 1e-11 absolute leaves a 1000x margin; rtol 1e-10 the same
    for the larger entries (fp32 master steps: one fp32 ulp, below). A wrong formula (a missing LSQ scale, a mask off by one bin) is
    off by far more than that."""
    _, layer = make_layer(3, 8, symmetric, dtype=torch.float64)
    layer.adapter = DenseDelta(12, 32, placement).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    y.pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    assert {"weight_scale", "adapter.delta"} <= set(grads)
    gx = x.grad.clone()
    layer.zero_grad(); x.grad = None
    y_ref = reference_forward(layer, x, placement)
    y_ref.pow(2).sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(gx, x.grad, rtol=1e-10, atol=1e-11)
    for name, p in layer.named_parameters():
        if p.grad is not None:
            # The steps' fp32 master copies take their float64 gradients rounded to fp32: two
            # values 1e-13 apart may round to neighbouring floats, one ulp = eps |g| apart.
            rtol = torch.finfo(torch.float32).eps if p.dtype == torch.float32 else 1e-10
            torch.testing.assert_close(grads[name], p.grad, rtol=rtol, atol=1e-11, msg=name)
    assert "weight_scale" in grads and "adapter.delta" in grads
    assert ("weight_zero_point" in grads) == (not symmetric)
    assert "base_packed" not in grads and "base_scale" not in grads


def test_backward_saves_no_dense_weight():
    """Only the activations are saved for backward: nothing of the weight's shape [out, in]."""
    _, layer = make_layer(4, 8)
    layer.adapter = DenseDelta(12, 32, "inside")
    layer.adapter.delta.requires_grad_(False)  # leave only steps trainable
    shapes = []
    x = torch.randn(3, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(x)
    assert (12, 32) not in shapes, shapes
    y.sum().backward()
    assert layer.weight_scale.grad is not None


def test_bf16_compute():
    linear, layer = make_layer(4, None, True, dtype=torch.bfloat16)
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and layer.weight_scale.grad.dtype == torch.float32
    ref = x.detach().float() @ linear.weight.float().t() + linear.bias.float()
    rel = (y.float() - ref).norm() / ref.norm()
    assert rel < 0.15  # int4 group-16 quantization error of a Gaussian layer is ~8-10%


def test_export_codes_are_the_forward():
    _, layer = make_layer(2, 8, False)
    layer.adapter = DenseDelta(12, 32, "inside")
    codes, scale, zero = layer.export_codes()
    torch.testing.assert_close(P.dequantize(codes, scale, zero.float(), 2, 16), layer.fake_quant_weight(), rtol=0, atol=0)
    layer.weight_zero_point.data += 0.3  # still rounds to the same zero point
    assert torch.equal(layer.export_codes()[2], zero)


def test_conv1d_from_gpt2():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(12, 32)  # nx=32 in, nf=12 out, weight [32, 12]
    layer = QuantLinear.from_linear(conv, LayerSpec(8, 16))
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), conv(x), rtol=0.02, atol=0.02)  # int8: ~0.4% error
