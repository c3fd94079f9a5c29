"""Matryoshka quantization: top-bit slices of int8 codes, the sliced training forward, the joint loss,
the sliced export (``qat export --bits R``) reloaded by transformers, and recipe validation."""

import json

import pytest
import torch
from torch import nn

import qat
from qat.cli import main as cli_main
from qat.matryoshka import fake_quantize_slice, joint_loss, slice_codes, slice_model, use_width
from qat.quant_linear import QuantLinear
from qat.surgery import quant_layers
from tests.conftest import tiny_llama


def top_bits(code: int, bits: int) -> int:
    """Reference slice of one signed int8 code, in plain integers: the top ``bits`` bits of the unsigned
    code (code + 128), rounded to nearest with halves up, saturated, then made signed again."""
    u, shift = code + 128, 8 - bits
    u_r = min((u + (1 << shift) // 2) >> shift, (1 << bits) - 1)
    return u_r - (1 << (bits - 1))


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 7])
def test_slices_equal_the_codes_top_bits(bits):
    codes = torch.arange(-128, 128, dtype=torch.int8).reshape(8, 32)  # every int8 code once
    got = slice_codes(codes, bits)
    expected = torch.tensor([top_bits(int(c), bits) for c in codes.flatten()]).reshape(codes.shape)
    assert torch.equal(got.to(torch.int64), expected)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    assert int(got.min()) == lo and int(got.max()) == hi  # the whole r-bit grid is used
    # The high bits of an unsaturated code are its truncation: the rounding adds at most one unit.
    u = codes.to(torch.int64) + 128
    assert ((got.to(torch.int64) + (1 << (bits - 1))) - (u >> (8 - bits))).abs().max() <= 1


def _layer(symmetric: bool, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    linear = nn.Linear(64, 16)
    spec = qat.LayerSpec(bits=8, group_size=32, symmetric=symmetric, storage_bits=8, init="rtn")
    layer = QuantLinear.from_linear(linear, spec)
    with torch.no_grad():  # trained steps / zero points, not the init's
        layer.weight_scale.mul_(torch.empty_like(layer.weight_scale).uniform_(0.6, 1.4))
        if layer.weight_zero_point is not None:
            layer.weight_zero_point.add_(torch.randint(-40, 40, layer.weight_zero_point.shape).float())
    return layer


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 4])
def test_sliced_training_forward_dequantizes_the_sliced_codes(symmetric, bits):
    layer = _layer(symmetric)
    codes, scale, zero = layer.export_codes()  # int8 codes of the trained layer
    model = nn.Sequential(layer)
    with use_width(model, bits):
        w_hat = layer.fake_quant_weight().double()
    # Reference in float64 from integers: (top bits - sliced zero point) * step * 2^(8 - bits).
    unit = 2 ** (8 - bits)
    q = torch.tensor([top_bits(int(c), bits) for c in codes.flatten()], dtype=torch.float64).view(codes.shape)
    if zero is None:
        z = torch.zeros(scale.shape, dtype=torch.float64)
    else:
        z = torch.tensor([top_bits(int(c), bits) for c in zero.flatten()], dtype=torch.float64).view(zero.shape)
    expected = (q.view(16, 2, 32) - z.unsqueeze(-1)) * (scale.double() * unit).unsqueeze(-1)
    # fp32 product of an exact small integer and a power-of-two-scaled step: one rounding, rel 2^-24.
    assert torch.allclose(w_hat, expected.view(16, 64), rtol=1e-6, atol=0)
    with use_width(model, 8):  # width 8 is the int8 layer itself
        assert torch.equal(layer.fake_quant_weight(), layer.to_fake_quant_linear().weight)
    assert getattr(layer, "slice_bits", None) is None  # the width is restored after the block


def test_slice_gradients_pass_straight_through():
    layer = _layer(True)
    w = layer.base_weight().requires_grad_(True)
    scale = layer.weight_scale.detach().clone().requires_grad_(True)
    fake_quantize_slice(w, scale, None, 4, 32).sum().backward()
    # STE: d W_r / d W = 1 where neither the int8 code nor its slice saturates, else 0. Reference mask
    # from the unrounded code v = W / s: inside int8's [-128, 127] and the slice's (v + 128) / 16 <= 15.
    v = (w.detach().view(16, 2, 32) / scale.detach().unsqueeze(-1)).view(16, 64)
    q8 = torch.round(v.clamp(-128, 127))
    inside = (v >= -128) & (v <= 127) & ((q8 + 128) / 16 <= 15)
    assert 0.5 < inside.float().mean() < 1  # both cases occur
    assert torch.equal(w.grad, inside.float())
    assert scale.grad is not None and scale.grad.abs().sum() > 0


def _int8_llama():
    model = tiny_llama()
    qat.quantize_model(model, qat.QuantConfig(bits=8, storage_bits=8, group_size=32, init="rtn"))
    for _, layer in quant_layers(model):  # steps moved as training moves them
        with torch.no_grad():
            layer.weight_scale.mul_(torch.empty_like(layer.weight_scale).uniform_(0.8, 1.2))
    return model


