"""LoRA and WHT adapters inside / outside a QuantLinear."""

import pytest
import torch
from torch import nn

from qat import primitives as P
from qat.adapters import LoRAAdapter, WHTAdapter
from qat.hadamard import hadamard_matrix
from qat.config import LayerSpec
from qat.quant_linear import QuantLinear


def make_layer(in_f=64, out_f=24, bits=4, group=16, symmetric=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f)
    return QuantLinear.from_linear(lin, LayerSpec(bits=bits, group_size=group, symmetric=symmetric)), lin


def test_lora_inside_merged_equals_unmerged():
    """merge() folds the inside LoRA into the frozen base: the merged layer's outputs equal the
    unmerged layer's bit for bit (same codes, same steps, same W_hat), and both equal the
    exported codes dequantized."""
    from qat.adapters import merge

    layer, _ = make_layer(symmetric=False)
    layer.adapter = LoRAAdapter(64, 24, rank=4, alpha=8, placement="inside")
    nn.init.normal_(layer.adapter.lora_B, std=0.05)
    x = torch.randn(5, 64)
    with torch.no_grad():
        layer.weight_scale.mul_(1.1)  # steps off the base's grid, as after training
        y = layer(x)
        codes, scale, zero = layer.export_codes()
        w = P.dequantize(codes, scale, zero, 4, 16)
        assert merge(nn.Sequential(layer)) == 1 and layer.adapter is None
        y_merged = layer(x)
    assert torch.equal(y_merged, y)
    torch.testing.assert_close(w, layer.fake_quant_weight(), atol=0, rtol=0)
    # Same codes and steps, only the matmul order differs (fp32, 64-term sums of |x w| ~ 1):
    # 64 * 2^-24 ~ 4e-6 relative; 1e-5 leaves a 2x margin.
    torch.testing.assert_close(y, x @ w.T + layer.bias, atol=1e-5, rtol=1e-5)


def test_adapter_changes_output():
    layer, _ = make_layer()
    x = torch.randn(5, 64)
    with torch.no_grad():
        y0 = layer(x)
        layer.adapter = LoRAAdapter(64, 24, rank=4, alpha=8, placement="inside")
        assert torch.equal(layer(x), y0)  # B = 0: identity
        nn.init.normal_(layer.adapter.lora_B, std=0.1)
        assert (layer(x) - y0).abs().max() > 1e-2


def test_lora_inside_gradient_through_quantizer():
    layer, _ = make_layer(bits=3)
    layer.adapter = LoRAAdapter(64, 24, rank=4, alpha=8, placement="inside")
    nn.init.normal_(layer.adapter.lora_B, std=0.05)
    x = torch.randn(7, 64)
    layer(x).pow(2).sum().backward()
    # float64 reference: y = x fake_quant(W0 + (alpha/r) B A)^T + b, plain autograd.
    A = layer.adapter.lora_A.detach().double().requires_grad_()
    B = layer.adapter.lora_B.detach().double().requires_grad_()
    w = layer.base_weight().double() + (B @ A) * 2.0
    w_hat = P.fake_quantize(w, layer.weight_scale.detach().double(), None, 3, 16)
    (x.double() @ w_hat.T + layer.bias.double()).pow(2).sum().backward()
    # fp32 vs fp64 of the same STE formula (same rounding decisions, checked by the forward test):
    # sums over 7x24 terms of size ~1 -> 1e-4 relative.
    torch.testing.assert_close(layer.adapter.lora_A.grad.double(), A.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.adapter.lora_B.grad.double(), B.grad, rtol=1e-4, atol=1e-5)
    assert B.grad.abs().max() > 0 and A.grad.abs().max() > 0


