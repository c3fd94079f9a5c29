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
from qat.train_modes import check_train_mode

TASKS = ("causal_lm", "seq_cls", "embedding")
DISTILL_LOSSES = ("none", "kl", "cosine", "mse", "hidden_mse")
ZO_TARGETS = ("adapters", "steps", "both")
# One source for the quantizer and adapter knobs: every QuantConfig / AdapterConfig field is the flat recipe
# key named here, its default is the dataclass's own (``_config_field``), and quant_config() /
# adapter_config() are built from these tables. A new dataclass field needs only its flat field below
# (tests/trainers/test_arguments.py::test_every_config_field_is_a_recipe_key fails until it exists).
QUANT_KEYS = {f.name: {"init": "quant_init", "include": "quant_include", "exclude": "quant_exclude",
                       "overrides": "quant_overrides"}.get(f.name, f.name) for f in dataclasses.fields(QuantConfig)}
ADAPTER_KEYS = {f.name: "adapter" if f.name == "kind" else f"adapter_{f.name}"
                for f in dataclasses.fields(AdapterConfig)}


def _config_field(config_cls, name: str, help_text: str):
    """A flat recipe field whose default is ``config_cls``'s default for its field ``name``."""
    source = config_cls.__dataclass_fields__[name]
    if source.default_factory is not dataclasses.MISSING:
        return field(default_factory=source.default_factory, metadata={"help": help_text})
    return field(default=source.default, metadata={"help": help_text})


def _copied(value):
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