@pytest.mark.parametrize("bits", [4, 2])
def test_sliced_export_reloads_and_equals_the_sliced_training_forward(tmp_path, bits):
    import transformers

    model = _int8_llama()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad(), use_width(model, bits):
        sliced_logits = model(input_ids=ids).logits
    with torch.no_grad():
        int8_logits = model(input_ids=ids).logits
    qat.export_model(model, tmp_path / "int8")
    assert cli_main(["export", str(tmp_path / "int8"), "--out", str(tmp_path / f"w{bits}"), "--bits", str(bits)]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"w{bits}").eval()
    config = json.loads((tmp_path / f"w{bits}" / "config.json").read_text())["quantization_config"]
    assert {g["weights"]["num_bits"] for g in config["config_groups"].values()} == {bits}
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    # Same codes and steps, dequantised by compressed-tensors: fp32 summation-order differences only.
    assert (got - sliced_logits).abs().max() < 1e-4
    assert (got - int8_logits).abs().max() > 1e-2  # the slice is a different (coarser) model


def test_slicing_needs_an_int8_checkpoint(tmp_path):
    model = tiny_llama()
    qat.quantize_model(model, qat.QuantConfig(bits=4, group_size=32, init="rtn"))
    qat.export_model(model, tmp_path / "w4")
    with pytest.raises(SystemExit, match="slices int8 checkpoints"):
        cli_main(["export", str(tmp_path / "w4"), "--out", str(tmp_path / "w2"), "--bits", "2"])
    with pytest.raises(SystemExit, match="slices to 2 ... 8 bits"):
        cli_main(["export", str(tmp_path / "w4"), "--out", str(tmp_path / "w1"), "--bits", "1"])
    with pytest.raises(ValueError, match="cannot slice"):
        slice_model(model, 9)


def test_joint_loss_is_the_weighted_sum_of_the_widths_losses():
    model = _int8_llama()
    ids = torch.randint(0, 128, (2, 12))

    def loss_now():
        out = model(input_ids=ids, labels=ids)
        return out.loss, out

    separate = {}
    for bits in (8, 4, 2):
        with torch.no_grad(), use_width(model, bits):
            separate[bits] = model(input_ids=ids, labels=ids).loss.item()
    assert len({round(v, 4) for v in separate.values()}) == 3  # the widths are different models
    weights = [1.0, 0.5, 0.25]
    with torch.no_grad():
        total, _, per_width = joint_loss(model, [8, 4, 2], weights, loss_now)
    expected = sum(w * separate[b] for w, b in zip(weights, (8, 4, 2)))
    assert total.item() == pytest.approx(expected, rel=1e-6)  # fp32 sum of three terms
    assert {b: v.item() for b, v in per_width.items()} == pytest.approx(separate, rel=1e-6)


def test_trainer_runs_every_width_and_sums_the_weighted_losses(tmp_path):
    from datasets import Dataset

    from qat.trainers import QATArguments, QATTrainer
    from qat.trainers.run import prepare_model

    args = QATArguments(output_dir=str(tmp_path), task="causal_lm", max_steps=1, per_device_train_batch_size=2,
                        report_to="none", adapter="lora", adapter_rank=4, bits=8, storage_bits=8, group_size=32,
                        quant_init="rtn", matryoshka_widths=[8, 4, 2], matryoshka_weights=[1.0, 0.5, 2.0],
                        dataloader_pin_memory=False, disable_tqdm=True)
    model = prepare_model(args, tiny_llama(), None)
    ids = torch.randint(0, 128, (2, 12))
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist(),
                              "attention_mask": torch.ones_like(ids).tolist()})
    trainer = QATTrainer(model=model, args=args, train_dataset=data)
    inputs = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        joint = trainer.compute_loss(model, inputs).item()
        per = {}
        for bits in (8, 4, 2):
            with use_width(model, bits):
                per[bits] = model(**inputs).loss.item()
    assert joint == pytest.approx(per[8] + 0.5 * per[4] + 2.0 * per[2], rel=1e-6)


@pytest.mark.parametrize("changes, message", [
    (dict(matryoshka_widths=[8, 4, 1]), "cannot be sliced"),
    (dict(matryoshka_widths=[8, 4, 4]), "repeats a width"),
    (dict(matryoshka_widths=[8, 4], matryoshka_weights=[1.0]), "one weight per width"),
    (dict(matryoshka_widths=[8, 4], matryoshka_weights=[0.0, 0.0]), "not all zero"),
    (dict(matryoshka_widths=[8, 4], bits=4), "set bits: 8"),
    (dict(matryoshka_weights=[1.0]), "without matryoshka_widths"),
    (dict(matryoshka_widths=[8, 4], train_mode="frozen_codes"), "frozen_codes never moves a code"),
])
def test_recipe_keys_are_validated_before_loading(tmp_path, changes, message):
    from qat.trainers.recipes import build_arguments

    argv = ["--output_dir", str(tmp_path), "--bits", "8", "--storage_bits", "8", "--report_to", "none"]
    for key, value in changes.items():
        argv += [f"--{key}", str(value)]  # a list is read as YAML: "[8, 4, 1]"
    with pytest.raises(ValueError, match=message):
        build_arguments(argv)


def test_a_width_on_frozen_code_layers_is_refused():
    """frozen_codes computes s (q0 - z) from the base codes and never reaches the slice hook: a width
    there would silently be the int8 model (what a MiniLM run did before the recipe check existed)."""
    from qat.matryoshka import use_width
    from qat.train_modes import apply_train_mode

    model = tiny_llama()
    qat.quantize_model(model, qat.QuantConfig(bits=8, storage_bits=8, group_size=32))
    apply_train_mode(model, "frozen_codes")
    with use_width(model, 8):
        pass  # the int8 model itself is fine
    with pytest.raises(ValueError, match="frozen_codes, which would compute the int8 model"):
        with use_width(model, 4):
            pass
