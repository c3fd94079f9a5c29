"""Activation quantization and Hadamard rotation on a small causal LM: held-out perplexity of

    float; W8A8 / W4A8 / W4A4 RTN; the same after qat.rotation.rotate_model (and, with --online_hadamard B,
    after the rotation plus an online B-block Hadamard on each down_proj input, qat.online_hadamard);
    QAT (short) in each of those settings,

every quantized row exported as compressed-tensors and reloaded by transformers (whose per-token step
is absmax / 127.5, compressed-tensors' convention; qat trains with vLLM's absmax / 127), its online
transforms applied by compressed-tensors' apply_transform_config (transformers does not apply them).
``--a4_breakdown`` adds where the W4A4 loss comes from: W4A4 RTN with one kind of linear's inputs held at
8 bits, and with only that kind at 4 bits (in memory, fake-quantized: a mixed-width export is not a format).

The model is a folder laid out as causal_lm.py / testbed.py cache it (model, tokenizer, train.jsonl,
heldout.jsonl, pretrain_log.json); the held-out split is tokenised and packed by qat.trainers.data as
the job does, and every row is measured on the same blocks.

    HF_HUB_OFFLINE=1 python scripts/benchmarks/act_rotation.py --model_dir outputs/testbed/causal_lm_<hash> \
        --json docs/benchmarks/act_rotation.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # testbed.py, a sibling
REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "scripts" / "recipes" / "w4a8.yaml"
# (label, weight bits, weight group (None: per channel), activation bits)
FORMATS = [("W8A8", 8, None, 8), ("W4A8", 4, 32, 8), ("W4A4", 4, 32, 4)]


def job_argv(model_dir: Path, block: int, out: Path, rotate: bool, steps: int, batch: int, eval_blocks: int,
             fmt: tuple = FORMATS[1], dev: Path | None = None, extra: list[str] = (), online: int = 0) -> list[str]:
    """The QAT job's arguments; ``dev`` is its keep_best split (testbed.dev_file), the held-out file when
    unset (only to read the scored blocks); ``extra`` (``--KEY VALUE ...``) overrides the recipe last."""
    _, bits, group, act_bits = fmt  # the W4A8 recipe, with this format's widths
    argv = ["--config", str(RECIPE), "--bits", str(bits), "--group_size", str(group or -1),
            "--act_bits", str(act_bits), "--model_name_or_path", str(model_dir),
            "--dataset", str(model_dir / "train.jsonl"), "--eval_dataset", str(dev or model_dir / "heldout.jsonl"),
            "--max_eval_samples", str(eval_blocks), "--max_length", str(block), "--max_steps", str(steps),
            "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", "1",
            "--warmup_steps", str(max(steps // 10, 1)), "--eval_strategy", "no", "--save_strategy", "no",
            "--logging_steps", str(max(steps // 10, 1)), "--disable_tqdm", "true", "--seed", "0",
            "--output_dir", str(out), "--overwrite_output", "true", "--report_to", "none"]
    if not rotate:
        argv += ["--rotate", "null"]
    if online:
        argv += ["--online_hadamard", str(online)]
    return argv + list(extra)


def setting(rotate: bool, online: int = 0) -> str:
    """A row's rotation setting, as the table and the work folders name it."""
    return (" + rotation" if rotate else "") + (f" + online R4 (b={online})" if online else "")


def folder_suffix(rotate: bool, online: int = 0) -> str:
    return ("_rot" if rotate else "") + (f"_r4b{online}" if online else "")


def reload(export_dir):
    """The export as transformers loads it, plus its online transforms (compressed-tensors applies them)."""
    import transformers

    from qat.online_hadamard import apply_export_transforms

    return apply_export_transforms(transformers.AutoModelForCausalLM.from_pretrained(export_dir), export_dir).eval()


def perplexity(model, eval_ds, collate) -> float:
    from qat.trainers.run import lm_loss

    return math.exp(lm_loss(model, eval_ds, collate))


def rtn_model(model_dir: Path, rotate: bool, bits: int, group, act_bits: int, online: int = 0):
    """The float model (rotated first when asked, then given the online down_proj Hadamard when ``online``)
    quantized round-to-nearest in memory."""
    import qat
    from qat.online_hadamard import add_online_hadamard
    from qat.rotation import rotate_model
    from qat.trainers.run import load_model

    model = load_model(str(model_dir), "causal_lm").eval()
    if rotate:
        rotate_model(model)
    if online:
        add_online_hadamard(model, online)
    qat.quantize_model(model, qat.QuantConfig(bits=bits, group_size=group, init="rtn", act_bits=act_bits))
    return model


