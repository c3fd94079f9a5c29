"""Online Hadamard on the down_proj inputs (qat.online_hadamard): the float function is unchanged, the
matrix is compressed-tensors' own, and the export (transform_config + weights) reloads to the trained
numerics through compressed-tensors' apply_transform_config and through qat.load_quantized."""

import copy
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

import qat
from qat.act_quant import compressed_tensors_steps
from qat.online_hadamard import add_online_hadamard, apply_export_transforms, sylvester
from tests.conftest import cli_quantize_tiny_llama, tiny_llama, tiny_qwen2


def test_block_matrix_is_compressed_tensors_sylvester_and_orthogonal():
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    for b in (2, 16, 64):
        h = sylvester(b)
        assert torch.equal(h, deterministic_hadamard_matrix(b, torch.float32))
        v = h.double() / b ** 0.5
        assert torch.allclose(v @ v.T, torch.eye(b, dtype=torch.float64), atol=1e-14)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
def test_folded_float_model_computes_the_same_function(builder):
    model = builder().double()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        names = add_online_hadamard(model, 32)
        got = model(ids).logits
        teacher = copy.deepcopy(model)  # qat train copies the rotated model as its teacher: the hook must follow
        copied = teacher(ids).logits
    assert names == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    # The weight is folded in float64 and the online half runs in float32 (compressed-tensors' precision),
    # so the down_proj input is rounded once to float32 (rel. 6e-8); through 2 layers that stays below
    # 1e-5 of max|logits|. A missing fold, or a fold with V^T where V is not symmetric, is O(1).
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) < 1e-5 * scale
    assert float((copied - expected).abs().max()) < 1e-5 * scale


def _w4a4_online(tmp_path, act_bits=4):
    model = tiny_llama()
    add_online_hadamard(model, 32)
    qat.quantize_model(model, qat.QuantConfig(bits=4, group_size=32, init="rtn", act_bits=act_bits))
    out = qat.export_model(model, tmp_path / "export")
    return model, out


@pytest.mark.parametrize("act_bits", [4, 8])
def test_export_reloads_to_the_trained_numerics_through_compressed_tensors(tmp_path, act_bits):
    model, out = _w4a4_online(tmp_path, act_bits)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    (scheme,) = config["transform_config"]["config_groups"].values()
    assert scheme["type"] == "hadamard" and scheme["head_dim"] == 32
    assert scheme["apply"][0]["targets"] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    tensors = load_file(out / "model.safetensors")
    assert torch.equal(tensors["model.layers.1.mlp.down_proj.R4_input.weight"], sylvester(32))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad(), compressed_tensors_steps(model):
        trained = model(ids).logits
        plain = reloaded(ids).logits
        apply_export_transforms(reloaded, out)  # compressed-tensors' own Hadamard, hooked before its act quant
        transformed = reloaded(ids).logits
    # Same codes, steps and activation steps; compressed-tensors' transform multiplies by the same +-1
    # matrix in float32 and divides by sqrt(b): equal up to fp32 summation order (1e-5 of O(1) logits).
    assert float((transformed - trained).abs().max()) < 1e-5
    # Without the transform the reload runs W V on unrotated inputs: a different model.
    assert float((plain - trained).abs().max()) > 1e-2


def test_load_quantized_rebuilds_the_online_transform(tmp_path):
    model, out = _w4a4_online(tmp_path)
    loaded = qat.load_quantized(out)
    assert loaded.model.layers[0].mlp.down_proj.input_hadamard.block == 32
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)  # same tensors, same ops: bit-exact


def _tiny_bert():
    return transformers.BertModel(transformers.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1,
                                                          num_attention_heads=4, intermediate_size=128))


@pytest.mark.parametrize("build,block,phrase", [
    (tiny_llama, 24, "must be a power of two"),
    (tiny_llama, 256, "does not divide model.layers.0.mlp.down_proj's input width 128"),
    (_tiny_bert, 32, "needs MLP down_proj linears"),
])
def test_refuses_what_it_cannot_transform(build, block, phrase):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=phrase):
        add_online_hadamard(model, block)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched


def test_recipe_refuses_a_bad_block_and_gguf_before_loading():
    from qat.trainers.recipes import build_arguments

    with pytest.raises(ValueError, match="power of two"):
        build_arguments(["--model_name_or_path", "/nonexistent", "--online_hadamard", "48"])
    with pytest.raises(ValueError, match="online_hadamard with an outside adapter"):
        build_arguments(["--model_name_or_path", "/nonexistent", "--online_hadamard", "32", "--adapter", "lora",
                         "--adapter_placement", "outside"])
    with pytest.raises(ValueError, match="online_hadamard_targets='every'"):
        build_arguments(["--model_name_or_path", "/nonexistent", "--online_hadamard", "32",
                         "--online_hadamard_targets", "every"])
    with pytest.raises(ValueError, match="GGUF files hold no online transform"):
        build_arguments(["--model_name_or_path", "/nonexistent", "--task", "causal_lm", "--distill", "none",
                         "--online_hadamard", "32", "--bits", "4", "--export_format", "gguf",
                         "--symmetric", "true"])  # GGUF's Q4_0 is symmetric: the default's zero point is refused first


def test_cli_quantize_adds_the_transform_and_refuses_an_encoder(tmp_path, minilm_path):
    from qat.cli import main

    out, ids, expected = cli_quantize_tiny_llama(tmp_path, "--act-bits", "8", "--rotate", "hadamard",
                                                 "--online-hadamard", "64")
    reloaded = apply_export_transforms(transformers.AutoModelForCausalLM.from_pretrained(out), out)
    with torch.no_grad():
        got = reloaded.eval()(ids).logits
    # W8A8 of the rotated model vs the float original: int8 rounding only (the test_rotation bound, 5% of
    # max|logits|); a transform missing on either side is O(100%).
    assert float((got - expected).abs().max()) < 0.05 * float(expected.abs().max())
    with pytest.raises(SystemExit, match="needs MLP down_proj linears"):
        main(["quantize", "--model", str(minilm_path), "--out", str(tmp_path / "m"), "--bits", "8",
              "--online-hadamard", "64"])


def test_all_targets_rotate_every_quantized_encoder_linear_and_the_card_says_how_to_load(tmp_path):
    """online_hadamard_targets 'all' on a BERT encoder (no down_proj): every selected linear's input is
    rotated, the float function is kept, and the model card shows the transform step."""
    model = _tiny_bert().eval()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(ids).last_hidden_state
        targets = tuple(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "pooler" not in n)
        names = add_online_hadamard(model, 32, targets)
        got = model(ids).last_hidden_state
    assert len(names) == 6  # q, k, v, attention output, intermediate, output of the one layer
    assert float((got - expected).abs().max()) < 1e-5 * float(expected.abs().max())  # float32 transform only
    qat.quantize_model(model, qat.QuantConfig(bits=4, group_size=32, init="rtn"))
    out = qat.export_model(model, tmp_path / "export")
    assert "apply_export_transforms" in (out / "README.md").read_text()
    reloaded = apply_export_transforms(transformers.AutoModel.from_pretrained(out), out).eval()
    with torch.no_grad():  # weight-only: same codes, same transform, fp32 order only
        assert float((reloaded(ids).last_hidden_state - model(ids).last_hidden_state).abs().max()) < 1e-5


def test_reload_applies_only_the_online_half_of_another_tools_transform_config():
    """llm-compressor's QuIP export lists each rotation twice: online at the input, and at weight_input
    (inverse), which is already fused into the saved weights; applying that again would rotate them twice."""
    from qat.online_hadamard import online_part

    target = {"targets": ["re:.*dense$"], "ignore": []}
    config = {"config_groups": {"v": {"type": "hadamard", "head_dim": 32, "apply": [
        {**target, "location": "input", "inverse": False}, {**target, "location": "weight_input", "inverse": True}]},
        "fused_only": {"type": "hadamard", "apply": [{**target, "location": "weight_output", "inverse": False}]}}}
    kept = online_part(config)
    assert list(kept["config_groups"]) == ["v"]
    assert [a["location"] for a in kept["config_groups"]["v"]["apply"]] == ["input"]
    assert online_part(None) is None