@dataclass
class QATArguments(TrainingArguments):
    # ---------------------------------------------------------------- model and task
    model_name_or_path: str = field(default="", metadata={"help": "The model to train: a local folder or a Hub id."})
    task: str = field(default="causal_lm", metadata={"help":
        f"What the model learns, one of {TASKS}; 'embedding' is a sentence encoder distilled from its float "
        "self."})
    max_length: int = field(default=128, metadata={"help": "Tokens per training example; longer ones are cut."})
    # ---------------------------------------------------------------- data
    dataset: str = field(default="", metadata={"help":
        "The training data: a txt / json / jsonl / parquet / csv file, a save_to_disk folder, a Hub name, or "
        "'pydoc' (the Python standard library's docs) or 'corpus' (qat.corpus: Python's docs and installed "
        "packages' docstrings, train / dev split by source)."})
    dataset_config: str | None = field(default=None, metadata={"help":
        "The Hub dataset's config name, if it has several."})
    train_split: str = field(default="train", metadata={"help": "The split of `dataset` to train on."})
    eval_dataset: str | None = field(default=None, metadata={"help":
        "Held-out data, given like `dataset`; when unset, eval_ratio of `dataset` is held out."})
    eval_ratio: float = field(default=0.05, metadata={"help":
        "The share of `dataset` held out for evaluation when eval_dataset is unset."})
    max_train_samples: int | None = field(default=None, metadata={"help":
        "Train on at most this many examples (all when unset)."})
    max_eval_samples: int | None = field(default=256, metadata={"help": "Evaluate on at most this many examples."})
    text_column: str = field(default="text", metadata={"help": "The column of plain text (TRL's 'text' format)."})
    messages_column: str = field(default="messages", metadata={"help":
        "The column of chat data, lists of {role, content}; the loss counts the assistant turns."})
    label_column: str = field(default="label", metadata={"help": "The column of class labels (task seq_cls)."})
    packing: bool = field(default=True, metadata={"help":
        "For plain text: concatenate the texts and cut them into max_length blocks (chat and "
        "prompt/completion data are never packed)."})
    # ---------------------------------------------------------------- quantizer
    bits: float = _config_field(QuantConfig, "bits", "The trained integer width: 2, 3, 4, 5-8, or 1.58 for ternary.")
    group_size: int = _config_field(QuantConfig, "group_size",
        "How many inputs of a row share one step (a group); -1 gives each output row one step.")
    symmetric: bool = _config_field(QuantConfig, "symmetric",
        "A grid symmetric around zero; false adds a zero point per group (asymmetric).")
    storage_bits: int | None = _config_field(QuantConfig, "storage_bits",
        "The width of the frozen base codes (storage bits); unset means the same as bits.")
    quant_init: str = _config_field(QuantConfig, "init",
        "How the steps and codes start: 'mse' searches the step with the least squared error, 'rtn' takes "
        "absmax / qmax, 'gptq' corrects each column's rounding error in the later columns (GPTQ, calibrated on "
        "calibration_samples training examples).")
    gptq_damp: float = _config_field(QuantConfig, "gptq_damp",
        "With quant_init gptq: the dampening added to the Hessian diagonal, as a share of its mean.")
    gptq_act_order: bool = _config_field(QuantConfig, "gptq_act_order",
        "With quant_init gptq: take columns by decreasing input energy (static groups: the export stays "
        "plain group-wise).")
    gptq_target: str = _config_field(QuantConfig, "gptq_target",
        "With quant_init gptq: what each layer fits, 'quantized' (GPTQ: its float weight on the quantized "
        "inputs) or 'float' (the float model's outputs, also undoing the error of the layers before it).")
    gptq_step_init: str = _config_field(QuantConfig, "gptq_step_init",
        "With quant_init gptq: how each group's step is searched, 'mse' or 'rtn'.")
    quant_include: list[str] = _config_field(QuantConfig, "include",
        "Regexes of the linear layers to quantize (matched anywhere in the name).")
    quant_exclude: list[str] = _config_field(QuantConfig, "exclude",
        "Regexes of the linear layers kept in float (by default the output head and classifier heads).")
    quant_overrides: dict = _config_field(QuantConfig, "overrides",
        "Per-layer settings for mixed precision, e.g. {down_proj: {bits: 8}}; the first matching regex wins.")
    learn_scale: bool = _config_field(QuantConfig, "learn_scale",
        "Train the steps (LSQ); false keeps them at their start.")
    learn_zero_point: bool = _config_field(QuantConfig, "learn_zero_point",
        "Train the zero points of an asymmetric grid (LSQ+).")
    act_bits: int | None = _config_field(QuantConfig, "act_bits",
        "Fake-quantize the activations too (8: W8A8 / W4A8, or 4); unset keeps them float.")
    act_scheme: str = _config_field(QuantConfig, "act_scheme",
        "How activation steps are set: 'dynamic_token' is one step per token, absmax / 127 (vLLM's int8); "
        "'static_tensor' one learned "
        "(LSQ) step per layer.")
    rotate: str | None = field(default=None, metadata={"help":
        "A rotation before quantizing: 'hadamard' folds QuaRot rotations into the float model before quantizing (Llama / Qwen2 / "
        "Mistral); unset: no rotation."})
    online_hadamard: int = field(default=0, metadata={"help":
        "Block size b (a power of two) of an online Hadamard on every MLP down_proj input (QuaRot's R4, "
        "block-diagonal): the weight is folded (W V), the input rotated each forward (x V) before its "
        "fake-quantizer; exported as compressed-tensors transform_config (docs/ACTIVATIONS.md). 0: none."})
    online_hadamard_targets: str = field(default="down_proj", metadata={"help":
        "Which linears' inputs online_hadamard rotates: 'down_proj' (the MLP down_proj, QuaRot's R4) or 'all' "
        "(every layer the recipe quantizes: incoherence processing for low-bit weights, any architecture)."})
    step_learning_rate: float | None = field(default=None, metadata={"help":
        "The learning rate of the steps; unset means learning_rate."})
    step_lr_relative: bool = field(default=False, metadata={"help":
        "Read step_learning_rate as a fraction of each layer's mean step (one optimizer group per layer, "
        "lr = step_learning_rate * mean |s| at the start), so one setting moves int8 and int2 steps alike: an "
        "absolute 1e-4 is ~0.5% of an int4 step per update but ~8% of an int8 one. Not under FSDP / DeepSpeed."})
    zero_point_learning_rate: float | None = field(default=None, metadata={"help":
        "The learning rate of the zero points; unset means step_learning_rate."})
    fake_quant_start_step: int = field(default=0, metadata={"help":
        "Train without rounding for this many steps first, then quantized."})
    train_mode: str = field(default="fake_quant", metadata={"help":
        "What trains: fake_quant re-rounds the codes every step, frozen_codes keeps them and trains only the steps "
        "(E2E-QP), full_weight trains float master weights (docs/TRAINING_MODES.md)."})
    full_weight_start: str = field(default="float", metadata={"help":
        "With train_mode full_weight: where the master weights start, 'float' (the float model's weights) or "
        "'quantized' (the init's dequantized weights, e.g. GPTQ's, so step 0 is that model and its codes)."})
    train_biases: bool = field(default=False, metadata={"help": "Also train the quantized layers' biases."})
    train_norms: bool = field(default=False, metadata={"help": "Also train every LayerNorm / RMSNorm parameter."})
    keep_best: bool = field(default=True, metadata={"help":
        "Score the dev split at step 0, every keep_best_steps and at the end, and export the best state."})
    keep_best_steps: int = field(default=50, metadata={"help": "Steps between dev scores (0: start and end only)."})
    matryoshka_widths: list[int] | None = field(default=None, metadata={"help":
        "Matryoshka (bits 8): train the int8 codes and their top-bit slices jointly, e.g. [8, 4, 2]."})
    matryoshka_weights: list[float] | None = field(default=None, metadata={"help":
        "The loss weight of each matryoshka_widths entry; unset means 1 each."})
    # ---------------------------------------------------------------- adapter
    adapter: str = _config_field(AdapterConfig, "kind",
        "The adapter trained with the steps: 'lora', 'wht' (Walsh-Hadamard) or 'none' (steps only).")
    adapter_rank: int = _config_field(AdapterConfig, "rank", "The LoRA rank (for wht: the same budget of values).")
    adapter_alpha: float = _config_field(AdapterConfig, "alpha",
        "The LoRA scale numerator: the update is scaled by alpha / rank.")
    adapter_dropout: float = _config_field(AdapterConfig, "dropout",
        "Dropout on the adapter's input (outside placement only).")
    adapter_placement: str = _config_field(AdapterConfig, "placement",
        "Where the adapter sits: 'inside' rounds it with the weight and merges it into the export exactly; "
        "'outside' adds it after the quantized layer (QLoRA, peft format).")
    adapter_targets: list[str] = _config_field(AdapterConfig, "targets",
        "Regexes of the quantized layers that get an adapter.")
    adapter_init: str = _config_field(AdapterConfig, "init",
        f"How the adapter starts, one of {ADAPTER_INITS}; 'zero' changes nothing at step 0.")
    adapter_init_iters: int = _config_field(AdapterConfig, "init_iters",
        "The alternations of the LoftQ adapter init.")
    adapter_init_steps: int = _config_field(AdapterConfig, "init_steps",
        "The Adam steps of the inside 'refine' adapter init.")
    # ---------------------------------------------------------------- block-wise reconstruction (before training)
    blockwise_steps: int = field(default=0, metadata={"help": "The Adam steps per transformer block fitting its steps and "
                                                              "adapters to the float block's outputs; 0 turns the stage off."})
    blockwise_lr: float = field(default=1e-3, metadata={"help": "The block-wise stage's learning rate of the adapters."})
    blockwise_step_lr: float = field(default=1e-4, metadata={"help": "The block-wise stage's learning rate of the steps."})
    blockwise_target: str = field(default="float", metadata={"help": "What each block is fitted to: 'float' is "
                                                                     "the float block on the float model's input, 'quantized' the float block on the quantized input."})
    blockwise_batches: int = field(default=4, metadata={"help": "The block-wise stage's calibration batches "
                                                                "(of 16) per step."})
    calibration_samples: int = field(default=128, metadata={"help": "Examples for the error-aware adapter "
                                                                    "inits, quant_init gptq and blockwise_steps."})
    # ---------------------------------------------------------------- distillation
    distill: str = field(default="none", metadata={"help":
        f"The loss to the float model (the teacher), one of {DISTILL_LOSSES}; 'none' trains on the labels "
        "only."})
    distill_weight: float | None = field(default=None, metadata={"help":
        "The weight w in loss = (1 - w) task + w distill; unset means 0.5 when there are labels, 1 for embedding."})
    distill_temperature: float = field(default=1.0, metadata={"help": "The softmax temperature of the 'kl' loss."})
    disable_dropout: bool = field(default=True, metadata={"help":
        "Turn the model's dropout off while training (every nn.Dropout to p=0, as TRL's disable_dropout does): "
        "the frozen base already regularises, and against a deterministic float teacher dropout noise is most "
        "of the distillation loss. false keeps the model's dropout; its config.json is unchanged either way."})
    # ---------------------------------------------------------------- zeroth-order (optim: zo)
    zo_eps: float = field(default=1e-3, metadata={"help": "With optim zo: the size of the SPSA perturbation."})
    zo_targets: str = field(default="adapters", metadata={"help":
        f"With optim zo: what is perturbed, one of {ZO_TARGETS}."})
    zo_num_perturbations: int = field(default=1, metadata={"help":
        "With optim zo: perturbation directions averaged per step."})
    zo_clip: float | None = field(default=None, metadata={"help":
        "With optim zo: clip the directional derivative to this size (QZO); unset means no clipping."})
    # ---------------------------------------------------------------- distributed
    quantized_grads: str | None = field(default=None, metadata={"help":
        "FSDP2 only: reduce-scatter the gradients as 'int8' or 'int4' (stochastic rounding)."})
    # ---------------------------------------------------------------- export
    export_dir: str | None = field(default=None, metadata={"help":
        "Where the packed export goes; unset means <output_dir>/export."})
    verify_export: bool = field(default=True, metadata={"help":
        "Reload the export with transformers and compare its outputs with the trained model's."})
    overwrite_output: bool = field(default=False, metadata={"help":
        "Allow writing into a non-empty output_dir (an existing export is replaced only at the end)."})
    export_format: str | None = field(default=None, metadata={"help":
        "The export format, 'compressed-tensors' or 'gguf' (llama.cpp Q4_0 / Q8_0); unset means the format `serving` reads."})
    serving: str | None = field(default=None, metadata={"help":
        "The runtime the export is for: transformers, vllm-gpu, vllm-cpu or llama.cpp; checked before training."})
    allow_worse_than_ptq: bool = field(default=False, metadata={
        "help": "Exit 0 even when the trained model ends worse than post-training quantization."})
    # ---------------------------------------------------------------- safety
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Run the Python code a model folder ships (auto_map); off: never, and never asked."})

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
        if self.distill_weight is None:  # the labels count unless the user says otherwise (embedding has none)
            self.distill_weight = 1.0 if self.task == "embedding" else 0.5
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight={self.distill_weight}: use a value in [0, 1]")
        if self.distill == "kl" and self.task == "embedding":
            raise ValueError("distill='kl' needs logits: for task 'embedding' use 'cosine' or 'mse'")
        if self.task == "embedding" and self.distill == "none":
            raise ValueError("task 'embedding' has no labels: set distill to 'cosine' or 'mse'")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps={self.max_steps} trains nothing: use a positive step count, or -1 (the "
                             "default) to train for num_train_epochs")
        if self.keep_best_steps < 0:
            raise ValueError(f"keep_best_steps={self.keep_best_steps}: use 0 (start and end only) or a step count")
        if self.zo_eps <= 0 or self.zo_num_perturbations < 1:
            raise ValueError("zo_eps must be > 0 and zo_num_perturbations >= 1")
        if self.zeroth_order and self.adapter == "none" and self.zo_targets != "steps":
            raise ValueError("optim 'zo' with adapter 'none' has no adapters to perturb: set zo_targets: steps")
        if self.blockwise_steps < 0 or self.blockwise_batches < 1 or min(self.blockwise_lr, self.blockwise_step_lr) <= 0:
            raise ValueError("blockwise_steps must be >= 0 (0 = off), blockwise_batches >= 1 and the blockwise "
                             "learning rates > 0")
        if self.full_weight_start not in ("float", "quantized"):
            raise ValueError(f"full_weight_start={self.full_weight_start!r}: use 'float' or 'quantized'")
        if self.blockwise_target not in ("float", "quantized"):
            raise ValueError(f"blockwise_target={self.blockwise_target!r}: use 'float' or 'quantized'")
        if self.quantized_grads not in (None, "int8", "int4"):
            raise ValueError(f"quantized_grads={self.quantized_grads!r}: use null, 'int8' or 'int4'")
        if self.step_lr_relative and (self.fsdp or self.deepspeed):
            raise ValueError("step_lr_relative sizes each layer's step learning rate from its whole step tensor, "
                             "which FSDP / DeepSpeed shard before the optimizer exists: drop step_lr_relative there")
        check_data_parallel(self)
        self.quant_config()  # validates bits / group / overrides now, before any model is loaded
        from qat.rotation import check_rotation

        check_rotation(self.rotate)
        if self.online_hadamard:
            from qat.online_hadamard import sylvester

            sylvester(self.online_hadamard)  # a block that is not a power of two fails here, before loading
        if self.online_hadamard_targets not in ("down_proj", "all"):
            raise ValueError(f"online_hadamard_targets={self.online_hadamard_targets!r}: use 'down_proj' or 'all'")
        if self.online_hadamard and self.adapter != "none" and self.adapter_placement == "outside":
            raise ValueError("online_hadamard with an outside adapter: the peft adapter beside the base would read "
                             "rotated inputs that a plain peft reload does not make; use adapter_placement inside")
        from qat.matryoshka import check_widths

        check_widths(self.matryoshka_widths, self.matryoshka_weights, self.bits, self.storage_bits,
                     self.train_mode)
        self.adapter_config()
        check_train_mode(self.train_mode, self.quant_config(), self.adapter, self.adapter_placement)
        self.check_exportable()
        from qat.serving import check_serving  # the target's kernels take every layer format, or refuse now

        self.export_format = check_serving(
            self.serving, self.export_format, self.quant_config(), task=self.task,
            outside_adapter=self.adapter != "none" and self.adapter_placement == "outside",
            sharded=bool(self.fsdp) or bool(self.deepspeed))
        if self.act_bits is not None and self.export_format == "gguf":
            raise ValueError("act_bits is set but GGUF files hold no activation format (llama.cpp quantizes "
                             "activations its own way): export compressed-tensors, or leave act_bits unset")
        if self.online_hadamard and self.export_format == "gguf":
            raise ValueError("online_hadamard is set but GGUF files hold no online transform (llama.cpp would run the "
                             "rotated weights on unrotated inputs): export compressed-tensors, or set online_hadamard 0")
        if self.deepspeed:  # refuse a config that would upcast the packed codes, before any engine exists
            from qat.trainers.deepspeed_utils import check_deepspeed_config

            check_deepspeed_config(self.hf_deepspeed_config.config, world_size=self.world_size)

    def check_exportable(self) -> None:
        """Refuse, when the arguments are read, a recipe whose trained model the exporter cannot write:
        outside adapters leave the packed base and go out in peft's LoRA format, which holds LoRA only,
        and sharded runs (FSDP / ZeRO-3) export inside adapters only."""
        if self.adapter == "none" or self.adapter_placement != "outside":
            return
        if self.adapter != "lora":
            raise ValueError(f"adapter {self.adapter!r} with adapter_placement 'outside' cannot be exported (outside "
                             "adapters are saved in peft's format, which holds LoRA only): use adapter_placement "
                             "'inside' or adapter 'lora'")
        if self.fsdp or self.deepspeed:
            raise ValueError("adapter_placement 'outside' cannot be exported from a sharded run (fsdp / deepspeed "
                             "export inside adapters only): use adapter_placement 'inside', or train with DDP")

    def quant_config(self) -> QuantConfig:
        return QuantConfig(**{name: _copied(getattr(self, key)) for name, key in QUANT_KEYS.items()})

    def adapter_config(self) -> AdapterConfig | None:
        if self.adapter == "none":
            return None
        return AdapterConfig(**{name: _copied(getattr(self, key)) for name, key in ADAPTER_KEYS.items()})

    def qat_dict(self) -> dict:
        """The qat fields only (what a recipe file adds to TrainingArguments)."""
        base = {f.name for f in dataclasses.fields(TrainingArguments)}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in base}


