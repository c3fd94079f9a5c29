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
    """Every shipped recipe builds, and every key it sets reaches the arguments as written."""
    recipe = yaml.safe_load((RECIPES / name).read_text())
    args = build_arguments(["--config", str(RECIPES / name), "--model_name_or_path", str(tmp_path),
                            "--dataset", "pydoc", "--output_dir", str(tmp_path / "o")])
    overridden = {"model_name_or_path", "dataset", "output_dir"}
    for key, value in recipe.items():
        if key in overridden:
            continue
        got = getattr(args, key)
        got = getattr(got, "value", got)               # TrainingArguments' enums (lr_scheduler_type)
        if key == "report_to" and value == "none":     # TrainingArguments' spelling of "none"
            value = []
        assert got == value, f"{name}: {key} = {got!r}, the recipe says {value!r}"


# A non-default value for every field of the quantizer and adapter configs, and the recipe key
# that sets it. A new config field fails test_every_config_field_is_a_recipe_key until it is here.
QUANT_KEYS = {"bits": ("bits", 3), "group_size": ("group_size", 16), "symmetric": ("symmetric", False),
              "storage_bits": ("storage_bits", 8), "init": ("quant_init", "rtn"),
              "include": ("quant_include", [r"q_proj$"]), "exclude": ("quant_exclude", [r"v_proj$"]),
              "overrides": ("quant_overrides", {r"k_proj$": {"bits": 8}}),
              "learn_scale": ("learn_scale", False), "learn_zero_point": ("learn_zero_point", False),
              "gptq_damp": ("gptq_damp", 0.05), "gptq_act_order": ("gptq_act_order", True),
              "gptq_step_init": ("gptq_step_init", "rtn"), "gptq_target": ("gptq_target", "float"),
              "act_bits": ("act_bits", 8), "act_scheme": ("act_scheme", "static_tensor")}
ADAPTER_KEYS = {"kind": ("adapter", "wht"), "rank": ("adapter_rank", 4), "alpha": ("adapter_alpha", 2.0),
                "dropout": ("adapter_dropout", 0.1), "placement": ("adapter_placement", "outside"),
                "targets": ("adapter_targets", [r"q_proj$"]), "init": ("adapter_init", "loftq"),
                "init_iters": ("adapter_init_iters", 2), "init_steps": ("adapter_init_steps", 7)}
# Fields that are only valid together with another (dropout and LoftQ: outside only).
ADAPTER_NEEDS = {"dropout": {"adapter_placement": "outside"}, "init": {"adapter_placement": "outside"}}


def test_every_config_field_is_a_recipe_key(tmp_path):
    import dataclasses

    from qat.adapters import AdapterConfig
    from qat.config import QuantConfig

    from qat.trainers import arguments

    assert set(QUANT_KEYS) == {f.name for f in dataclasses.fields(QuantConfig)}
    assert set(ADAPTER_KEYS) == {f.name for f in dataclasses.fields(AdapterConfig)}
    # the flat names the arguments build the configs from are the ones this test sets
    assert arguments.QUANT_KEYS == {f: key for f, (key, _) in QUANT_KEYS.items()}
    assert arguments.ADAPTER_KEYS == {f: key for f, (key, _) in ADAPTER_KEYS.items()}
    flat = {f.name: f for f in dataclasses.fields(arguments.QATArguments)}
    for config_cls, table in ((QuantConfig, arguments.QUANT_KEYS), (AdapterConfig, arguments.ADAPTER_KEYS)):
        for f in dataclasses.fields(config_cls):  # one source: the flat default is the dataclass's
            key = flat[table[f.name]]
            made = key.default_factory() if key.default_factory is not dataclasses.MISSING else key.default
            assert made == getattr(config_cls(), f.name), (config_cls.__name__, f.name)
    cases = [("quant_config", f, *QUANT_KEYS[f], {}) for f in QUANT_KEYS]
    cases += [("adapter_config", f, *ADAPTER_KEYS[f], ADAPTER_NEEDS.get(f, {})) for f in ADAPTER_KEYS]
    for getter, field_name, key, value, needs in cases:
        recipe = tmp_path / f"{key}.yaml"
        recipe.write_text(yaml.safe_dump({"model_name_or_path": str(tmp_path), key: value, **needs}))
        args = build_arguments(["--config", str(recipe), "--output_dir", str(tmp_path / "o")])
        config = getattr(args, getter)()
        default = getattr(type(config)(), field_name)
        assert value != default and getattr(config, field_name) == value, (key, field_name)


def test_deepspeed_config_that_upcasts_codes_is_refused_at_once(tmp_path):
    cfg = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3, "zero_quantized_weights": True}}
    with pytest.raises(ValueError, match="zero_quantized_weights: ZeRO\\+\\+ would cast qat's packed int32 codes"):
        QATArguments(output_dir=str(tmp_path), report_to="none", deepspeed=cfg)
    with pytest.raises(ValueError, match="quantized_grads='int2'"):
        QATArguments(output_dir=str(tmp_path), report_to="none", quantized_grads="int2")


def test_default_recipe_at_ternary_drops_its_zero_point(tmp_path):
    """The default recipe is asymmetric, and ternary has no zero point: `qat train --bits 1.58` must
    run (symmetric), while an explicit `--symmetric false` with ternary is still refused in one sentence."""
    args = build_arguments(["--model_name_or_path", str(tmp_path), "--bits", "1.58"])
    assert args.bits == 1.58 and args.symmetric is True
    assert build_arguments(["--model_name_or_path", str(tmp_path)]).symmetric is False  # W4 keeps it
    with pytest.raises(ValueError, match="symmetric"):
        build_arguments(["--model_name_or_path", str(tmp_path), "--bits", "1.58", "--symmetric", "false"])
    # the default as a file (`--config encoder_distill.yaml --bits 1.58`) behaves the same
    from_file = build_arguments(["--config", str(RECIPES / "encoder_distill.yaml"), "--bits", "1.58"])
    assert from_file.symmetric is True
    # a recipe that itself says ternary and asymmetric is refused, not silently changed
    recipe = tmp_path / "t.yaml"
    recipe.write_text(yaml.safe_dump({"model_name_or_path": str(tmp_path), "bits": 1.58, "symmetric": False}))
    with pytest.raises(ValueError, match="symmetric"):
        build_arguments(["--config", str(recipe)])
