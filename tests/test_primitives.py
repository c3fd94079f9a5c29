import math

import pytest
import torch

from qat import primitives as P


def test_grids():
    assert P.qrange(2) == (-2, 1) and P.qrange(3) == (-4, 3) and P.qrange(4) == (-8, 7) and P.qrange(8) == (-128, 127)
    assert P.qrange(1.58) == (-1, 1) and P.container_bits(1.58) == 2
    for bad in (1, 9, 2.5, "x"):
        with pytest.raises(ValueError):
            P.check_bits(bad)


def test_group_size_error_names_fix():
    with pytest.raises(ValueError, match=r"group sizes that divide it: \[16, 32"):
        P.check_group_size(96, 64, "q_proj")
    assert P.check_group_size(96, None) == 96 and P.check_group_size(96, -1) == 96


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lsq_gradients_match_formula(bits):
    """d w_hat/d s: round(w/s) - w/s inside, -Qn / Qp where clamped, times g = 1/sqrt(N Qp)."""
    torch.manual_seed(0)
    group = 16
    w = torch.randn(3, 32, dtype=torch.float64) * 2
    s = torch.full((3, 2), 0.3, dtype=torch.float64, requires_grad=True)
    w_ = w.clone().requires_grad_()
    g = P.lsq_grad_scale(group, bits)
    assert g == pytest.approx(1 / math.sqrt(group * (2 ** (bits - 1) - 1)))
    out = P.fake_quantize(w_, s, None, bits, group, lsq_scale=g)
    out.sum().backward()
    qmin, qmax = P.qrange(bits)
    v = (w.view(3, 2, group) / s.detach().unsqueeze(-1))
    ds = torch.where(v <= qmin, float(qmin), torch.where(v >= qmax, float(qmax), torch.round(v) - v))
    torch.testing.assert_close(s.grad, ds.sum(-1) * g, rtol=1e-12, atol=1e-12)
    inside = ((v > qmin) & (v < qmax)).reshape(3, 32).double()
    torch.testing.assert_close(w_.grad, inside)
    # forward value is the formula
    ref = torch.clamp(torch.round(v), qmin, qmax) * s.detach().unsqueeze(-1)
    torch.testing.assert_close(out, ref.reshape(3, 32), rtol=0, atol=0)


def test_lsq_plus_zero_point_gradient():
    """LSQ+: with w_hat = s (clamp(round(w/s) + z) - z), d/dz = 0 inside the grid, -s where clamped."""
    torch.manual_seed(1)
    w = torch.randn(2, 16, dtype=torch.float64) * 3
    s = torch.full((2, 1), 0.5, dtype=torch.float64)
    z = torch.tensor([[1.2], [-0.7]], dtype=torch.float64, requires_grad=True)
    P.fake_quantize(w, s, z, 3, 16).sum().backward()
    qmin, qmax = P.qrange(3)
    q = torch.round(w / s) + torch.round(z.detach())
    clamped = ((q < qmin) | (q > qmax)).double()
    torch.testing.assert_close(z.grad, -(clamped * s).sum(-1, keepdim=True))


def test_step_gradient_finite_difference_where_clamped():
    """Where every element is clamped the quantizer is smooth in s (w_hat = qmax*s or qmin*s),
    so LSQ's gradient must equal a central finite difference of the true function."""
    w = torch.tensor([[5.0, -6.0, 7.5, -9.0]], dtype=torch.float64)
    c = torch.tensor([[0.3, -1.1, 2.0, 0.7]], dtype=torch.float64)
    s = torch.tensor([[0.1]], dtype=torch.float64, requires_grad=True)
    (P.fake_quantize(w, s, None, 4, 4) * c).sum().backward()
    eps = 1e-6
    f = lambda v: (P.fake_quantize(w, torch.tensor([[v]], dtype=torch.float64), None, 4, 4) * c).sum().item()
    fd = (f(0.1 + eps) - f(0.1 - eps)) / (2 * eps)
    assert s.grad.item() == pytest.approx(fd, rel=1e-8)  # float64 central difference of a linear function


def test_ste_round_is_exact():
    x = torch.linspace(-5, 5, 1001, dtype=torch.float32)
    assert torch.equal(P.round_ste(x), torch.round(x))


@pytest.mark.parametrize("bits,symmetric", [(2, True), (3, False), (4, True), (4, False), (1.58, True)])
def test_mse_init_not_worse_than_absmax(bits, symmetric):
    torch.manual_seed(3)
    w = torch.randn(16, 64)
    err = {}
    for method in ("rtn", "mse"):
        s, z = P.init_steps(w, bits, 32, symmetric, method)
        err[method] = (P.fake_quantize(w, s, z, bits, 32) - w).pow(2).sum().item()
    assert err["mse"] <= err["rtn"] * (1 + 1e-6)


def test_codes_match_fake_quantize_and_dequantize():
    torch.manual_seed(4)
    w = torch.randn(8, 64)
    s, z = P.init_steps(w, 3, 32, False, "mse")
    codes = P.quantize_codes(w, s, z, 3, 32)
    assert codes.min() >= -4 and codes.max() <= 3
    assert torch.equal(P.dequantize(codes, s, z, 3, 32), P.fake_quantize(w, s, z, 3, 32))


def test_ternary_absmean():
    w = torch.tensor([[0.1, -0.4, 0.05, 0.9]])
    s, z = P.init_absmax(w, 1.58, 4, True)
    assert z is None and s.item() == pytest.approx(w.abs().mean().item())
    assert set(P.quantize_codes(w, s, None, 1.58, 4).flatten().tolist()) <= {-1, 0, 1}
