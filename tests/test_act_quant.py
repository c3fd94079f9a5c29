"""Activation fake-quantization (qat.act_quant): forward and gradients against formulas evaluated
element by element in float64 Python, QuantLinear wiring, and the W8A8 export reloaded by transformers."""

import json
import math

import pytest
import safetensors.torch
import torch
import transformers

import qat
from qat.act_quant import ActQuantizer, compressed_tensors_steps
from qat.quant_linear import QuantLinear
from tests.conftest import tiny_llama

QP, QN = 127, 128  # int8: codes in [-128, 127]


def _round_half_even(v: float) -> float:
    return float(round(v))  # Python's round is half-to-even, like torch.round


def _activations(seed=0, shape=(2, 5, 16)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    x[..., 3] *= 20  # an outlier channel: the per-token step follows it
    return x


def test_dynamic_token_forward_and_ste_by_hand():
    x = _activations().requires_grad_(True)
    quant = ActQuantizer(8, "dynamic_token")
    y = quant(x)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (y * upstream).sum().backward()
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            row = [float(v) for v in x[b, t].detach()]
            s = max(abs(v) for v in row) / QP          # s_t = max|x_t| / Qp
            for i, v in enumerate(row):
                q = min(max(_round_half_even(v / s), -QN), QP)
                # Same float64 operations as the formula: equal to the last bit.
                assert float(y[b, t, i].detach()) == q * s
    # STE: no element of a token exceeds its own absmax, so nothing is clamped and dy/dx = 1; the
    # gradient passes through x / s and q * s, two float64 roundings: 1e-15 relative (~4.5 ulp).
    torch.testing.assert_close(x.grad, upstream, rtol=1e-15, atol=0)


def test_static_tensor_forward_ste_and_lsq_gradient_by_hand():
    x = _activations(seed=2).requires_grad_(True)
    quant = ActQuantizer(8, "static_tensor")
    step = 0.05  # small enough that the outlier channel (|x| up to ~60) is clamped at +-127 * 0.05
    with torch.no_grad():
        quant.scale.fill_(step)
        quant.initialized.fill_(True)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = quant(x)
    (y * upstream).sum().backward()
    s = float(quant.scale.detach().double())  # the fp32 parameter's value, used in float64
    g = 1.0 / math.sqrt(x.numel() * QP)  # LSQ gradient scale, N = every element sharing the step
    grad_s, clamped = 0.0, 0
    for idx in range(x.numel()):
        v, u = float(x.detach().view(-1)[idx]), float(upstream.view(-1)[idx])
        r = v / s
        if r <= -QN:
            q, dq_ds, dq_dx = -QN, -QN, 0.0
        elif r >= QP:
            q, dq_ds, dq_dx = QP, QP, 0.0
        else:
            q = _round_half_even(r)
            dq_ds, dq_dx = q - r, 1.0                # LSQ: round(v/s) - v/s inside the grid
        clamped += dq_dx == 0.0
        assert float(y.detach().view(-1)[idx]) == q * s
        # STE: 1 inside, 0 where clamped (through x / s and q * s: two roundings, 1e-15 relative)
        assert float(x.grad.view(-1)[idx]) == pytest.approx(u * dq_dx, rel=1e-15, abs=0)
        grad_s += u * dq_ds
    assert clamped > 0  # the clamped branch was exercised
    # The gradient is reduced in float64 (in another order than this loop: < 1e-11 relative) and
    # lands in the fp32 parameter's .grad (rounding 6e-8 relative): 1e-6 relative leaves margin,
    # while a missing g (a factor ~142) or a wrong clamped-branch value (~127 per element) is far off.
    assert quant.scale.grad.dtype == torch.float32
    assert float(quant.scale.grad) == pytest.approx(grad_s * g, rel=1e-6)


def test_static_step_initialises_once_from_the_first_batch():
    quant = ActQuantizer(8, "static_tensor")
    first = _activations(seed=4, shape=(3, 16)).float()
    quant(first)
    assert float(quant.scale) == pytest.approx(float(first.abs().max()) / QP, rel=1e-6)
    quant(first * 10)  # a later, wider batch does not re-initialise: the step is trained from here
    assert float(quant.scale) == pytest.approx(float(first.abs().max()) / QP, rel=1e-6)


@pytest.mark.parametrize("scheme", ["dynamic_token", "static_tensor"])
def test_quant_linear_reads_the_quantized_input(scheme):
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 8)
    layer = QuantLinear.from_linear(linear, qat.LayerSpec(bits=4, group_size=16, init="rtn"))
    layer.act_quant = ActQuantizer(8, scheme)
    x = _activations(shape=(2, 3, 32)).float()
    y = layer(x)
    x_hat = layer.act_quant(x)
    expected = torch.nn.functional.linear(x_hat, layer.fake_quant_weight(), layer.bias)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)  # same ops, only BLAS order differs
    if scheme == "static_tensor":  # the step trains through the recomputed linear
        layer.act_quant.scale.grad = None
        layer(x).square().sum().backward()
        assert layer.act_quant.scale.grad is not None and float(layer.act_quant.scale.grad) != 0.0


