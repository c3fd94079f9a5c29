"""QATArguments: the Trainer's TrainingArguments plus everything qat adds, flat, one field per knob.

Flat (not nested) so that a YAML recipe, ``--key value`` overrides on the command line and
``QATArguments(**kwargs)`` in Python all name a setting the same way. The qat fields are grouped
by prefix: the quantizer (bits, group_size, ...), ``adapter_*``, ``distill_*``, ``zo_*``, data.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from qat.adapters.init import INITS as ADAPTER_INITS
from qat.adapters import AdapterConfig
from qat.config import DEFAULT_EXCLUDE, QuantConfig

TASKS = ("causal_lm", "seq_cls", "embedding")
DISTILL_LOSSES = ("none", "kl", "cosine", "mse")
ZO_TARGETS = ("adapters", "steps", "both")


@dataclass
class QATArguments(TrainingArguments):
    # ---------------------------------------------------------------- model and task
    model_name_or_path: str = field(default="", metadata={"help": "local model folder or Hub id"})
    task: str = field(default="causal_lm", metadata={"help": f"one of {TASKS}; 'embedding' = sentence encoder"})
    max_length: int = field(default=128, metadata={"help": "tokens per training example"})
    # ---------------------------------------------------------------- data
    dataset: str = field(default="", metadata={"help": "file (txt/json/jsonl/parquet/csv), saved dataset folder, "
                                                         "Hub name, or 'pydoc' (the standard library's docs)"})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config name"})
    train_split: str = field(default="train")
    eval_dataset: str | None = field(default=None, metadata={"help": "like `dataset`; default: hold out eval_ratio"})
    eval_ratio: float = field(default=0.05, metadata={"help": "share held out for evaluation when no eval_dataset"})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=256)
    text_column: str = field(default="text")
    messages_column: str = field(default="messages", metadata={"help": "chat data: list of {role, content}"})
    label_column: str = field(default="label", metadata={"help": "seq_cls labels"})
    packing: bool = field(default=True, metadata={"help": "causal_lm: concatenate texts into max_length blocks"})
    # ---------------------------------------------------------------- quantizer
    bits: float = field(default=4, metadata={"help": "2, 3, 4, 8 (5-7) or 1.58 (ternary)"})
    group_size: int = field(default=32, metadata={"help": "inputs per step; -1 = one step per output channel"})
    symmetric: bool = field(default=True)
    storage_bits: int | None = field(default=None, metadata={"help": "frozen base width; default = bits"})
    quant_init: str = field(default="mse", metadata={"help": "step init: 'mse' or 'rtn'"})
    quant_include: list[str] = field(default_factory=lambda: [r".*"])
    quant_exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    quant_overrides: dict = field(default_factory=dict, metadata={"help": "{regex: {bits: 8, ...}}"})
    learn_scale: bool = field(default=True, metadata={"help": "train the steps (LSQ)"})
    learn_zero_point: bool = field(default=True)
    step_learning_rate: float | None = field(default=None, metadata={"help": "LR of the steps; default learning_rate"})
    zero_point_learning_rate: float | None = field(default=None, metadata={"help": "default step_learning_rate"})
    fake_quant_start_step: int = field(default=0, metadata={"help": "train unquantized for this many steps first"})
    matryoshka_widths: list[int] | None = field(default=None, metadata={
        "help": "Matryoshka (bits 8): train the int8 codes and their top-bit slices jointly, e.g. [8, 4, 2]"})
    matryoshka_weights: list[float] | None = field(default=None, metadata={
        "help": "loss weight of each matryoshka_widths entry; default 1 each"})
    # ---------------------------------------------------------------- adapter
    adapter: str = field(default="lora", metadata={"help": "'lora', 'wht' or 'none' (steps only)"})
    adapter_rank: int = field(default=8)
    adapter_alpha: float = field(default=16.0)
    adapter_dropout: float = field(default=0.0)
    adapter_placement: str = field(default="inside", metadata={"help": "'inside' (exact merge) or 'outside'"})
    adapter_targets: list[str] = field(default_factory=lambda: [r".*"])
    adapter_init: str = field(default="zero", metadata={"help": f"one of {ADAPTER_INITS}"})
    adapter_init_iters: int = field(default=AdapterConfig.init_iters, metadata={"help": "LoftQ alternations"})
    adapter_init_steps: int = field(default=AdapterConfig.init_steps,
                                    metadata={"help": "Adam steps of the inside 'refine' init"})
    calibration_samples: int = field(default=128, metadata={"help": "examples for error-aware adapter inits"})
    # ---------------------------------------------------------------- distillation
    distill: str = field(default="none", metadata={"help": f"teacher loss, one of {DISTILL_LOSSES}"})
    distill_weight: float = field(default=1.0, metadata={"help": "loss = (1-w) task + w distill"})
    distill_temperature: float = field(default=1.0)
    # ---------------------------------------------------------------- zeroth-order (optim: zo)
    zo_eps: float = field(default=1e-3, metadata={"help": "SPSA perturbation size"})
    zo_targets: str = field(default="adapters", metadata={"help": f"what ZO perturbs: {ZO_TARGETS}"})
    zo_num_perturbations: int = field(default=1)
    zo_clip: float | None = field(default=None, metadata={"help": "clip the directional derivative (QZO)"})
    # ---------------------------------------------------------------- distributed
    quantized_grads: str | None = field(default=None, metadata={"help": "FSDP2: reduce-scatter gradients as "
                                                                        "'int8' or 'int4' (stochastic rounding)"})
    # ---------------------------------------------------------------- export
    export_dir: str | None = field(default=None, metadata={"help": "default <output_dir>/export"})
    verify_export: bool = field(default=True, metadata={"help": "reload the export and compare outputs"})
    overwrite_output: bool = field(default=False, metadata={"help": "allow a non-empty output_dir"})

    def __post_init__(self):
        # `optim: zo` is ours; the Trainer still gets a real optimizer name (SGD without momentum) whose
        # param groups carry the scheduled learning rates the zeroth-order update reads.
        self.zeroth_order = str(self.optim) == "zo"
        if self.zeroth_order:
            self.optim = "sgd"
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; torch only warns without one
        super().__post_init__()
        self._check_qat_fields()

    def _check_qat_fields(self) -> None:
        for name, value, allowed in (("task", self.task, TASKS), ("distill", self.distill, DISTILL_LOSSES),
                                     ("zo_targets", self.zo_targets, ZO_TARGETS),
                                     ("adapter", self.adapter, ("lora", "wht", "none"))):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: use one of {allowed}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight={self.distill_weight}: use a value in [0, 1]")
        if self.distill == "kl" and self.task == "embedding":
            raise ValueError("distill='kl' needs logits: for task 'embedding' use 'cosine' or 'mse'")
        if self.task == "embedding" and self.distill == "none":
            raise ValueError("task 'embedding' has no labels: set distill to 'cosine' or 'mse'")
        if self.zo_eps <= 0 or self.zo_num_perturbations < 1:
            raise ValueError("zo_eps must be > 0 and zo_num_perturbations >= 1")
        if self.zeroth_order and self.adapter == "none" and self.zo_targets != "steps":
            raise ValueError("optim 'zo' with adapter 'none' has no adapters to perturb: set zo_targets: steps")
        if self.quantized_grads not in (None, "int8", "int4"):
            raise ValueError(f"quantized_grads={self.quantized_grads!r}: use null, 'int8' or 'int4'")
        self.quant_config()  # validates bits / group / overrides now, before any model is loaded
        from qat.matryoshka import check_widths

        check_widths(self.matryoshka_widths, self.matryoshka_weights, self.bits, self.storage_bits)
        self.adapter_config()
        if self.deepspeed:  # refuse a config that would upcast the packed codes, before any engine exists
            from qat.trainers.deepspeed_utils import check_deepspeed_config

            check_deepspeed_config(self.hf_deepspeed_config.config, world_size=self.world_size)

    def quant_config(self) -> QuantConfig:
        return QuantConfig(bits=self.bits, group_size=None if self.group_size in (None, -1, 0) else self.group_size,
                           symmetric=self.symmetric, storage_bits=self.storage_bits, init=self.quant_init,
                           include=list(self.quant_include), exclude=list(self.quant_exclude),
                           overrides=dict(self.quant_overrides), learn_scale=self.learn_scale,
                           learn_zero_point=self.learn_zero_point)

    def adapter_config(self) -> AdapterConfig | None:
        if self.adapter == "none":
            return None
        return AdapterConfig(kind=self.adapter, rank=self.adapter_rank, alpha=self.adapter_alpha,
                             dropout=self.adapter_dropout, placement=self.adapter_placement,
                             targets=list(self.adapter_targets), init=self.adapter_init,
                             init_iters=self.adapter_init_iters, init_steps=self.adapter_init_steps)

    def qat_dict(self) -> dict:
        """The qat fields only (what a recipe file adds to TrainingArguments)."""
        base = {f.name for f in dataclasses.fields(TrainingArguments)}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in base}


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(QATArguments) if f.init]


def check_keys(keys, where: str) -> None:
    """Unknown recipe keys fail with the nearest known names, before anything is loaded."""
    known = field_names()
    for key in keys:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else \
                "; `qat train --help` lists every key"
            raise ValueError(f"unknown {where} key {key!r}{hint}")
