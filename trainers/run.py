"""The main job, one direction (DESIGN section 2): recipe -> model -> quantize -> adapters -> train ->
export -> verify by reloading -> compare float / post-training / QAT on held-out data.

``qat train`` and ``accelerate launch scripts/train.py`` both call :func:`main`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch

import qat
from qat import safety
from qat.export import _is_export_file
from qat.safety import LOCK_FILE, OutputLock, check_model_folder
from qat.act_quant import compressed_tensors_steps, init_static_steps
from qat.matryoshka import BASE_BITS
from qat.trainers.arguments import QATArguments

MODEL_CLASSES = {"causal_lm": "AutoModelForCausalLM", "seq_cls": "AutoModelForSequenceClassification",
                 "embedding": "AutoModel"}


# ---------------------------------------------------------------------------------------- set-up
def check_paths(args: QATArguments) -> Path:
    """Refuse, before loading anything, to overwrite a run or an export the user already has."""
    path = args.model_name_or_path
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    # Offline, or written as a path: it must exist here. Online, anything else may be a Hub id.
    if not Path(path).exists() and (offline or path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise ValueError(f"model {path!r} does not exist: pass a local model folder"
                         + ("" if offline else " or a Hub id (owner/name)"))
    check_model_folder(path)
    out = Path(args.output_dir)
    export = Path(args.export_dir) if args.export_dir else out / "export"
    resuming = bool(args.resume_from_checkpoint)
    held = OutputLock.holder(out) if out.is_dir() else None
    if held:
        raise ValueError(f"output_dir {out} is in use by another qat run (pid {held.get('pid', '?')}, started "
                         f"{held.get('started', '?')}): wait for it to finish or choose another --output_dir")
    if export.resolve() == out.resolve() or export.resolve() in out.resolve().parents:
        raise ValueError(f"export_dir {export} is output_dir {out} or holds it: the export replaces its folder "
                         "whole and would delete the run's checkpoints; use another --export_dir (default "
                         "<output_dir>/export)")
    busy = out.exists() and any(p.name != LOCK_FILE for p in out.iterdir())
    if busy and not resuming and not args.overwrite_output:
        raise ValueError(f"output_dir {out} already holds a run: pass --resume_from_checkpoint true to continue "
                         "it, --overwrite_output true to replace it, or another --run_name / --output_dir")
    # A resumed run replaces its own earlier export (written beside it first, swapped in at the end).
    if export.exists() and any(export.iterdir()) and not (args.overwrite_output or resuming):
        raise ValueError(f"export_dir {export} already holds an export: pass --overwrite_output true to replace "
                         "it (the new one is written beside it first) or another --export_dir")
    targets = [export] + ([adapter_dir_for(export)] if outside_adapter(args) else [])
    try:
        for target in targets:  # replaced only if it is an earlier export, and never the model itself
            safety.check_replaceable(target, inputs=(path,), is_export_file=_is_export_file)
    except FileExistsError as err:
        raise ValueError(str(err)) from None
    return export


def check_max_length(args: QATArguments) -> None:
    """--max_length within the model's positions (read from config.json, before the model loads)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not read the config of {args.model_name_or_path}: {str(err).splitlines()[0]}") \
            from None
    positions = [getattr(config, k, None) for k in ("max_position_embeddings", "n_positions", "max_seq_len")]
    limit = next((p for p in positions if isinstance(p, int) and p > 0), None)
    if limit is not None and args.max_length > limit:
        raise ValueError(f"max_length {args.max_length} is beyond the {limit} positions "
                         f"{args.model_name_or_path} was built for: use --max_length {limit} or less")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:  # causal LMs often ship without one; padding is masked out anyway
        tok.pad_token = tok.eos_token
    return tok