def check_data_parallel(args: TrainingArguments) -> None:
    """Refuse a multi-process launch that would not be data parallel, before any work.

    torchrun on a machine without GPUs starts the processes and the process group, but unless
    ``use_cpu`` is set accelerate runs the job as distributed type NO: no gradient all-reduce, each rank
    trains its share of the data alone and rank 0 saves a half-trained model.
    """
    import os

    from accelerate.utils import DistributedType

    started = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch for each process
    # `accelerate launch --cpu --num_processes N` (N > 1) starts ONE process with MASTER_ADDR / MASTER_PORT
    # set and no WORLD_SIZE (its simple launcher); mpirun (a hostfile) sets its own size variables.
    mpi = any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"))
    if ("WORLD_SIZE" not in os.environ and "MASTER_PORT" in os.environ and not mpi
            and os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1", "yes")):
        raise ValueError("accelerate launch --cpu started one process although more were asked for (it does not "
                         "run several CPU processes): use torchrun --nproc_per_node N ... --use_cpu true for data "
                         "parallel training on CPUs, or drop --num_processes")
    if started > 1 and args.distributed_state.distributed_type == DistributedType.NO:
        raise ValueError(f"{started} processes were started but accelerate runs this job without data parallelism "
                         "(no GPU and use_cpu is false), so each would train alone: pass --use_cpu true "
                         "(TrainingArguments(use_cpu=True)) to train data parallel on CPUs")


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