def ptq_row(model_dir: Path, work: Path, label: str, bits: int, group, act_bits: int, rotate: bool,
            eval_ds, collate, online: int = 0) -> dict:
    import qat

    t0 = time.time()
    model = rtn_model(model_dir, rotate, bits, group, act_bits, online)
    out = work / f"{label}{folder_suffix(rotate, online)}"
    qat.export_model(model, out, overwrite=True, source_dir=model_dir)
    reloaded = reload(out)
    return {"perplexity": perplexity(reloaded, eval_ds, collate), "wall_s": time.time() - t0}


LINEAR_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def w4a4_rtn_perplexity(model_dir: Path, rotate: bool, a8_kinds, eval_ds, collate) -> float:
    """W4 g32 RTN with 4-bit per-token activations, in memory, except the inputs of the linears named in
    ``a8_kinds`` (``q_proj``, ..., ``down_proj``), which keep 8 bits (per-token absmax / 127)."""
    model = rtn_model(model_dir, rotate, 4, 32, 4)
    for name, module in model.named_modules():
        if getattr(module, "act_quant", None) is not None and name.rsplit(".", 1)[-1] in a8_kinds:
            module.act_quant.bits = 8
    return perplexity(model, eval_ds, collate)


def a4_breakdown_rows(model_dir: Path, rotate: bool, eval_ds, collate) -> dict:
    """W4A4 RTN with each linear kind's inputs at 8 bits ("KIND at A8") and with only that kind at 4 bits
    ("only KIND at A4"): how much of the A4 loss each kind's inputs carry."""
    rows = {"all at A4": w4a4_rtn_perplexity(model_dir, rotate, (), eval_ds, collate)}
    for kind in ("o_proj", "down_proj"):  # the inputs the residual rotation misses (o_proj: rotated per head only)
        rows[f"{kind} at A8"] = w4a4_rtn_perplexity(model_dir, rotate, (kind,), eval_ds, collate)
        others = tuple(k for k in LINEAR_KINDS if k != kind)
        rows[f"only {kind} at A4"] = w4a4_rtn_perplexity(model_dir, rotate, others, eval_ds, collate)
    return rows


def qat_row(model_dir: Path, block: int, work: Path, rotate: bool, steps: int, batch: int, eval_blocks: int,
            eval_ds, collate, fmt: tuple = FORMATS[1], dev: Path | None = None, extra: list[str] = (),
            online: int = 0) -> dict:
    from qat.trainers.recipes import build_arguments
    from qat.trainers.run import run

    args = build_arguments(job_argv(model_dir, block, work / f"qat_{fmt[0].lower()}{folder_suffix(rotate, online)}",
                                    rotate, steps, batch, eval_blocks, fmt, dev, extra, online))
    t0 = time.time()
    metrics = run(args)
    wall = time.time() - t0
    # Measured like every other row: the export reloaded by transformers, on the same held-out blocks.
    reloaded = reload(metrics["export_dir"])
    return {"perplexity": perplexity(reloaded, eval_ds, collate), "wall_s": wall,
            "job_rows": {k: v.get("perplexity") for k, v in metrics["rows"].items()},
            "train_s": metrics["train_runtime_s"], "export_max_abs_diff": metrics["export_max_abs_diff"],
            "steps": metrics["steps"],
            # the dev score keep_best chose by (the job's loss per token on testbed.dev_file): what tuning reads
            "dev_score": (metrics["keep_best"] or {}).get("best_dev_score")}