@contextlib.contextmanager
def materialized_loading(args: QATArguments):
    """``from_pretrained`` builds the model inside ``deepspeed.zero.Init`` whenever a ZeRO-3 config is
    live, and ``QATArguments(deepspeed=...)`` makes it live for the whole process: the float weights
    would be partitioned at load and ``quantize_model`` would read empty partitions (on CPU the
    Init even fails on its batch check). qat quantizes the whole model first and lets the engine
    partition the packed one (``zero3_init_flag: false`` in deepspeed_zero3.yaml says the same)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    if not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(args.hf_deepspeed_config)


def load_model(path: str, task: str, num_labels: int | None = None, **kwargs):
    import transformers

    kwargs.setdefault("trust_remote_code", False)  # a model's own code runs only when the recipe says so
    cls = getattr(transformers, MODEL_CLASSES[task])
    if task == "seq_cls" and num_labels:
        kwargs["num_labels"] = num_labels
    return cls.from_pretrained(path, dtype=torch.float32, **kwargs)


def adapter_dir_for(export_dir: Path) -> Path:
    """Where outside-placement LoRA goes, in peft's format: beside the packed base."""
    return export_dir.with_name(export_dir.name + "-adapter")


def outside_adapter(args) -> bool:
    """The recipe puts adapters outside the quantizer: they export beside the base, in peft's format."""
    return args.adapter != "none" and args.adapter_placement == "outside"


def reload_export(args, export_dir: Path):
    """The export as a user loads it: transformers (+ PeftModel for an outside adapter)."""
    adapter = adapter_dir_for(export_dir)
    if args.export_format == "gguf":  # transformers dequantizes the GGUF blocks at load
        import transformers
        from qat.gguf_export import GGUF_FILE

        return transformers.AutoModelForCausalLM.from_pretrained(export_dir, gguf_file=GGUF_FILE,
                                                                 dtype=torch.float32).eval()
    if not outside_adapter(args):
        from qat.online_hadamard import apply_export_transforms

        with materialized_loading(args):  # + the online transforms, which transformers does not apply
            return apply_export_transforms(load_model(str(export_dir), args.task), export_dir).eval()
    from peft import PeftModel

    # The plain load a user does: the base's config.json asks for dense layers (peft wraps nn.Linear).
    with materialized_loading(args):
        base = load_model(str(export_dir), args.task)
    return PeftModel.from_pretrained(base, str(adapter)).eval()


def calibration_inputs(model, dataset, layer_names: list[str], n: int) -> dict[str, torch.Tensor]:
    """Layer inputs X [tokens, in] of the float model on n training examples, one at a time (no padding)."""
    from qat.adapters import collect_inputs

    keep = ("input_ids", "attention_mask", "token_type_ids")
    batches = [{k: torch.tensor([ex[k]]) for k in keep if k in ex} for ex in dataset.select(range(min(n, len(dataset))))]
    with torch.no_grad():
        return collect_inputs(model, layer_names, batches)


def calibrate(args: QATArguments, model, train_dataset) -> dict:
    """What error-aware adapter inits need from the float model, before it is quantized:
    float weights W and calibration inputs X per layer to be quantized (empty for zero init)."""
    adapter_cfg = args.adapter_config()
    if adapter_cfg is None or adapter_cfg.init == "zero":
        return {}
    quant_cfg = args.quant_config()
    names = [n for n, _ in qat.surgery.linear_layers(model) if quant_cfg.selects(n)]
    float_weights = {n: model.get_submodule(n).weight.detach().float().clone() for n in names}
    calib = calibration_inputs(model.eval(), train_dataset, names, args.calibration_samples)
    return {"float_weights": float_weights, "calib": calib}


def rotate(args: QATArguments, model):
    """``rotate: hadamard``: fold the rotations into the float model (same function), in place;
    ``online_hadamard: b``: the down_proj inputs' online block Hadamard (weights folded, same function)."""
    if args.rotate:
        from qat.rotation import rotate_model

        rotate_model(model, seed=args.seed)  # ValueError (one sentence) for a model it cannot rotate
    if args.online_hadamard:
        from qat.online_hadamard import TARGET_SUFFIX, add_online_hadamard

        cfg = args.quant_config()
        targets = ((TARGET_SUFFIX,) if args.online_hadamard_targets == "down_proj"
                   else tuple(n for n, _ in qat.surgery.linear_layers(model) if cfg.selects(n)))
        add_online_hadamard(model, args.online_hadamard, targets)  # ValueError (one sentence) when it cannot
    return model


