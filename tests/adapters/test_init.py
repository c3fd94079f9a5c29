"""Error-aware initialisations reduce the activation-weighted error ||X (W - W_eff)^T||."""

import pytest
import torch
from torch import nn

from qat.adapters import AdapterConfig, attach, collect_inputs
from qat.adapters.init import channel_budgets, quantized_weight
from qat.config import LayerSpec
from qat.quant_linear import QuantLinear


def setup(bits=3):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    # Correlated inputs with uneven channel energy, so activation weighting matters.
    X = torch.randn(256, 64) @ torch.randn(64, 64) * torch.linspace(0.1, 3, 64)
    W = lin.weight.detach().clone()
    model = nn.Sequential(QuantLinear.from_linear(lin, LayerSpec(bits=bits, group_size=16)))
    return model, W, X


def err(model, W, X):
    layer = model[0]
    with torch.no_grad():
        y = model(X) - layer.bias
    return float((y - X @ W.T).norm() / (X @ W.T).norm())


def run(kind, init, rank=4):
    model, W, X = setup()
    calib = collect_inputs(model, ["0"], [X[:128], X[128:]])
    assert torch.equal(calib["0"], X)
    attach(model, AdapterConfig(kind=kind, rank=rank, placement="outside", init=init),
           calib=calib, float_weights={"0": W})
    return err(model, W, X)


def test_inits_reduce_error():
    base = run("lora", "zero")
    results = {i: run("lora", i) for i in ("loftq", "loftq_act")}
    results.update({i: run("wht", i) for i in ("wht_random", "qwha")})
    print("rel. output error", base, results)
    # Zero init leaves the quantization error; each error-aware init must remove a clear share of it.
    for name, value in results.items():
        assert value < 0.9 * base, (name, value, base)
    assert results["loftq_act"] < results["loftq"]   # it optimises exactly this objective
    assert results["qwha"] < results["wht_random"]   # scored positions beat random ones


def test_channel_budgets_sum_and_cap():
    E = torch.randn(10, 8) * torch.arange(1, 11)[:, None]
    k = channel_budgets(E, 40)
    assert int(k.sum()) == 40 and int(k.max()) <= 8
    assert k[-1] >= k[0]  # larger error rows get more values


def test_qwha_values_solve_least_squares():
    # With the full support (budget = out * in) QWHA's least squares reproduces E exactly.
    model, W, X = setup()
    attach(model, AdapterConfig(kind="wht", rank=64, placement="outside", init="qwha"),
           calib={"0": X}, float_weights={"0": W})
    layer = model[0]
    E = W - quantized_weight(layer)
    # Full support: D = E is feasible, so the ridge does not bias it; float32 values -> 1e-5 relative.
    torch.testing.assert_close(layer.adapter.delta_weight(), E, atol=1e-5 * float(E.abs().max()), rtol=0)


def test_init_errors():
    with pytest.raises(ValueError, match="placement='outside'"):
        AdapterConfig(kind="lora", init="loftq", placement="inside")
    model, W, X = setup()
    with pytest.raises(ValueError, match="calibration inputs"):
        attach(model, AdapterConfig(kind="wht", placement="outside", init="qwha"), float_weights={"0": W})


def test_loftq_save_load_keeps_rewritten_base(tmp_path):
    from qat.adapters import load_adapters, save_adapters

    model, W, X = setup()
    attach(model, AdapterConfig(kind="lora", rank=4, placement="outside", init="loftq", init_iters=2),
           float_weights={"0": W})
    save_adapters(model, tmp_path)
    fresh, _, _ = setup()  # same seed: the original base, before LoftQ rewrote it
    assert not torch.equal(fresh[0].base_packed, model[0].base_packed)
    load_adapters(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))
