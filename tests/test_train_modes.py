"""Training modes (qat.train_modes): frozen codes (E2E-QP) and full-weight QAT, against float64
formulas, the kernels' reference path and the export as transformers reloads it."""

import pytest
import torch
import transformers

import qat
from qat import primitives as P
from qat.config import LayerSpec, QuantConfig
from qat.export import packed_state_dict
from qat.kernels import dispatch
from qat.quant_linear import QuantLinear
from qat.train_modes import apply_train_mode, check_train_mode, float_weights, unfreeze_biases_and_norms
from tests.conftest import tiny_llama

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _train(model, steps=5, lr=0.05):
    """A few Adam steps on a loss that moves every trainable tensor (large lr: codes would flip)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    target = torch.randn(2, 12, 128, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(IDS).logits - target).pow(2).mean()
        loss.backward()
        opt.step()
    return params


@pytest.mark.parametrize("symmetric", [True, False])
def test_frozen_code_weight_and_gradients_match_float64(symmetric):
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 8), LayerSpec(4, 32, symmetric))
    layer.set_train_mode("frozen_codes")
    with torch.no_grad():
        layer.weight_scale.mul_(1 + 0.3 * torch.rand_like(layer.weight_scale))  # steps moved far
        if layer.weight_zero_point is not None:
            layer.weight_zero_point.add_(0.3)  # still rounds to the same integer
    grad = torch.randn(8, 64)
    w_hat = layer.fake_quant_weight()
    w_hat.backward(grad)
    # float64 hand computation: W = s (q0 - z), dW/ds = q0 - z, dW/dz = -s (STE round)
    q = layer.base_codes().double().reshape(8, 2, 32)
    s = layer.weight_scale.detach().double()
    z = 0 if symmetric else torch.round(layer.weight_zero_point.detach().double()).unsqueeze(-1)
    want = ((q - z) * s.unsqueeze(-1)).reshape(8, 64)
    g = grad.double().reshape(8, 2, 32)
    # fp32 product of an integer and a step vs float64: one rounding, |err| <= 2^-24 |W|.
    torch.testing.assert_close(w_hat.double(), want, rtol=2e-7, atol=0)
    torch.testing.assert_close(layer.weight_scale.grad.double(), (g * (q - z)).sum(-1), rtol=1e-5, atol=1e-5)
    if not symmetric:
        torch.testing.assert_close(layer.weight_zero_point.grad.double(), -(g.sum(-1) * s), rtol=1e-5, atol=1e-6)
    # the codes are the base's whatever the steps: export writes them
    codes, scale, _ = layer.export_codes()
    assert torch.equal(codes, layer.base_codes())
    assert torch.equal(scale, layer.weight_scale.detach())


@pytest.mark.parametrize("mode", ["frozen_codes", "full_weight"])
def test_new_modes_bypass_the_kernels_explicitly(mode):
    pytest.importorskip("triton")
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 16), LayerSpec(4, 32, True))
    layer.set_train_mode(mode)
    x = torch.randn(3, 64)
    with dispatch.use_kernels("triton"):  # forced: a fake_quant layer would take the Triton path
        assert dispatch.kernel_path(layer, x) == "reference"
        y = layer(x)
    torch.testing.assert_close(y, x @ layer.fake_quant_weight().detach().t() + layer.bias, rtol=0, atol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_frozen_codes_train_steps_never_flip_codes_and_export_reloads_equal(tmp_path, symmetric):
    model = tiny_llama()
    config = QuantConfig(bits=4, group_size=32, symmetric=symmetric)
    qat.quantize_model(model, config)
    layers = qat.quant_layers(model)
    codes_before = {n: m.base_codes().clone() for n, m in layers}
    steps_before = {n: m.weight_scale.detach().clone() for n, m in layers}
    assert apply_train_mode(model, "frozen_codes") == 14
    model.requires_grad_(False)
    for _, m in layers:
        m.weight_scale.requires_grad_(True)
        if m.weight_zero_point is not None:
            m.weight_zero_point.requires_grad_(True)
    unfreeze_biases_and_norms(model, biases=True, norms=True)
    _train(model)
    for name, m in layers:
        assert not torch.equal(m.weight_scale, steps_before[name])  # the steps did train
        # W_hat / s is the fixed integer grid, exactly the base codes (minus z)
        codes, _, zero = m.export_codes()
        assert torch.equal(codes, codes_before[name]), name
    expected = _logits(model)
    qat.export_model(model, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    # Same codes and fp32 steps, (q - z) * s in the same dtype: equal up to BLAS order (1e-5).
    torch.testing.assert_close(_logits(reloaded), expected, rtol=0, atol=1e-5)
    ours = qat.load_quantized(tmp_path / "export")  # qat's loader: the same codes and steps back
    state = packed_state_dict(ours)
    for name, m in layers:
        got = qat.packing.unpack_int32(state[f"{name}.weight_packed"], 4, m.in_features)
        assert torch.equal(got, codes_before[name]), name
        assert torch.equal(state[f"{name}.weight_scale"], m.weight_scale.detach()), name


def test_full_weight_trains_master_weights_and_export_equals_the_fake_quant_forward(tmp_path):
    model = tiny_llama()
    config = QuantConfig(bits=4, group_size=32)
    weights = float_weights(model, config)
    model.requires_grad_(False)
    qat.quantize_model(model, config)
    start = _logits(model)
    apply_train_mode(model, "full_weight", weights)
    layers = qat.quant_layers(model)
    name, first = layers[0]
    assert torch.equal(first.master_weight, weights[name])  # the float model's weight
    torch.testing.assert_close(_logits(model), start, rtol=0, atol=0)  # step 0: the same codes
    _train(model, steps=5, lr=0.01)
    moved = sum(int((m.export_codes()[0] != m.base_codes()).sum()) for _, m in layers)
    assert moved > 0  # the float weights moved codes: the export must follow them, not the base
    for name, m in layers:
        assert not torch.equal(m.master_weight, weights[name])  # the master weights trained
        scale, zero = m.fake_quant_steps()
        want = P.quantize_codes(m.master_weight.detach(), scale.detach(), zero, 4, 32)  # round(clamp(W / s))
        assert torch.equal(m.export_codes()[0], want), name
    expected = _logits(model)
    qat.export_model(model, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    # The export's codes are the forward's round((W - 0)/s) of the master weights: equal up to BLAS order.
    torch.testing.assert_close(_logits(reloaded), expected, rtol=0, atol=1e-5)


def test_recipe_checks_name_the_fix():
    cfg = QuantConfig(bits=4, storage_bits=8)
    with pytest.raises(ValueError, match="drop storage_bits"):
        check_train_mode("frozen_codes", cfg, "none", "inside")
    with pytest.raises(ValueError, match="adapter: none"):
        check_train_mode("frozen_codes", QuantConfig(), "lora", "inside")
    with pytest.raises(ValueError, match="use one of"):
        check_train_mode("codes", QuantConfig(), "none", "inside")
    with pytest.raises(ValueError, match="override"):
        check_train_mode("frozen_codes", QuantConfig(overrides={"mlp": {"storage_bits": 8}}), "none", "inside")
    check_train_mode("frozen_codes", QuantConfig(), "lora", "outside")  # outside LoRA: fine
    check_train_mode("full_weight", QuantConfig(bits=4, storage_bits=8), "lora", "inside")
    layer = QuantLinear.from_linear(torch.nn.Linear(32, 4), LayerSpec(4, 32, True, storage_bits=8))
    with pytest.raises(ValueError, match="drop storage_bits"):
        layer.set_train_mode("frozen_codes")


def test_frozen_code_weight_equals_dequantize():
    # the same numbers as the exporter's / loader's dequantize, bit for bit
    torch.manual_seed(2)
    codes = torch.randint(-8, 8, (4, 64), dtype=torch.int8)
    scale, zero = torch.rand(4, 2) + 0.1, torch.randint(-8, 8, (4, 2)).float()
    assert torch.equal(P.dequantize_frozen_codes(codes, scale, zero, 4, 32), P.dequantize(codes, scale, zero, 4, 32))


@pytest.mark.parametrize("extra,message", [
    ({"train_mode": "frozen_codes"}, "adapter: none"),                          # default adapter: inside LoRA
    ({"train_mode": "frozen_codes", "adapter": "none", "storage_bits": 8}, "drop storage_bits"),
    ({"train_mode": "frozen"}, "train_mode='frozen': use one of"),
    ({"keep_best_steps": -1}, "keep_best_steps=-1"),
])
def test_recipe_is_refused_before_loading_in_one_sentence(tmp_path, extra, message):
    from qat.trainers import QATArguments

    base = dict(output_dir=str(tmp_path), task="embedding", distill="hidden_mse", report_to="none")
    with pytest.raises(ValueError, match=message) as err:
        QATArguments(**{**base, **extra})
    assert "\n" not in str(err.value)


def test_trainer_takes_master_weights_biases_and_norms_the_recipe_asks_for(tmp_path):
    from datasets import Dataset

    from qat.trainers import QATArguments, QATTrainer, parameter_groups
    from qat.trainers.run import prepare_model

    args = QATArguments(output_dir=str(tmp_path), task="causal_lm", adapter="none", train_mode="full_weight",
                        train_norms=True, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                        report_to="none", save_steps=100, disable_tqdm=True, dataloader_pin_memory=False)
    model = prepare_model(args, tiny_llama(), None)
    norms = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" in n}
    masters = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("master_weight")}
    assert len(masters) == 14 and norms and all(model.get_parameter(n).requires_grad for n in norms)
    groups = {g["name"]: g for g in parameter_groups(model, args)}
    assert len(groups["master_weights"]["params"]) == 14
    ids = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    QATTrainer(model=model, args=args, train_dataset=data).train()  # check_trainable lets them through
    assert all(not torch.equal(model.get_parameter(n), w) for n, w in masters.items())
    assert any(not torch.equal(model.get_parameter(n), w) for n, w in norms.items())


def test_full_weight_quantized_start_is_the_init_model_at_step_0(tmp_path):
    """full_weight_start 'quantized': the masters start at W0 = s0 (q0 - z0), the init's (here GPTQ's)
    dequantized weights, so the step-0 model and export are that init's, codes and all; the float start
    re-rounds the float weights instead, which loses GPTQ's error compensation."""
    from datasets import Dataset

    from qat.trainers import QATArguments
    from qat.trainers.run import prepare_model

    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(3))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    base = dict(output_dir=str(tmp_path), task="causal_lm", adapter="none", train_mode="full_weight",
                quant_init="gptq", calibration_samples=8, report_to="none")
    gptq = prepare_model(QATArguments(**base, full_weight_start="quantized"), tiny_llama(), data)
    from_float = prepare_model(QATArguments(**base), tiny_llama(), data)
    flipped = 0
    for (name, q), (_, f) in zip(qat.quant_layers(gptq), qat.quant_layers(from_float)):
        assert torch.equal(q.master_weight, q.base_weight()), name  # W0 exactly
        assert torch.equal(q.export_codes()[0], q.base_codes()), name  # step 0 exports the GPTQ codes
        flipped += int((f.export_codes()[0] != f.base_codes()).sum())
    assert flipped > 0  # the float start would not (round-to-nearest of the float weights)
    with pytest.raises(ValueError, match="full_weight_start='gptq': use 'float' or 'quantized'"):
        QATArguments(**base, full_weight_start="gptq")
