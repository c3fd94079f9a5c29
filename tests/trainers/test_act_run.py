"""`qat train` with the W4A8 recipe (rotation + activation quantization) end to end on a tiny Llama."""

import json
from pathlib import Path

import pytest
import torch
import transformers

from qat.trainers.run import main
from tests.trainers.helpers import text_file, tiny_llama_dir

RECIPES = Path(__file__).resolve().parents[2] / "scripts" / "recipes"


@pytest.mark.parametrize("scheme", ["dynamic_token", "static_tensor"])
def test_w4a8_recipe_rotates_trains_exports_and_reloads(tmp_path, scheme):
    llama = tiny_llama_dir(tmp_path / "llama")
    out = tmp_path / "run"
    args = ["--config", str(RECIPES / "w4a8.yaml"), "--model_name_or_path", str(llama),
            "--dataset", str(text_file(tmp_path / "corpus.txt")), "--output_dir", str(out), "--max_length", "32",
            "--max_steps", "3", "--adapter_rank", "4", "--gradient_accumulation_steps", "1",
            "--per_device_train_batch_size", "4", "--eval_strategy", "no", "--save_steps", "10",
            "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--act_scheme", scheme]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # The run's own check, under compressed-tensors' step convention: same codes, same activation
    # steps, fp32 BLAS order only.
    assert metrics["export_max_abs_diff"] <= 1e-5
    config = json.loads((out / "export" / "config.json").read_text())
    assert config["qat_rotation"]["kind"] == "hadamard"
    (group,) = config["quantization_config"]["config_groups"].values()
    assert group["weights"]["num_bits"] == 4
    assert group["input_activations"]["strategy"] == ("token" if scheme == "dynamic_token" else "tensor")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out / "export")
    assert all(float(m.weight.detach().sub(1).abs().max()) == 0  # norms folded: a plain model
               for n, m in reloaded.named_modules() if n.endswith("norm"))
    if scheme == "static_tensor":  # every layer's learned activation step is saved, as compressed-tensors names it
        from safetensors.torch import load_file

        steps = {k: v for k, v in load_file(out / "export" / "model.safetensors").items() if k.endswith("input_scale")}
        assert len(steps) == 14 and all(torch.isfinite(v).all() and float(v) > 0 for v in steps.values())


def test_w4a4_recipe_with_online_hadamard_exports_its_transform(tmp_path):
    """`online_hadamard: 32` on the W4A8 recipe at A4: trains through the rotated down_proj inputs, and the
    export (transform_config) reloads through compressed-tensors' transform to the trained numerics."""
    llama = tiny_llama_dir(tmp_path / "llama")
    out = tmp_path / "run"
    args = ["--config", str(RECIPES / "w4a8.yaml"), "--model_name_or_path", str(llama), "--act_bits", "4",
            "--online_hadamard", "32", "--dataset", str(text_file(tmp_path / "corpus.txt")),
            "--output_dir", str(out), "--max_length", "32", "--max_steps", "3", "--adapter_rank", "4",
            "--gradient_accumulation_steps", "1", "--per_device_train_batch_size", "4", "--eval_strategy", "no",
            "--save_steps", "10", "--disable_tqdm", "true", "--dataloader_pin_memory", "false"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # The job's reload applies the transform_config with compressed-tensors (qat.online_hadamard), under
    # compressed-tensors' step convention: fp32 BLAS order only. Without the transform it is > 1e-2 off.
    assert metrics["export_max_abs_diff"] <= 1e-5
    config = json.loads((out / "export" / "config.json").read_text())
    assert config["qat_online_hadamard"] == {"block": 32, "layers": 2}
    (scheme,) = config["quantization_config"]["transform_config"]["config_groups"].values()
    assert scheme["head_dim"] == 32 and len(scheme["apply"][0]["targets"]) == 2
