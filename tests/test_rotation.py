"""Hadamard rotations folded into the weights (qat.rotation): the rotated float model computes the
same function, spreads planted outlier channels, exports as a plain model, and refuses what it cannot do."""

import copy
import json

import pytest
import torch
import transformers

import qat
from qat.rotation import rotate_model
from tests.conftest import cli_quantize_tiny_llama, tiny_llama, tiny_qwen2


def tiny_mistral(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.MistralForCausalLM(cfg).eval()


BUILDERS = [tiny_llama, tiny_qwen2, tiny_mistral]
IDS = ["llama", "qwen2", "mistral"]


def _float64_norms(monkeypatch, model):
    """transformers' RMSNorms compute in float32 whatever the input dtype; in float64 here, so the
    comparison measures the rotation's algebra, not the norm's float32 rounding (~1e-7)."""
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    for module in model.modules():
        if "RMSNorm" in type(module).__name__:
            monkeypatch.setattr(type(module), "forward", forward)


def _randomise(model, seed=0):
    """Non-trivial norm gains and biases, so folding and bias rotation are really exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.rand(p.shape, generator=gen, dtype=p.dtype) * 1.5 + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    return model


@pytest.mark.parametrize("builder", BUILDERS, ids=IDS)
def test_rotated_model_equals_the_original_in_float64(monkeypatch, builder):
    model = _randomise(builder().double())
    _float64_norms(monkeypatch, model)
    rotated = rotate_model(copy.deepcopy(model), seed=3)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(ids).logits, rotated(ids).logits
    # float64 (eps 1.1e-16): each weight goes through one fwht (sum(b_i) <= 64 + 16 terms) and the
    # forward through 2 layers of matmuls of width <= 128, so the rounding is ~1e-14 of max|logits|;
    # 1e-11 leaves three orders of margin, while a wrong sign, a missing fold or an unrotated
    # matrix changes the logits by O(max|logits|) (the planted bugs were off by > 1e-2).
    err = float((got - expected).abs().max() / expected.abs().max())
    assert err < 1e-11, err
    # ... and the weights really changed: a no-op "rotation" would pass the equality above.
    emb, rot_emb = model.model.embed_tokens.weight.detach(), rotated.model.embed_tokens.weight.detach()
    assert float((emb - rot_emb).abs().max()) > 0.1 * float(emb.abs().max())
    assert all(float(m.weight.detach().sub(1).abs().max()) == 0 for n, m in rotated.named_modules() if n.endswith("norm"))


def test_tied_head_is_untied_and_reloads(tmp_path):
    model = tiny_qwen2()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    rotate_model(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    model.save_pretrained(tmp_path / "rotated")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "rotated").eval()
    with torch.no_grad():
        got = reloaded(ids).logits
    # fp32 model: the rotation is computed in float64 and rounded once per weight (6e-8 relative),
    # and the forward's fp32 roundings differ after rotation; 1e-4 of max|logits| bounds both.
    assert float((got - expected).abs().max()) < 1e-4 * float(expected.abs().max())
    assert json.loads((tmp_path / "rotated" / "config.json").read_text())["qat_rotation"]["kind"] == "hadamard"


def _plant_outliers(model, channels=(5, 40), factor=30.0):
    """Outlier channels as LLMs grow them: a few residual channels far larger than the rest
    (embedding columns), amplified again by the norm gains that read them."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, list(channels)] *= factor
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[list(channels)] *= factor
    return model


def _reader_inputs(model, ids) -> torch.Tensor:
    """Inputs of every q_proj and gate_proj (the linears reading the normed residual), [rows, d]."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1])))
             for n, m in model.named_modules() if n.endswith(("q_proj", "gate_proj"))]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return torch.cat(seen)


def _kurtosis(x: torch.Tensor) -> float:
    """Mean over tokens of the kurtosis of the token's values (3 for a Gaussian)."""
    x = x.double()
    centred = x - x.mean(-1, keepdim=True)
    return float((centred.pow(4).mean(-1) / centred.pow(2).mean(-1).pow(2)).mean())


def _int8_token_error(x: torch.Tensor) -> float:
    """Relative error of dynamic per-token int8 quantization of x."""
    from qat.act_quant import ActQuantizer

    return float((ActQuantizer(8, "dynamic_token")(x) - x).norm() / x.norm())


def test_rotation_spreads_planted_outlier_channels():
    model = _plant_outliers(tiny_llama())
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    before = _reader_inputs(model, ids)
    rotate_model(model)
    after = _reader_inputs(model, ids)
    ratio = lambda x: float((x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean())  # noqa: E731  max / rms
    # Two channels of 64 carry most of the energy before: kurtosis up to ~64/2, max/rms up to ~sqrt(32).
    # After Q = diag(s) H / 8 each channel is a +-1/8 mix of all 64, so the spikes spread over every
    # channel: kurtosis near a Gaussian's 3, max/rms near 2-3.
    # Measured on seeds 0 / 1 / 2: kurtosis 47.1 / 43.4 / 39.6 -> 2.77 / 2.71 / 2.52; max/rms 7.27 /
    # 7.10 / 6.89 -> 2.47 / 2.56 / 2.36; int8 error 0.0105 / 0.0101 / 0.0101 -> 0.0057 / 0.0059 / 0.0054.
    assert _kurtosis(before) > 20 and _kurtosis(after) < 4
    assert ratio(after) < 0.5 * ratio(before)
    # The point of it: per-token int8 rounding error (relative, over the whole input) drops.
    assert _int8_token_error(after) < 0.7 * _int8_token_error(before)


def test_rotate_then_w8a8_exports_a_plain_model(tmp_path):
    model = rotate_model(tiny_llama())
    qat.quantize_model(model, qat.QuantConfig(bits=8, group_size=None, init="rtn", act_bits=8))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    qat.export_model(model, tmp_path / "rot_w8a8")
    config = json.loads((tmp_path / "rot_w8a8" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "transform_config" not in config["quantization_config"]  # no online transform to run
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "rot_w8a8").eval()
    with torch.no_grad():
        got, expected = reloaded(ids).logits, model(ids).logits
    # Same int8 weights; the activation steps differ (a_t/127 here, a_t/127.5 in compressed-tensors,
    # per-layer bound in tests/test_act_quant.py): over the whole tiny model that stays < 5% of max|logits|.
    assert float((got - expected).abs().max()) < 0.05 * float(expected.abs().max())


def _tiny_bert():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                  intermediate_size=128)
    return transformers.BertModel(cfg)


@pytest.mark.parametrize("build,phrase", [
    (_tiny_bert, "cannot rotate a bert model"),
    (lambda: transformers.LlamaModel(tiny_llama().config), "without an lm_head"),
    (lambda: qat.quantize_model(tiny_llama(), qat.QuantConfig(bits=8)), "already quantized"),
    (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=44, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1)), "hidden size 44 has no Hadamard matrix"),
])
def test_refuses_what_it_cannot_rotate(build, phrase):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=phrase):
        rotate_model(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def test_cli_quantize_rotates_w8a8_and_refuses_an_encoder(tmp_path, minilm_path, capsys):
    from qat.cli import main

    _, ids, expected = cli_quantize_tiny_llama(tmp_path, "--act-bits", "8", "--rotate", "hadamard")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["qat_rotation"]["kind"] == "hadamard"
    assert config["quantization_config"]["config_groups"]["group_0"]["input_activations"]["num_bits"] == 8
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    with torch.no_grad():
        got = reloaded(ids).logits
    # W8A8 of the rotated model vs the float original: int8 weight and activation rounding only
    # (measured 1.2% of max|logits| on this model); 5% would still catch a broken rotation (O(100%)).
    assert float((got - expected).abs().max()) < 0.05 * float(expected.abs().max())
    with pytest.raises(SystemExit, match="cannot rotate a bert model"):
        main(["quantize", "--model", minilm_path, "--out", str(tmp_path / "m"), "--rotate", "hadamard"])
    assert not (tmp_path / "m").exists()