def uses_gptq(args: QATArguments) -> bool:
    cfg = args.quant_config()
    return cfg.init == "gptq" or any(o.get("init") == "gptq" for o in cfg.overrides.values())


def calibration_batches(dataset, n: int, tokenizer=None, batch_size: int = 16) -> list[dict]:
    """The first n training examples as model input batches (padded by ``tokenizer`` when given,
    else one example per batch): what GPTQ and the block-wise stage calibrate on."""
    if dataset is None:
        raise ValueError("quant_init gptq and blockwise_steps calibrate on training examples: give a dataset")
    keep = ("input_ids", "attention_mask", "token_type_ids")
    rows = [{k: ex[k] for k in keep if k in ex} for ex in dataset.select(range(min(n, len(dataset))))]
    if tokenizer is None:
        return [{k: torch.tensor([v]) for k, v in row.items()} for row in rows]
    return [dict(tokenizer.pad(rows[i:i + batch_size], return_tensors="pt")) for i in range(0, len(rows), batch_size)]


def quantize(args: QATArguments, model, calibration: list[dict] | None = None):
    """Freeze everything, then swap the linear layers for QuantLinear (steps trainable); in place.
    ``calibration``: input batches for quant_init gptq (see :func:`calibration_batches`). Then the
    recipe's train_mode (full_weight masters start from the float weights, or with full_weight_start
    'quantized' from the init's dequantized weights W0) and, when asked, trainable biases / norms."""
    from qat.serving import train_for_target
    from qat.train_modes import apply_train_mode, float_weights, unfreeze_biases_and_norms

    model.requires_grad_(False)  # only steps and adapters train (and what train_mode adds)
    from_float = args.train_mode == "full_weight" and args.full_weight_start == "float"
    weights = float_weights(model, args.quant_config()) if from_float else None  # None: masters start at W0
    qat.quantize_model(model, args.quant_config(), calibration=calibration)
    train_for_target(model, args.serving, args.export_format)  # steps rounded as the runtime stores them
    if args.train_mode != "fake_quant":
        apply_train_mode(model, args.train_mode, weights)
    unfreeze_biases_and_norms(model, args.train_biases, args.train_norms)
    return model


def attach_adapters(args: QATArguments, model, calibration: dict) -> None:
    from qat.adapters import attach

    adapter_cfg = args.adapter_config()
    if adapter_cfg is not None:
        attach(model, adapter_cfg, **calibration)


def prepare_model(args: QATArguments, model, train_dataset):
    """Quantize in place and attach adapters (with calibration for error-aware inits); returns the model."""
    rotate(args, model)
    calibration = calibrate(args, model, train_dataset)
    batches = calibration_batches(train_dataset, args.calibration_samples) if uses_gptq(args) else None
    quantize(args, model, batches)
    attach_adapters(args, model, calibration)
    return model


def blockwise_stage(args, model, float_model, train_ds, tokenizer, eval_ds, texts, collate, float_emb) -> dict:
    """Block-wise reconstruction (trainers/blockwise.py) on the calibration examples; returns the
    model's evaluation row after it."""
    from qat.trainers.blockwise import reconstruct_blocks

    batches = calibration_batches(train_ds, args.calibration_samples, tokenizer)
    reconstruct_blocks(model, float_model, batches, args.blockwise_steps, lr=args.blockwise_lr,
                       step_lr=args.blockwise_step_lr, target=args.blockwise_target,
                       batches_per_step=args.blockwise_batches, seed=args.seed, log=print)
    return evaluate(args, model, tokenizer, eval_ds, texts, collate, float_emb)


# ---------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def lm_loss(model, dataset, collate, batch_size: int = 8) -> float:
    """Mean next-token cross-entropy over every counted token of ``dataset``."""
    total, count = 0.0, 0
    model.eval()
    for i in range(0, len(dataset), batch_size):
        batch = collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total, count = total + loss.item(), count + int((labels != -100).sum())
    return total / max(count, 1)


