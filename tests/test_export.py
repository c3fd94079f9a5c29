"""Export -> reload with transformers (and with qat) reproduces the QuantLinear model."""

import json
import os

import pytest
import torch
import transformers

import qat
from qat.export import packed_state_dict
from tests.conftest import tiny_llama, tiny_qwen2

# (bits, symmetric, group_size): every width, both grids, group and channel steps.
FORMATS = [(2, True, 32), (3, False, 32), (4, True, None), (4, False, 32), (8, True, 32), (8, False, None),
           (1.58, True, 32)]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("builder", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("bits,symmetric,group", FORMATS)
def test_transformers_reload_matches(tmp_path, builder, bits, symmetric, group):
    model = builder()
    qat.quantize_model(model, qat.QuantConfig(bits=bits, symmetric=symmetric, group_size=group))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = _logits(model, ids)
    qat.export_model(model, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    # The reload dequantizes the very codes and fp32 scales the layers used, (q - z) * s, the same
    # ops in the same dtype: the weights are bit-identical, so the logits are equal up to nothing
    # but kernel summation order (observed 0.0; allow 1e-5 for BLAS differences).
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=0, atol=1e-5)
    # ... and qat's own loader gives back trainable layers with the same outputs and bytes.
    ours = qat.load_quantized(tmp_path / "export")
    assert len(qat.quant_layers(ours)) == 14
    torch.testing.assert_close(_logits(ours, ids), expected, rtol=0, atol=1e-5)
    a, b = packed_state_dict(model), packed_state_dict(ours)
    for key in a:
        if key.endswith(("weight_packed", "weight_scale", "weight_zero_point")):
            assert torch.equal(a[key], b[key]), key


def test_minilm_reload_matches(tmp_path, minilm_path):
    tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
    batch = tok(["Quantization keeps the model small.", "A second, longer sentence for padding."],
                padding=True, return_tensors="pt")
    for bits, symmetric, group in [(4, True, 32), (3, False, 32), (2, True, None), (8, False, None)]:
        model = transformers.AutoModel.from_pretrained(minilm_path).eval()
        qat.quantize_model(model, qat.QuantConfig(bits=bits, symmetric=symmetric, group_size=group, init="rtn"))
        with torch.no_grad():
            expected = model(**batch).last_hidden_state
        out = tmp_path / f"minilm-{bits}-{symmetric}-{group}"
        qat.export_model(model, out)
        reloaded = transformers.AutoModel.from_pretrained(out).eval()
        with torch.no_grad():
            got = reloaded(**batch).last_hidden_state
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # bit-identical weights, see above
        assert (out / "tokenizer.json").exists() and (out / "modules.json").exists()


@pytest.mark.parametrize("bits,symmetric,group", [(2, True, 32), (3, False, 32), (4, True, 64), (8, True, None)])
def test_file_size_matches_nominal_bits(tmp_path, bits, symmetric, group):
    """Quantized tensors on disk = codes + scales (+ zero points) to within 2% of nominal."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4)).eval()
    qat.quantize_model(model, qat.QuantConfig(bits=bits, symmetric=symmetric, group_size=group))
    out = qat.export_model(model, tmp_path / "e")
    from safetensors import safe_open

    stored, n_weights, nominal = 0, 0, 0.0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if key.endswith(("weight_packed", "weight_scale", "weight_zero_point")):
                stored += t.numel() * t.element_size()
            if key.endswith("weight_shape"):
                o, i = t.tolist()
                n_weights += o * i
                g = i if group is None else group
                nominal += o * i * bits / 8 + o * (i // g) * 4 + (0 if symmetric else o * (i // g) * bits / 8)
    assert abs(stored - nominal) / nominal < 0.02
    card = (out / "README.md").read_text()
    assert f"{8 * stored / n_weights:.3f} bits per quantized weight" in card
    assert "library_name: transformers" in card


def test_sharded_export_and_mixed_precision(tmp_path):
    model = tiny_llama()
    cfg = qat.QuantConfig(bits=4, group_size=32, overrides={r"mlp\.down_proj": {"bits": 8, "group_size": None},
                                                             r"self_attn\.[qk]_proj": {"bits": 2}})
    qat.quantize_model(model, cfg)
    specs = {n: (l.spec.bits, l.group_size) for n, l in qat.quant_layers(model)}
    assert specs["model.layers.0.mlp.down_proj"] == (8, 128) and specs["model.layers.1.self_attn.k_proj"] == (2, 32)
    ids = torch.randint(0, 128, (1, 9))
    expected = _logits(model, ids)
    out = qat.export_model(model, tmp_path / "e", max_shard_size=20_000)
    assert (out / "model.safetensors.index.json").exists()
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == 3
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(qat.load_quantized(out), ids), expected, rtol=0, atol=1e-5)


def test_report(tmp_path):
    model = tiny_llama()
    float_weights = {n: m.weight.detach().double().clone() for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear)}
    qat.quantize_model(model, qat.QuantConfig(bits=4, group_size=32))
    rows = qat.quantization_report(model)
    assert len(rows) == 14
    for r in rows:  # ||W_hat - W|| / ||W||, recomputed in float64 from the weights before quantizing
        w = float_weights[r["name"]]
        w_hat = model.get_submodule(r["name"]).fake_quant_weight().double()
        want = float((w_hat - w).norm() / w.norm())
        # the report's fp32 norms of 64-4096 terms: relative error <= 4096 * 2^-24 ~ 2.4e-4
        assert r["rel_error"] == pytest.approx(want, rel=3e-4), r["name"]
    assert all(r["bits_per_weight"] == pytest.approx(5.0) for r in rows)  # 4 + 32-bit scale / 32
    assert "lm_head" not in {r["name"] for r in rows}
    assert "14 layers" in qat.format_report(rows)


# ----------------------------------------------------------------------------- bad input
def test_refuses_non_empty_dir_and_keeps_it(tmp_path):
    model = tiny_llama()
    qat.quantize_model(model, qat.QuantConfig())
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        qat.export_model(model, tmp_path / "e")
    assert (tmp_path / "e" / "precious.txt").read_text() == "keep me"
    # overwrite replaces an earlier export only, never a folder of the user's files (issue 17)
    with pytest.raises(FileExistsError, match="not a qat export"):
        qat.export_model(model, tmp_path / "e", overwrite=True)
    assert (tmp_path / "e" / "precious.txt").read_text() == "keep me"
    qat.export_model(model, tmp_path / "x")
    qat.export_model(model, tmp_path / "x", overwrite=True)
    assert (tmp_path / "x" / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "x"]  # no temporary or backup folder left


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_llama()
    qat.quantize_model(model, qat.QuantConfig())
    import qat.export as ex

    monkeypatch.setattr(ex, "write_model_card", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        qat.export_model(model, tmp_path / "e")
    assert list(tmp_path.iterdir()) == []


def test_bad_configs():
    with pytest.raises(ValueError, match="unsupported bit width"):
        qat.QuantConfig(bits=5.5)
    with pytest.raises(ValueError, match="does not divide"):
        qat.quantize_model(tiny_llama(), qat.QuantConfig(group_size=48))
    with pytest.raises(ValueError, match="no linear layer matches"):
        qat.quantize_model(tiny_llama(), qat.QuantConfig(include=["nothing_like_this"]))
    with pytest.raises(ValueError, match="overridable"):
        qat.QuantConfig(overrides={"q_proj": {"bitz": 2}})
    with pytest.raises(ValueError, match="storage_bits"):
        qat.QuantConfig(bits=4, storage_bits=2)


def test_model_untouched_when_a_layer_fails():
    model = tiny_llama()
    cfg = qat.QuantConfig(group_size=32, overrides={"down_proj": {"group_size": 48}})
    with pytest.raises(ValueError, match="down_proj"):
        qat.quantize_model(model, cfg)
    assert qat.quant_layers(model) == []


def test_truncated_and_foreign_checkpoints(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "float")
    with pytest.raises(ValueError, match="not a compressed-tensors checkpoint"):
        qat.load_quantized(tmp_path / "float")
    qat.quantize_model(model, qat.QuantConfig())
    out = qat.export_model(model, tmp_path / "e")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        qat.load_quantized(out)
    os.remove(out / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="truncated"):
        qat.load_quantized(out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        qat.load_quantized(tmp_path / "nope")


def test_gpt2_conv1d_quantizes_but_refuses_export(tmp_path):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=64)).eval()
    ids = torch.randint(0, 64, (1, 8))
    expected = _logits(model, ids)
    qat.quantize_model(model, qat.QuantConfig(bits=8, group_size=32))
    assert len(qat.quant_layers(model)) == 4  # c_attn, c_proj, c_fc, mlp.c_proj
    torch.testing.assert_close(_logits(model, ids), expected, rtol=0, atol=0.05)  # int8 noise
    with pytest.raises(ValueError, match="Conv1D"):
        qat.export_model(model, tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_mistral_and_bert_surgery(tmp_path):
    """Mistral (sliding-window Llama variant) and BERT (encoder) round-trip like Llama does."""
    torch.manual_seed(0)
    mistral = transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    qat.quantize_model(mistral, qat.QuantConfig(bits=4, symmetric=False))
    ids = torch.randint(0, 128, (1, 10))
    expected = _logits(mistral, ids)
    out = qat.export_model(mistral, tmp_path / "mistral")
    got = _logits(transformers.AutoModelForCausalLM.from_pretrained(out).eval(), ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)  # bit-identical weights
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128)).eval()
    qat.quantize_model(bert, qat.QuantConfig(bits=3))
    assert len(qat.quant_layers(bert)) == 7  # q, k, v, attn out, intermediate, output, pooler
    with torch.no_grad():
        expected = bert(ids % 64).last_hidden_state
    out = qat.export_model(bert, tmp_path / "bert")
    with torch.no_grad():
        got = transformers.AutoModel.from_pretrained(out).eval()(ids % 64).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_load_checkpoint_written_by_compressed_tensors(tmp_path):
    """A checkpoint packed by compressed-tensors' own compressor (no qat_config.json) loads into
    trainable QuantLinear layers that compute what transformers' loader computes."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from safetensors.torch import save_file

    from qat import primitives as P

    model = tiny_llama(seed=3)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state = {}
    for name, tensor in model.state_dict().items():
        module_name = name.rsplit(".", 1)[0]
        module = model.get_submodule(module_name)
        if isinstance(module, torch.nn.Linear) and name.endswith(".weight") and "lm_head" not in name:
            scale, zero = P.init_absmax(tensor, 4, 32, symmetric=False)
            packed = PackedQuantizationCompressor.compress(
                {"weight": tensor, "weight_scale": scale, "weight_zero_point": zero.to(torch.int8)}, scheme)
            state.update({f"{module_name}.{k}": v.contiguous() for k, v in packed.items()})
        else:
            state[name] = tensor.contiguous()
    state.pop("lm_head.weight", None) if model.config.tie_word_embeddings else None
    out = tmp_path / "foreign"
    out.mkdir()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    config.architectures = ["LlamaForCausalLM"]
    config.quantization_config = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args.model_dump()}},
        "ignore": ["lm_head"], "dequantize": True,
    }
    config.save_pretrained(out)
    ids = torch.randint(0, 128, (2, 7))
    expected = _logits(transformers.AutoModelForCausalLM.from_pretrained(out).eval(), ids)
    ours = qat.load_quantized(out)
    assert len(qat.quant_layers(ours)) == 14
    torch.testing.assert_close(_logits(ours, ids), expected, rtol=0, atol=1e-5)  # same codes and scales
    assert all(p.requires_grad for n, p in ours.named_parameters() if n.endswith("weight_scale"))
