"""attach / merge / save-load on a tiny Llama, and export of an inside LoRA through qat.export_model."""

import pytest
import torch
import transformers
from peft import LoraConfig
from torch import nn

import qat
from qat.config import LayerSpec
from qat.quant_linear import QuantLinear
from qat.adapters import (AdapterConfig, LoRAAdapter, WHTAdapter, adapter_state_dict, attach, load_adapters,
                          merge, save_adapters)


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def quantized(seed=0):
    return qat.quantize_model(tiny_llama(seed), qat.QuantConfig(bits=4, group_size=32, init="rtn"))  # rtn: fast; mse adds seconds


def randomise(model, std=0.05):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapter." in name:
                p.normal_(0, std)


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def test_export_inside_lora_exact(tmp_path):
    model = quantized()
    adapters = attach(model, AdapterConfig(kind="lora", rank=4, targets=[r"q_proj$", r"down_proj$"]))
    assert len(adapters) == 4 and all(a.placement == "inside" for a in adapters.values())
    with torch.no_grad():
        before = model(IDS).logits
        randomise(model)
        trained = model(IDS).logits
    assert (trained - before).abs().max() > 1e-3  # the adapter is live
    qat.export_model(model, tmp_path / "out")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        got = reloaded(IDS).logits
    # Same codes, same steps, same fp32 dequantize: exactly equal (as without adapters).
    assert (got - trained).abs().max().item() == 0.0


def test_merge_is_exact():
    model = quantized()
    attach(model, AdapterConfig(kind="wht", rank=2, alpha=4.0, targets=[r"v_proj$"]))
    randomise(model, 1.0)
    with torch.no_grad():
        y = model(IDS).logits
        assert merge(model) == 2
        assert all(m.adapter is None for m in model.modules() if isinstance(m, qat.QuantLinear))
        assert torch.equal(model(IDS).logits, y)


@pytest.mark.parametrize("kind", ["lora", "wht"])
def test_save_load_roundtrip(tmp_path, kind):
    model = quantized()
    attach(model, AdapterConfig(kind=kind, rank=2, placement="outside", targets=[r"o_proj$"]))
    randomise(model)
    state = adapter_state_dict(model)
    assert state and all(".adapter." in k for k in state)
    save_adapters(model, tmp_path / "a")
    other = quantized()
    load_adapters(other, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(other(IDS).logits, model(IDS).logits)


def test_attach_errors_and_peft():
    model = quantized()
    with pytest.raises(ValueError, match=r"match no quantized layer; available: \['model.layers.0.self_attn.q_proj'"):
        attach(model, AdapterConfig(targets=[r"query_key$"]))
    with pytest.raises(ValueError, match="quantize_model"):
        attach(tiny_llama(), AdapterConfig())
    cfg = AdapterConfig.from_peft(LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    assert (cfg.kind, cfg.rank, cfg.alpha, cfg.dropout, cfg.placement) == ("lora", 4, 8.0, 0.1, "outside")
    adapters = attach(model, cfg)
    assert sorted(n.rsplit(".", 1)[-1] for n in adapters) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    with pytest.raises(ValueError, match="unknown adapter kind"):
        AdapterConfig(kind="dora")
    with pytest.raises(ValueError, match="does not fit"):
        attach(quantized(), AdapterConfig(rank=65))


def test_outside_lora_peft_roundtrip(tmp_path):
    from peft import PeftModel

    from qat.adapters.peft_format import export_with_peft

    model = quantized()
    attach(model, AdapterConfig(kind="lora", rank=4, alpha=8, placement="outside", targets=[r"(q|v)_proj$"]))
    randomise(model)
    with torch.no_grad():
        trained = model(IDS).logits
    export_with_peft(model, tmp_path / "base", tmp_path / "adapter")
    # peft wraps nn.Linear weights: load the base decompressed to dense (the codes' exact dequantization).
    qcfg = transformers.CompressedTensorsConfig(run_compressed=False)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=qcfg).eval()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = peft_model(IDS).logits
    # Same weights and LoRA factors; peft orders the two adds the same way, but its LoRA matmuls run in a
    # different association: fp32 round-off on logits of size ~1 -> 1e-5.
    torch.testing.assert_close(got, trained, atol=1e-5, rtol=1e-5)
    print("peft max |diff|", (got - trained).abs().max().item())


def _two_layer_model():
    torch.manual_seed(0)
    spec = LayerSpec(bits=3, group_size=16)
    return nn.Sequential(QuantLinear.from_linear(nn.Linear(64, 32), spec),
                         QuantLinear.from_linear(nn.Linear(32, 64), spec))


def test_attach_is_all_or_nothing():
    """LoftQ rewrites each layer's frozen base as it goes; when a later layer's init fails (here:
    no float weights for it), the earlier layers get their bases back and no adapter stays."""
    model = _two_layer_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    W0 = torch.randn(32, 64) * 0.1                      # float weights for layer 0 only
    with pytest.raises(ValueError):
        attach(model, AdapterConfig(kind="lora", rank=4, placement="outside", init="loftq"),
               float_weights={"0": W0})
    assert all(layer.adapter is None for layer in model)
    assert not hasattr(model, "qat_adapter_config")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_second_attach_is_refused_and_config_is_a_copy():
    model = _two_layer_model()
    config = AdapterConfig(kind="lora", rank=4, targets=[r"^0$"])
    attach(model, config)
    config.rank = 99                                     # the user's object, edited afterwards
    assert model.qat_adapter_config.rank == 4
    with pytest.raises(ValueError, match="0 already has an adapter: merge\\(model\\) first"):
        attach(model, AdapterConfig(kind="lora", rank=2, targets=[r"^1$"]))
    assert model[1].adapter is None and model.qat_adapter_config.rank == 4