def test_lora_outside_forward():
    layer, _ = make_layer()
    a = LoRAAdapter(64, 24, rank=4, alpha=8, placement="outside")
    nn.init.normal_(a.lora_B)
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        y0 = layer(x)
        layer.adapter = a
        # fp32 thin matmuls vs dense D: 1e-5.
        torch.testing.assert_close(layer(x), y0 + x @ a.delta_weight().T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("in_f", [64, 48, 80])
def test_wht_outside_equals_dense(in_f):
    torch.manual_seed(in_f)
    a = WHTAdapter(in_f, 20, rank=2, alpha=3.0, placement="outside").double()
    nn.init.normal_(a.values)
    x = torch.randn(4, 3, in_f, dtype=torch.float64)
    S = torch.zeros(20, in_f, dtype=torch.float64)
    S[a.rows, a.cols] = a.values.detach()
    D = 3.0 / 20**0.5 * S @ hadamard_matrix(in_f) / in_f  # the documented formula, dense
    torch.testing.assert_close(a.delta_weight(), D, atol=1e-12, rtol=0)  # float64, O(n) sums
    torch.testing.assert_close(a(x), x @ D.T, atol=1e-12, rtol=0)
    assert a.values.numel() == 2 * (in_f + 20)


def test_wht_inside_gradient_matches_float64():
    """The inside WHT's values get d/dv of y = x Q(W0 + c S H / n)^T + b, checked against the
    same formula in float64 with a dense Hadamard matrix (width 96 = 12 * 8: H is not
    symmetric, so a transform applied the wrong way round shows)."""
    layer, _ = make_layer(in_f=96)
    adapter = layer.adapter = WHTAdapter(96, 24, rank=2, alpha=1.0, placement="inside")
    nn.init.normal_(adapter.values, std=0.5)
    x = torch.randn(3, 96)
    layer(x).sum().backward()
    v = adapter.values.detach().double().requires_grad_()
    S = torch.zeros(24, 96, dtype=torch.float64).index_put((adapter.rows, adapter.cols), v, accumulate=True)
    D = adapter.coef * S @ hadamard_matrix(96)                     # c S H / n, [out, in]
    w_hat = P.fake_quantize(layer.base_weight().double() + D, layer.weight_scale.detach().double(),
                            None, 4, 16)
    (x.double() @ w_hat.T).sum().backward()
    # The gradient is c * (G_ste H^T) at the support, G = sum over 3 tokens: fp32 sums of 3 + 96
    # terms, each at most |x| (|H| = 1), so |error| <= 2 (3 + 96) u * c * sum|x| (2x margin).
    tol = 2 * (3 + 96) * 2.0**-24 * adapter.coef * x.abs().sum().item()
    assert (adapter.values.grad.double() - v.grad).abs().max() <= tol
    assert v.grad.abs().max() > 100 * tol  # the gradient is far from zero: the bound means something


def test_errors():
    with pytest.raises(ValueError, match="between 1 and 24"):
        LoRAAdapter(64, 24, rank=32)
    with pytest.raises(ValueError, match="nearest widths"):
        WHTAdapter(100, 8, rank=1)
    with pytest.raises(ValueError, match="placement"):
        LoRAAdapter(64, 24, rank=4, placement="middle")


def test_wht_outside_gradient_matches_dense():
    torch.manual_seed(1)
    a = WHTAdapter(48, 16, rank=2, placement="outside").double()
    nn.init.normal_(a.values)
    x = torch.randn(5, 48, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 16, dtype=torch.float64)
    (a(x) * w).sum().backward()
    gv, gx = a.values.grad.clone(), x.grad.clone()
    a.values.grad, x.grad = None, None
    (x @ a.delta_weight().T * w).sum().backward()
    # float64, same linear map evaluated two ways: 1e-12.
    torch.testing.assert_close(gv, a.values.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(gx, x.grad, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["lora", "wht"])
def test_merge_exact_asymmetric_wide_storage(kind):
    from qat.adapters import merge

    torch.manual_seed(2)
    lin = nn.Linear(64, 24)
    layer = QuantLinear.from_linear(lin, LayerSpec(bits=3, group_size=16, symmetric=False, storage_bits=8))
    layer.adapter = (LoRAAdapter(64, 24, rank=4, alpha=8) if kind == "lora" else WHTAdapter(64, 24, rank=2))
    for p in layer.adapter.parameters():
        nn.init.normal_(p, std=0.1)
    with torch.no_grad():
        layer.weight_scale.mul_(1.1)  # steps moved away from the base's, as after training
        w = layer.fake_quant_weight().clone()
        assert merge(nn.Sequential(layer)) == 1
        assert layer.adapter is None and torch.equal(layer.fake_quant_weight(), w)


def test_wht_set_support_sorts_row_major():
    # The sparse forward needs CSR (row-major) order; set_support permutes values with their positions.
    torch.manual_seed(4)
    a = WHTAdapter(48, 16, rank=1).double()
    rows = torch.tensor([5, 0, 5, 2, 0])
    cols = torch.tensor([3, 7, 1, 40, 2])
    vals = torch.randn(5, dtype=torch.float64)
    S = torch.zeros(16, 48, dtype=torch.float64)
    S[rows, cols] = vals
    a.set_support(rows, cols, vals)
    flat = a.rows * 48 + a.cols
    assert torch.equal(flat, flat.sort().values)
    D = 1.0 / 16**0.5 * S @ hadamard_matrix(48) / 48
    torch.testing.assert_close(a.delta_weight(), D, atol=1e-12, rtol=0)  # float64, O(n) sums
    x = torch.randn(4, 48, dtype=torch.float64)
    a.placement = "outside"
    torch.testing.assert_close(a(x), x @ D.T, atol=1e-12, rtol=0)