@pytest.mark.parametrize("kwargs,phrase", [(dict(act_bits=6), "act_bits=6"),
                                            (dict(act_bits=8, act_scheme="per_channel"), "unknown act_scheme")])
def test_bad_activation_settings_fail_before_any_model(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        qat.QuantConfig(**kwargs)


def _w8a8(scheme):
    model = tiny_llama()
    qat.quantize_model(model, qat.QuantConfig(bits=8, group_size=None, init="rtn", act_bits=8, act_scheme=scheme))
    return model


def _inputs_of(model, ids) -> dict[str, torch.Tensor]:
    """Every quantized layer's input on ``ids`` (before its activation quantizer)."""
    seen, hooks = {}, []
    for name, layer in qat.quant_layers(model):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, n=name: seen.setdefault(n, a[0].detach())))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return seen


def test_w8a8_dynamic_export_reloads_within_the_rounding_bound(tmp_path):
    model = _w8a8("dynamic_token")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    qat.export_model(model, tmp_path / "w8a8")
    config = json.loads((tmp_path / "w8a8" / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    # W8A8 is written int-quantized (int8 `weight`), the format vLLM serves with its int8 x int8 kernels;
    # pack-quantized W8A8 is taken as weight-only there (and refused by vLLM CPU).
    assert config["format"] == group["format"] == "int-quantized"
    saved = safetensors.torch.load_file(str(tmp_path / "w8a8" / "model.safetensors"))
    for name, layer in qat.quant_layers(model):
        assert saved[f"{name}.weight"].dtype == torch.int8 and f"{name}.weight_packed" not in saved
        assert torch.equal(saved[f"{name}.weight"].int(), layer.export_codes()[0].int())
    assert group["input_activations"] | {"observer": None} == {
        "num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True,
        "group_size": None, "actorder": None, "observer": None}
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "w8a8").eval()
    with torch.no_grad():
        reloaded(ids)  # compressed-tensors decompresses the packed weights on the first forward
    # Bound, per layer and token t with absmax a_t: qat's step is a_t / 127 (vLLM's int8 kernels),
    # compressed-tensors' (what transformers runs) a_t / 127.5. Each rounds every element to within
    # half its own step (a_t itself lands on +-127 or +-127.5 -> clamped to 127: still half a step),
    # so |x_hat_qat - x_hat_ct| <= a_t/254 + a_t/255 < a_t/127, and the outputs, from the same
    # int8 weights W_hat, differ by at most sum_i |W_hat[o, i]| * a_t / 127 (+ fp32 rounding, 1e-5).
    inputs = _inputs_of(model, ids)
    worst = 0.0
    for name, layer in qat.quant_layers(model):
        x = inputs[name]
        theirs = reloaded.get_submodule(name)
        with torch.no_grad():
            diff = (layer(x) - theirs(x)).abs()
            w_l1 = layer.fake_quant_weight().abs().sum(dim=1)              # [out]
            bound = x.abs().amax(dim=-1, keepdim=True) / 127 * w_l1 + 1e-5  # [..., out]
        assert bool((diff <= bound).all()), name
        worst = max(worst, float((diff / bound).max()))
    assert worst > 1e-3  # the two step conventions really differ: the bound is exercised, not vacuous
    # Under compressed-tensors' step convention the trained model computes what the reload computes:
    # same int8 weights, same activation steps, same fp32 ops; only BLAS order can differ.
    with torch.no_grad(), compressed_tensors_steps(model):
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    # qat's own loader rebuilds the same dynamic quantizers: the whole model agrees exactly.
    ours = qat.load_quantized(tmp_path / "w8a8")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_w8a8_static_export_reloads_exactly(tmp_path):
    model = _w8a8("static_tensor")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="never set"):
        qat.export_model(model, tmp_path / "too_early")  # no forward yet: no static step to save
    with torch.no_grad():
        expected = model(ids).logits  # this first forward sets every static step (absmax / 127)
    qat.export_model(model, tmp_path / "w8a8s")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "w8a8s").eval()
    name, layer = qat.quant_layers(model)[0]
    assert float(reloaded.get_submodule(name).input_scale) == float(layer.act_quant.scale)
    # A static step is a saved number: transformers computes clamp(round(x / s), -128, 127) * s with
    # the same s and the same int8 weights, the same ops in fp32; only BLAS order can differ.
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=1e-5)
    ours = qat.load_quantized(tmp_path / "w8a8s")
    assert all(bool(m.act_quant.initialized) for _, m in qat.quant_layers(ours))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, expected, rtol=0, atol=1e-6)