def evaluate(args, model, tokenizer, eval_dataset, texts, collate, reference=None) -> dict:
    """Embedding: cosine / nearest-neighbour agreement with the float model; LMs: loss and perplexity."""
    model.eval()
    if args.task == "embedding":
        from qat.evaluation import embedding_agreement, sentence_embeddings

        emb = sentence_embeddings(model, tokenizer, texts, max_length=args.max_length)
        return {"embeddings": emb} if reference is None else embedding_agreement(reference, emb)
    if args.task == "causal_lm":
        loss = lm_loss(model, eval_dataset, collate)
        return {"loss": loss, "perplexity": math.exp(min(loss, 50))}
    return {}


def export_max_diff(args, model, reloaded, batch: dict) -> float:
    """Max |diff| between the trained model's outputs and its reloaded export's on ``batch``."""
    model.eval()
    with torch.no_grad():
        a, b = model(**batch), reloaded(**batch)
    key = "last_hidden_state" if args.task == "embedding" else "logits"
    return float((getattr(a, key).float() - getattr(b, key).float()).abs().max())


def export(args, model, tokenizer, export_dir: Path, sharded: bool = False) -> None:
    """Packed export; ``sharded`` (FSDP2 / ZeRO-3): every rank gathers layer by layer, rank 0 writes."""
    from qat.adapters import export_with_peft

    replace = args.overwrite_output or bool(args.resume_from_checkpoint)  # check_paths allowed it
    kw = dict(tokenizer=tokenizer, source_dir=args.model_name_or_path, overwrite=replace,
              recipe=args.qat_dict(), base_model=args.model_name_or_path)
    if args.export_format == "gguf":
        from qat.gguf_export import export_gguf

        if sharded:
            raise ValueError("GGUF export of sharded runs is not written yet: train data-parallel or on one device")
        export_gguf(model, export_dir, tokenizer=tokenizer, source_dir=args.model_name_or_path, overwrite=replace,
                    recipe=args.qat_dict())
        return
    if sharded:
        from qat.trainers.sharded_export import export_sharded

        if outside_adapter(args):
            raise ValueError("sharded runs export inside adapters only (outside LoRA: train with DDP)")
        export_sharded(model, export_dir, **kw)
        return
    if outside_adapter(args):  # base packed + adapter in peft's format (PeftModel.from_pretrained on top)
        export_with_peft(model, export_dir, adapter_dir_for(export_dir), **kw)
    else:
        qat.export_model(model, export_dir, **kw)


