"""Serving targets: refused before any model loads when the runtime has no kernel for the format;
the GGUF target trains with fp16 steps and `qat train` writes an exact GGUF export."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
import yaml

import qat
from qat.gguf_export import GGUF_FILE
from qat.serving import check_serving, step_dtype
from qat.trainers.arguments import QATArguments
from qat.trainers.run import main
from tests.trainers.helpers import text_file, tiny_llama_dir

RECIPES = Path(__file__).resolve().parents[1] / "scripts" / "recipes"


def _args(tmp_path, **kw):
    return QATArguments(output_dir=str(tmp_path / "o"), model_name_or_path=str(tmp_path), report_to="none", **kw)


def test_vllm_cpu_8_bit_recipe_is_refused_before_training(tmp_path):
    recipe = tmp_path / "r.yaml"
    missing = tmp_path / "no-such-model"  # the refusal must come first, before the model path is even looked at
    recipe.write_text(yaml.safe_dump({"model_name_or_path": str(missing), "serving": "vllm-cpu", "bits": 8,
                                      "output_dir": str(tmp_path / "run"), "report_to": "none"}))
    with pytest.raises(SystemExit) as err:
        main(["--config", str(recipe)])
    message = str(err.value)
    assert "vLLM CPU serves compressed-tensors W4A16 only" in message and "set bits: 4" in message
    assert "\n" not in message and not (tmp_path / "run").exists()


@pytest.mark.parametrize("kw,words", [
    (dict(serving="vllm-cpu", bits=3), "vLLM CPU serves compressed-tensors W4A16 only"),
    (dict(serving="vllm-cpu", quant_overrides={"down_proj": {"bits": 8}}), "override 'down_proj' trains 8-bit"),
    (dict(serving="vllm-gpu", bits=2), "take 4 or 8 bits"),
    (dict(serving="vllm-gpu", bits=8, symmetric=False), "only Conch (an optional package"),
    (dict(serving="vllm-gpu", symmetric=False, group_size=16), "group -1 (per channel), 32, 64, 128 or 256"),
    (dict(serving="llama.cpp", group_size=64), "set group_size 32"),
    (dict(serving="llama.cpp", symmetric=False), "set symmetric true"),
    (dict(serving="llama.cpp", export_format="compressed-tensors"), "llama.cpp reads GGUF files only"),
    (dict(serving="vllm-cpu", export_format="gguf"), "set export_format: compressed-tensors"),
    (dict(export_format="gguf", task="embedding", distill="cosine"), "writes causal LMs"),
    (dict(export_format="gguf", adapter_placement="outside"), "use adapter_placement: inside"),
    (dict(serving="ollama"), "serving='ollama': use one of"),
])
def test_formats_a_target_cannot_run_are_refused(tmp_path, kw, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        _args(tmp_path, **kw)


def test_each_target_defaults_to_a_format_it_serves(tmp_path):
    assert _args(tmp_path, serving="llama.cpp").export_format == "gguf"
    assert _args(tmp_path, serving="vllm-cpu").export_format == "compressed-tensors"
    assert _args(tmp_path, serving="vllm-gpu", bits=8).export_format == "compressed-tensors"
    assert _args(tmp_path).export_format == "compressed-tensors"
    # Targets that store fp16 steps train with fp16 steps; plain transformers keeps the model's dtype.
    assert step_dtype("llama.cpp", "gguf") == torch.float16 and step_dtype("vllm-cpu", "compressed-tensors") == torch.float16
    assert step_dtype(None, "compressed-tensors") is None and step_dtype("transformers", "compressed-tensors") is None
    assert check_serving("transformers", "gguf", qat.QuantConfig(bits=8)) == "gguf"


def test_llama_cpp_recipe_trains_fp16_steps_and_exports_exact_gguf(tmp_path):
    llama_dir = tiny_llama_dir(tmp_path / "llama")
    data = text_file(tmp_path / "train.txt")
    out = tmp_path / "run"
    argv = ["--config", str(RECIPES / "causal_lm_cpt.yaml"), "--model_name_or_path", str(llama_dir), "--dataset", str(data), "--output_dir", str(out),
            "--serving", "llama.cpp", "--bits", "4", "--group_size", "32", "--max_steps", "3", "--max_length", "32", "--adapter_rank", "4",
            "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--eval_ratio", "0.2",
            "--gradient_accumulation_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
            "--disable_tqdm", "true", "--dataloader_pin_memory", "false"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # run() reloads the GGUF with transformers and compares logits with the trained model: same
    # dequantized weights, same fp32 ops; observed 0.0, 1e-5 allows BLAS summation order.
    assert metrics["export_max_abs_diff"] <= 1e-5 and metrics["recipe"]["export_format"] == "gguf"
    assert (out / "export" / GGUF_FILE).is_file()
    # The export itself refuses steps that are not fp16 values (test_gguf_export), so its existence
    # shows the run trained fp16 steps; its QAT row is measured on the GGUF reload.
    assert "perplexity" in metrics["rows"]["qat"]


# ------------------------------------------------------------------ config fidelity (qat/export.py)
@pytest.mark.parametrize("init,observer", [("mse", "mse"), ("rtn", "minmax")])
def test_exported_config_says_what_qat_did(tmp_path, init, observer):
    from importlib.metadata import version

    from compressed_tensors.quantization import QuantizationArgs
    from tests.conftest import tiny_llama

    model = tiny_llama()
    qat.quantize_model(model, qat.QuantConfig(bits=4, group_size=32, init=init))
    qat.export_model(model, tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert weights["observer"] == observer and weights["scale_dtype"] == "torch.float32"
    assert qc["version"] == version("compressed-tensors")
    # compressed-tensors' own schema (extra fields forbidden) accepts every field written.
    assert QuantizationArgs.model_validate(weights).observer == observer


def test_reexport_of_a_foreign_checkpoint_keeps_its_config(tmp_path):
    """An llm-compressor-style config (actorder static, its version, sparsity and transform
    configs) survives `qat export` unchanged; the tensors are rewritten from the same codes."""
    from qat.cli import main as cli
    from tests.conftest import tiny_llama

    model = tiny_llama()
    qat.quantize_model(model, qat.QuantConfig(bits=4, group_size=32, init="rtn"))
    qat.export_model(model, tmp_path / "foreign")
    cfg_path = tmp_path / "foreign" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    qc = cfg["quantization_config"]
    qc["version"] = "0.12.3.a20251114"
    qc["config_groups"]["group_0"]["weights"].update(actorder="static", observer="minmax", observer_kwargs={})
    qc["sparsity_config"] = {"format": "dense", "global_sparsity": 0.0, "sparsity_structure": "unstructured",
                             "targets": [], "ignore": []}
    qc["transform_config"] = {"config_groups": {}}
    qc["global_compression_ratio"] = None
    cfg_path.write_text(json.dumps(cfg))
    (tmp_path / "foreign" / "qat_config.json").unlink()  # another tool's checkpoint has none
    assert cli(["export", str(tmp_path / "foreign"), "--out", str(tmp_path / "re")]) == 0
    got = json.loads((tmp_path / "re" / "config.json").read_text())["quantization_config"]
    assert got == qc


def test_vllm_target_exports_fp16_steps(tmp_path):
    """serving: vllm-cpu rounds the steps to fp16 in training, so the fp32 weight_scale written holds
    fp16 values and vLLM's fp16 copy of it is the trained step, not a rounding of it."""
    from safetensors.torch import load_file

    from qat.trainers.run import quantize
    from tests.conftest import tiny_llama

    model = tiny_llama()
    quantize(_args(tmp_path, serving="vllm-cpu"), model)
    assert all(layer.step_dtype == torch.float16 for _, layer in qat.quant_layers(model))
    with torch.no_grad():
        for _, layer in qat.quant_layers(model):  # move the fp32 master off fp16 values, as training does
            layer.weight_scale.mul_(1.0001)
    qat.export_model(model, tmp_path / "ct")
    scales = [t for k, t in load_file(tmp_path / "ct" / "model.safetensors").items() if k.endswith("weight_scale")]
    assert scales and all(s.dtype == torch.float32 and torch.equal(s, s.half().float()) for s in scales)