def test_init_static_steps_calibrates_on_the_batch_it_is_given():
    from qat.act_quant import init_static_steps

    model = _w8a8("static_tensor")
    train = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    inputs = _inputs_of(_w8a8("dynamic_token"), train)  # the float-step-free inputs of the first layer
    assert init_static_steps(model, {"input_ids": train}) == 14
    name, layer = qat.quant_layers(model)[0]  # the first layer's input does not depend on earlier rounding
    assert float(layer.act_quant.scale) == pytest.approx(float(inputs[name].abs().max()) / QP, rel=1e-6)
    assert init_static_steps(model, {"input_ids": train * 0}) == 0  # set once: later batches train it


def test_w8a8_beside_w4a8_layers_exports_mixed_precision_and_reloads(tmp_path):
    """int8 layers with quantized activations go int-quantized, the 4-bit ones stay pack-quantized;
    the config says mixed-precision and both transformers and qat's loader read every layer."""
    model = tiny_llama()
    qat.quantize_model(model, qat.QuantConfig(bits=4, group_size=16, init="rtn", act_bits=8,
                                              overrides={"down_proj": {"bits": 8, "group_size": None}}))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    qat.export_model(model, tmp_path / "mixed")
    config = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mixed-precision"
    assert sorted(g["format"] for g in config["config_groups"].values()) == ["int-quantized", "pack-quantized"]
    ours = qat.load_quantized(tmp_path / "mixed")
    assert [type(m.act_quant).__name__ for _, m in qat.quant_layers(ours)] == \
        [type(m.act_quant).__name__ for _, m in qat.quant_layers(model)]
    with torch.no_grad():  # same codes, steps and dynamic quantizers: only fp32 op order can differ
        torch.testing.assert_close(ours(ids).logits, model(ids).logits, rtol=0, atol=1e-6)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mixed").eval()
        with compressed_tensors_steps(model):  # transformers runs compressed-tensors' step convention
            torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