def leave_process_group(args) -> bool:
    """After a data-parallel run every rank holds the whole trained model: end the process group so
    that rank 0 exports and reloads on its own (compressed-tensors' loader would otherwise expect
    every rank in its collectives). Returns whether this process goes on to export."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return args.should_save


# ---------------------------------------------------------------------------------------- reporting
def results_table(rows: dict[str, dict]) -> str:
    keys = sorted({k for r in rows.values() for k in r})
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.4f}" if k in r else "-" for k in keys) + " |")
    return "\n".join(lines)


def plot_losses(log_history: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*points), marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------- run safety
@contextlib.contextmanager
def run_lock(args: QATArguments):
    """The output folder is this run's alone while it lives (the main process holds the lock); a run
    that fails before writing anything leaves no folder behind."""
    out = Path(args.output_dir)
    if args.process_index != 0:
        yield
        return
    created = not out.exists()
    lock = OutputLock(out).acquire()
    try:
        yield
    finally:
        lock.release()
        if created and {p.name for p in out.iterdir()} <= {LOCK_FILE}:
            shutil.rmtree(out, ignore_errors=True)


def clean_partial_checkpoints(out: Path) -> None:
    """Hidden ``.checkpoint-N.partial`` folders are saves a killed run never finished (the lock says
    no live run is writing them): remove them, saying so."""
    for folder in sorted(out.glob(".checkpoint-*.partial")) if out.is_dir() else []:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"qat: removed {folder}, an unfinished checkpoint save of an earlier run", file=sys.stderr)


def resolve_resume(args: QATArguments) -> str | None:
    """The checkpoint to resume from: ``true`` takes the newest *complete* one (saying which newer ones
    were skipped and why); a path must itself be complete."""
    from qat.trainers.checkpoint import checkpoint_problem, newest_complete_checkpoint

    asked = args.resume_from_checkpoint
    if not asked or str(asked).lower() == "false":
        return None
    if str(asked).lower() != "true":
        problem = checkpoint_problem(asked) if Path(asked).is_dir() else "it does not exist"
        if problem:
            raise ValueError(f"cannot resume from {asked}: {problem}; pass --resume_from_checkpoint true to take "
                             "the newest complete checkpoint")
        return str(asked)
    found, skipped = newest_complete_checkpoint(args.output_dir)
    for name, why in skipped:
        print(f"qat: skipping {name} for resume: {why}", file=sys.stderr)
    if found is None:
        raise ValueError(f"no complete checkpoint-* in {args.output_dir} to resume from"
                         + (f" ({len(skipped)} incomplete)" if skipped else "")
                         + ": drop --resume_from_checkpoint to start over (with --overwrite_output true)")
    print(f"qat: resuming from {found}", file=sys.stderr)
    return str(found)


# A trained model counts as worse than post-training quantization when it lost more than this share of
# the post-training gap to the float model, and more than ABS_TOLERANCE (cosine or nats): a few steps of
# noise on a near-lossless format must not fail a run.
WORSE_SHARE, ABS_TOLERANCE = 0.1, 1e-3


def worse_than_post_training(rows: dict, qat: str = "qat", ptq: str = "post-training") -> str | None:
    """'cosine 0.41 vs 0.96 post-training' when row ``qat`` is clearly worse than row ``ptq``, else None."""
    for metric, higher_better in (("cosine", True), ("loss", False)):
        if metric not in rows.get(qat, {}) or metric not in rows.get(ptq, {}):
            continue
        q, p, f = rows[qat][metric], rows[ptq][metric], rows["float"].get(metric)
        deficit = (p - q) if higher_better else (q - p)
        gap = abs(f - p) if f is not None else 0.0
        if not math.isfinite(q) or (deficit > ABS_TOLERANCE and deficit > WORSE_SHARE * gap):
            return f"{metric} {q:.4f} vs {p:.4f} after post-training quantization"
    return None


# ---------------------------------------------------------------------------------------- the job
def run(args: QATArguments) -> dict:
    export_dir = check_paths(args)
    check_max_length(args)
    # Every rank checks the paths before the main one takes the lock and writes into output_dir:
    # otherwise another rank could find the folder locked (or busy) by its own run and refuse it.
    if args.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    with run_lock(args):
        clean_partial_checkpoints(Path(args.output_dir))
        metrics = _run(args, export_dir)
    check_not_worse(args, metrics, export_dir)
    return metrics


def check_not_worse(args: QATArguments, metrics: dict, export_dir) -> None:
    """Refuse (exit non-zero) a trained model worse than its post-training start on the report's split.

    A Matryoshka run is judged on what it trains: the weighted mean over its widths (its rows
    "qat, weighted widths" / "post-training, weighted widths"), so it may trade its int8 model for its
    slices but not make the whole worse."""
    keys = (f"qat{WEIGHTED}", f"post-training{WEIGHTED}") if args.matryoshka_widths else ("qat", "post-training")
    worse = worse_than_post_training(metrics.get("rows", {}), *keys)
    what = "the weighted mean of the Matryoshka widths" if args.matryoshka_widths else "the trained model"
    if worse and not args.allow_worse_than_ptq:
        raise ValueError(f"{what} is worse than post-training quantization ({worse}): training "
                         f"diverged or over-fitted, so do not use the export at {export_dir}; lower learning_rate / "
                         "step_learning_rate, or pass --allow_worse_than_ptq true to accept it")


WEIGHTED = ", weighted widths"  # the suffix of a Matryoshka run's weighted-mean rows


def width_rows(args: QATArguments, model, label: str, measure, measured: dict | None = None) -> dict:
    """A Matryoshka run's rows: ``measure()`` with the model at each width ("qat int4", ...) and their
    mean weighted by matryoshka_weights ("qat, weighted widths"): the objective it trains and keep_best
    guards. ``measured`` {width: row} holds widths already measured on this very model (not measured
    again). Perplexity there is exp(weighted mean loss), not a mean of perplexities."""
    from qat.matryoshka import use_width, width_weights

    if not args.matryoshka_widths:
        return {}
    widths = list(args.matryoshka_widths)
    weights = width_weights(widths, args.matryoshka_weights)
    rows = {}
    for bits in widths:
        if bits in (measured or {}):
            rows[f"{label} int{bits}"] = measured[bits]
            continue
        with use_width(model, bits):
            rows[f"{label} int{bits}"] = measure()
    per = [rows[f"{label} int{b}"] for b in widths]
    mean = {k: sum(w * r[k] for w, r in zip(weights, per)) / sum(weights) for k in per[0] if k != "perplexity"}
    if "loss" in mean:
        mean["perplexity"] = math.exp(min(mean["loss"], 50))
    rows[f"{label}{WEIGHTED}"] = mean
    return rows


def _run(args: QATArguments, export_dir: Path) -> dict:
    from qat.trainers.data import build_datasets, collator
    from qat.trainers.trainer import QATTrainer

    from transformers import set_seed

    set_seed(args.seed)  # adapters are attached (random LoRA A) before the Trainer would seed
    tokenizer = load_tokenizer(args.model_name_or_path, args.trust_remote_code)
    train_ds, eval_ds, texts = build_datasets(args, tokenizer)  # bad columns fail before the model loads
    num_labels = len(set(train_ds["labels"])) if args.task == "seq_cls" else None
    with materialized_loading(args):
        model = load_model(args.model_name_or_path, args.task, num_labels, trust_remote_code=args.trust_remote_code)
    rotate(args, model)  # before the teacher copy and the float row: the same function, rotated
    teacher = copy.deepcopy(model).eval() if args.distill != "none" else None
    float_model = teacher if teacher is not None or not args.blockwise_steps else copy.deepcopy(model).eval()
    collate = collator(tokenizer, args.task)

    reference = evaluate(args, model, tokenizer, eval_ds, texts, collate)
    float_emb = reference.pop("embeddings", None)
    rows = {"float": reference}
    if float_emb is not None:
        from qat.evaluation import embedding_agreement

        rows["float"] = embedding_agreement(float_emb, float_emb)
    # prepare_model's steps, with the post-training row measured between quantizing and the adapters
    calibration = calibrate(args, model, train_ds)
    batches = calibration_batches(train_ds, args.calibration_samples, tokenizer) if uses_gptq(args) else None
    quantize(args, model, batches)
    init_static_steps(model, {k: v.to(model.device) for k, v in collate(  # from training data, not held-out
        [train_ds[i] for i in range(min(args.per_device_train_batch_size, len(train_ds)))]).items() if k != "labels"})
    rows["post-training"] = evaluate(args, model, tokenizer, eval_ds, texts, collate, float_emb)
    rows.update(width_rows(args, model, "post-training",  # its int8 model is the row just measured
                           lambda: evaluate(args, model, tokenizer, eval_ds, texts, collate, float_emb),
                           measured={BASE_BITS: rows["post-training"]}))
    attach_adapters(args, model, calibration)
    if args.blockwise_steps:
        rows["blockwise"] = blockwise_stage(args, model, float_model, train_ds, tokenizer, eval_ds, texts, collate,
                                            float_emb)

    trainer = QATTrainer(model=model, args=args, teacher=teacher, train_dataset=train_ds,
                         eval_dataset=eval_ds if args.eval_strategy != "no" else None,
                         data_collator=collate, processing_class=tokenizer, dev_dataset=eval_ds)
    result = trainer.train(resume_from_checkpoint=resolve_resume(args))
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if sharded:  # every rank takes part in the gather; the sharded model cannot run after the group ends
        export(args, model, tokenizer, export_dir, sharded=True)
    if not leave_process_group(args):
        return {}
    if not sharded:
        export(args, model, tokenizer, export_dir)
    # The QAT row is measured on the export as reloaded by transformers (what users get); a sharded
    # model cannot run once the process group has ended, so only its reload can be measured.
    reloaded = reload_export(args, export_dir) if args.verify_export or sharded else None
    max_diff = None
    if reloaded is not None and not sharded:
        batch = {k: v.to(model.device) for k, v in
                 collate([eval_ds[i] for i in range(min(4, len(eval_ds)))]).items() if k != "labels"}
        with compressed_tensors_steps(model):  # transformers' per-token int8 step convention, if any
            max_diff = export_max_diff(args, model, reloaded, batch)
        if max_diff > 1e-3:  # a wrong export must not look like one: it goes, the checkpoints stay
            shutil.rmtree(export_dir, ignore_errors=True)
            raise ValueError(f"the export did not reproduce the trained model (max |diff| {max_diff:.3g}) and was "
                             f"removed from {export_dir}; the training checkpoints in {args.output_dir} are kept")
    rows["qat"] = evaluate(args, reloaded if reloaded is not None else model, tokenizer, eval_ds, texts,
                           collate, float_emb)
    if not sharded:  # the slices of the trained model (each one's export reloads equal to it: test_matryoshka)
        rows.update(width_rows(args, model, "qat",
                               lambda: evaluate(args, model, tokenizer, eval_ds, texts, collate, float_emb)))
    return write_report(args, trainer, result, rows, export_dir, max_diff)


def write_report(args, trainer, result, rows, export_dir, max_diff) -> dict:
    out = Path(args.output_dir)
    keep_best = trainer.keep_best.summary() if getattr(trainer, "keep_best", None) is not None else None
    metrics = {"rows": rows, "export_dir": str(export_dir), "export_max_abs_diff": max_diff, "keep_best": keep_best,
               "train_runtime_s": result.metrics.get("train_runtime"), "train_loss": result.training_loss,
               "steps": trainer.state.global_step, "recipe": args.qat_dict()}
    if "cosine" in rows.get("qat", {}):
        ptq, q = rows["post-training"]["cosine"], rows["qat"]["cosine"]
        metrics["recovered"] = (q - ptq) / (1 - ptq) if ptq < 1 else None
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    plotted = plot_losses(trainer.state.log_history, out / "loss.png")
    print("\n" + results_table(rows))
    if metrics.get("recovered") is not None:
        print(f"\nQAT recovers {100 * metrics['recovered']:.1f}% of the post-training cosine gap to the float model")
    if keep_best is not None:
        start = keep_best["history"][0]
        print(f"keep_best: exported the state of step {keep_best['best_step']} (dev score {keep_best['best_dev_score']:.5f}; "
              f"step {start['step']}: {start['dev_score']:.5f}; lower is better)")
    print(f"export: {export_dir} (reloaded with transformers, max |diff| {max_diff})")
    print(f"metrics: {out / 'metrics.json'}" + (f", loss plot: {out / 'loss.png'}" if plotted else ""))
    return metrics


def main(argv: list[str] | None = None) -> int:
    from qat.trainers.recipes import build_arguments, help_text

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(help_text())
        return 0
    from qat.trainers.trainer import NonFiniteLossError

    try:
        args = build_arguments(argv)
        run(args)
    except (ValueError, NonFiniteLossError) as err:
        raise SystemExit(f"qat train: {err}") from None
    except OSError as err:  # disk full, read-only folder, ...: checkpoints are whole or absent
        raise SystemExit(f"qat train: {err}; the checkpoints written so far are whole: fix that, then resume "
                         "with --resume_from_checkpoint true") from None
    return 0