def main() -> int:
    import datasets
    import transformers

    from qat.trainers.data import collator
    from qat.trainers.recipes import build_arguments
    from qat.trainers.run import load_model, load_tokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_dir", required=True, help="a pretrained folder from causal_lm.py / testbed.py")
    p.add_argument("--work_dir", default=str(REPO / "outputs" / "act_rotation"))
    p.add_argument("--eval_blocks", type=int, default=64, help="held-out blocks evaluated")
    p.add_argument("--qat_steps", type=int, default=60)
    p.add_argument("--qat_batch", type=int, default=8)
    p.add_argument("--skip_qat", action="store_true")
    p.add_argument("--skip_ptq", action="store_true", help="only the float and QAT rows")
    p.add_argument("--a4_breakdown", action="store_true", help="W4A4 RTN with one linear kind's inputs at "
                   "8 bits, or only that kind at 4 bits (in memory): which inputs carry the A4 loss")
    p.add_argument("--qat_rotated_only", action="store_true", help="only the rotated QAT rows")
    p.add_argument("--online_hadamard", type=int, default=0, help="also the rows with the rotation plus an online "
                   "Hadamard of this block size on each down_proj input (qat.online_hadamard); 0: none")
    p.add_argument("--qat_formats", default="W4A8", help="comma-separated formats trained with QAT: "
                   + ", ".join(f[0] for f in FORMATS))
    p.add_argument("--qat_args", default="", help="recipe overrides for every QAT job, as on the command "
                   "line of qat train: '--train_mode full_weight --adapter none --learning_rate 1e-4'")
    p.add_argument("--json", default=None)
    ns = p.parse_args()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    t_start = time.time()
    model_dir, work = Path(ns.model_dir), Path(ns.work_dir)
    log = json.loads((model_dir / "pretrain_log.json").read_text())
    block = log["settings"]["block"]
    tokenizer = load_tokenizer(str(model_dir))
    args = build_arguments(job_argv(model_dir, block, work / "unused", True, 1, 1, ns.eval_blocks))
    from qat.trainers.data import load_raw, tokenize

    eval_ds = tokenize(load_raw(args.eval_dataset), tokenizer, args, args.eval_dataset)
    eval_ds = eval_ds.select(range(min(ns.eval_blocks, len(eval_ds))))
    collate = collator(tokenizer, "causal_lm")
    rows = {"float": {"perplexity": perplexity(load_model(str(model_dir), "causal_lm").eval(), eval_ds, collate)}}
    print(f"float: {rows['float']['perplexity']:.3f} on {len(eval_ds)} blocks of {block}", flush=True)
    settings = [(False, 0), (True, 0)] + ([(True, ns.online_hadamard)] if ns.online_hadamard else [])
    for rotate, online in ([] if ns.skip_ptq else settings):
        for label, bits, group, act_bits in FORMATS:
            name = f"{label} RTN{setting(rotate, online)}"
            rows[name] = ptq_row(model_dir, work, label, bits, group, act_bits, rotate, eval_ds, collate, online)
            print(f"{name}: {rows[name]['perplexity']:.3f} ({rows[name]['wall_s']:.0f} s)", flush=True)
    for rotate in ((False, True) if ns.a4_breakdown else ()):
        for label, ppl in a4_breakdown_rows(model_dir, rotate, eval_ds, collate).items():
            name = f"W4A4 RTN in memory{' + rotation' if rotate else ''}: {label}"
            rows[name] = {"perplexity": ppl}
            print(f"{name}: {ppl:.3f}", flush=True)
    trained = [] if ns.skip_qat else [f for f in FORMATS if f[0] in ns.qat_formats.split(",")]
    if trained:  # the jobs pick their state (keep_best) on held-out text the table does not score
        from testbed import dev_file

        dev = dev_file(model_dir, work, ns.eval_blocks)
    for fmt in trained:
        for rotate, online in (settings[1:] if ns.qat_rotated_only else settings[::-1]):
            name = f"{fmt[0]} QAT{setting(rotate, online)}"
            rows[name] = qat_row(model_dir, block, work, rotate, ns.qat_steps, ns.qat_batch, ns.eval_blocks,
                                 eval_ds, collate, fmt, dev, shlex.split(ns.qat_args), online)
            print(f"{name}: {rows[name]['perplexity']:.3f} (dev score {rows[name]['dev_score']}, "
                  f"{rows[name]['wall_s']:.0f} s)", flush=True)
    result = {"model_dir": str(model_dir), "pretrain_settings": {k: v for k, v in log["settings"].items()
                                                                 if k != "modules"},
              "parameters": log.get("parameters"), "pretrain_heldout_perplexity": log.get("heldout_perplexity"),
              "eval_blocks": len(eval_ds), "block": block, "qat_steps": ns.qat_steps, "qat_batch": ns.qat_batch,
              "qat_args": ns.qat_args,
              "rows": rows, "total_s": time.time() - t_start,
              "command": "HF_HUB_OFFLINE=1 python scripts/benchmarks/act_rotation.py " + " ".join(sys.argv[1:])}
    if ns.json:
        Path(ns.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
