"""Recipes and QATArguments: typing of overrides, unknown keys, validation before anything loads."""

from pathlib import Path

import pytest
import yaml

from qat.trainers.arguments import QATArguments
from qat.trainers.recipes import DEFAULT_RECIPE, MINILM_HUB_ID, build_arguments, parse_overrides

RECIPES = Path(__file__).resolve().parents[2] / "scripts" / "recipes"


def test_overrides_are_typed_like_yaml():
    got = parse_overrides(["--bits", "3", "--symmetric=false", "--adapter_targets", "[q_proj, v_proj]",
                           "--bf16", "--learning-rate", "1e-4", "--storage_bits", "null"])
    assert got == {"bits": 3, "symmetric": False, "adapter_targets": ["q_proj", "v_proj"], "bf16": True,
                   "learning_rate": 1e-4, "storage_bits": None}


def test_command_line_overrides_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": str(tmp_path), "bits": 4, "adapter_rank": 8}))
    args = build_arguments(["--config", str(recipe), "--bits", "2", "--output_dir", str(tmp_path / "o")])
    assert (args.bits, args.adapter_rank, args.run_name) == (2, 8, "r")
    assert args.quant_config().bits == 2


def test_unknown_key_suggests_nearest(tmp_path):
    with pytest.raises(ValueError, match=r"unknown command-line key 'adaptor_rank'; did you mean 'adapter_rank'"):
        build_arguments(["--adaptor_rank", "4"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rte: 0.1\n")
    with pytest.raises(ValueError, match="unknown recipe key 'learning_rte'; did you mean 'learning_rate'"):
        build_arguments(["--config", str(recipe)])


def test_bad_values_fail_before_loading(tmp_path):
    base = dict(output_dir=str(tmp_path), model_name_or_path=str(tmp_path), report_to="none")
    with pytest.raises(ValueError, match="unsupported bit width 5.5"):
        QATArguments(**base, bits=5.5)
    with pytest.raises(ValueError, match="overridable per layer"):
        QATArguments(**base, quant_overrides={"down_proj": {"rank": 3}})
    with pytest.raises(ValueError, match="distill='kl' needs logits"):
        QATArguments(**base, task="embedding", distill="kl")
    with pytest.raises(ValueError, match="zo_targets"):
        QATArguments(**base, optim="zo", zo_targets="everything")
    with pytest.raises(ValueError, match="unknown adapter placement"):
        QATArguments(**base, adapter_placement="beside")


def test_zo_is_an_optim_value(tmp_path):
    args = QATArguments(output_dir=str(tmp_path), optim="zo", report_to="none")
    assert args.zeroth_order and args.optim == "sgd"


def test_default_recipe_file_matches_embedded_default():
    on_disk = yaml.safe_load((RECIPES / "encoder_distill.yaml").read_text())
    assert on_disk.pop("model_name_or_path") == MINILM_HUB_ID
    embedded = {k: v for k, v in DEFAULT_RECIPE.items() if k != "run_name"}
    assert on_disk == embedded


@pytest.mark.parametrize("name", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_shipped_recipe_validates(name, tmp_path):
    build_arguments(["--config", str(RECIPES / name), "--model_name_or_path", str(tmp_path),
                     "--dataset", "pydoc", "--output_dir", str(tmp_path / "o")])


def test_deepspeed_config_that_upcasts_codes_is_refused_at_once(tmp_path):
    cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3, "zero_quantized_weights": True}}
    with pytest.raises(ValueError, match="zero_quantized_weights: ZeRO\\+\\+ would cast qat's packed int32 codes"):
        QATArguments(output_dir=str(tmp_path), report_to="none", deepspeed=cfg)
    with pytest.raises(ValueError, match="quantized_grads='int2'"):
        QATArguments(output_dir=str(tmp_path), report_to="none", quantized_grads="int2")
