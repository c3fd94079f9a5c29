"""Matryoshka quantization: int4 / int2 slices of one checkpoint vs models trained at that width alone.

For one benchmark (``--bench minilm``: all-MiniLM-L6-v2 distilled on pydoc text, scored by cosine and
nearest-neighbour agreement with the float model on the held-out pydoc split; ``--bench testbed``: the
byte-level causal-LM testbed of testbed.py, scored by held-out perplexity) this trains, with the main
job (qat.trainers.run.run) and the same steps / batch / learning rates each:

    matryoshka   bits 8, storage 8, matryoshka_widths [8, 4, 2]: one int8 checkpoint
    int8         bits 8, storage 8: plain int8 QAT (its slices are the "slice a plain int8 model" row)
    int4, int2   bits 4 / 2, storage 8: a model trained at that width alone

then writes the int4 and int2 slices of the two int8 checkpoints with ``qat export --bits R`` (and of
an untrained RTN int8 model), reloads every export with transformers and scores it.

    HF_HUB_OFFLINE=1 python scripts/benchmarks/matryoshka.py --bench minilm --max_steps 40
    HF_HUB_OFFLINE=1 python scripts/benchmarks/matryoshka.py --bench minilm --lr 1e-3 1e-4 --step_lr 1e-3 --step_lr_relative
    HF_HUB_OFFLINE=1 python scripts/benchmarks/matryoshka.py --bench testbed --max_steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[2]
RUNS = {"matryoshka": ["--bits", "8", "--storage_bits", "8", "--matryoshka_widths", "[8, 4, 2]"],
        "int8": ["--bits", "8", "--storage_bits", "8"],
        "int4": ["--bits", "4", "--storage_bits", "8"],
        "int2": ["--bits", "2", "--storage_bits", "8"]}
SLICED = ("matryoshka", "int8")
WIDTHS = (8, 4, 2)


def job_argv(bench: str, ns, model_dir: Path, out: Path, dev: Path | None = None, lr: float = 1e-3) -> list[str]:
    """The job's arguments at LoRA learning rate ``lr``; ``dev`` (testbed) is its keep_best split
    (testbed.dev_file)."""
    common = ["--max_steps", str(ns.max_steps), "--per_device_train_batch_size", str(ns.batch),
              "--gradient_accumulation_steps", "1", "--learning_rate", str(lr),
              "--step_learning_rate", str(ns.step_lr), "--warmup_steps", str(max(ns.max_steps // 10, 1)),
              "--group_size", "32", "--quant_init", "rtn", "--seed", "0", "--eval_strategy", "no",
              "--save_strategy", "no", "--logging_steps", str(max(ns.max_steps // 5, 1)), "--disable_tqdm", "true",
              "--report_to", "none", "--output_dir", str(out), "--overwrite_output", "true",
              *(["--keep_best_steps", str(ns.keep_best_steps)] if ns.keep_best_steps else []),
              *(["--step_lr_relative", "true"] if ns.step_lr_relative else [])]
    if bench == "minilm":
        # the recipe's default trains steps on frozen GPTQ codes; Matryoshka moves codes, so every row here
        # trains an inside LoRA with re-rounding (fake_quant) from RTN codes, as on the testbed
        return ["--config", str(REPO / "scripts/recipes/encoder_distill.yaml"), "--max_eval_samples", "64",
                "--train_sampling_strategy", "random", "--train_mode", "fake_quant", "--adapter", "lora", *common]
    return ["--config", str(REPO / "scripts/recipes/causal_lm_cpt.yaml"), "--model_name_or_path", str(model_dir),
            "--dataset", str(model_dir / "train.jsonl"), "--eval_dataset", str(dev),
            "--max_eval_samples", "16", "--max_length", str(ns.block), "--distill_weight", "1.0", *common]


class Scorer:
    """Scores a folder (float model or export) the same way for every row."""

    def __init__(self, bench: str, model_dir: Path, max_blocks: int, test_sentences: int = 512):
        self.bench, self.model_dir = bench, model_dir
        if bench == "minilm":
            from transformers import AutoTokenizer

            from qat.corpus import ood_test_sentences

            # the quality benchmark's out-of-domain test split (the jobs train on the corpus and pick
            # their state on its dev split; nothing tunes on these)
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self.sentences = ood_test_sentences(n=test_sentences)
            self.reference = self._embeddings(model_dir)
        else:
            from testbed import heldout_blocks

            self.blocks = heldout_blocks(model_dir, max_blocks)

    def _embeddings(self, folder):
        from transformers import AutoModel

        from qat.evaluation import sentence_embeddings

        model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
        return sentence_embeddings(model, self.tokenizer, self.sentences, max_length=64)

    def __call__(self, folder: Path) -> dict:
        if self.bench == "minilm":
            from qat.evaluation import embedding_agreement

            return embedding_agreement(self.reference, self._embeddings(folder))
        from transformers import AutoModelForCausalLM

        from testbed import perplexity

        return {"perplexity": perplexity(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(),
                                         self.blocks)}


def sliced(export_dir: Path, bits: int, out: Path) -> Path:
    """``qat export EXPORT --bits R`` (int8 exports are themselves the width-8 row)."""
    from qat.cli import main as cli_main

    if bits == 8:
        return export_dir
    cli_main(["export", str(export_dir), "--out", str(out), "--bits", str(bits), "--overwrite"])
    return out


def rtn_int8(model_dir: Path, bench: str, out: Path) -> Path:
    """The float model at int8 RTN, no training: slicing it is the post-training baseline."""
    import transformers

    import qat

    cls = transformers.AutoModel if bench == "minilm" else transformers.AutoModelForCausalLM
    model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    qat.quantize_model(model, qat.QuantConfig(bits=8, storage_bits=8, group_size=32, init="rtn"))
    return qat.export_model(model, out, overwrite=True, source_dir=model_dir)


def run(ns) -> dict:
    from qat.trainers.recipes import build_arguments, default_model_path
    from qat.trainers.run import run as run_job

    work = Path(ns.work_dir) / ns.bench
    if ns.bench == "minilm":
        model_dir = Path(default_model_path())
    else:
        from testbed import testbed_model

        model_dir = Path(ns.model_dir) if ns.model_dir else testbed_model()
    score = Scorer(ns.bench, model_dir, ns.max_blocks, ns.test_sentences)
    dev = None
    if ns.bench == "testbed":
        from testbed import dev_file

        dev = dev_file(model_dir, work, ns.max_blocks)
    result = {"bench": ns.bench, "model_dir": str(model_dir), "float": score(model_dir), "runs": {}, "rows": {}}
    print(f"float: {result['float']}", flush=True)
    rtn = rtn_int8(model_dir, ns.bench, work / "rtn_int8")
    result["rows"]["rtn int8, sliced"] = {b: score(sliced(rtn, b, work / f"rtn_int8_w{b}")) for b in WIDTHS}
    print(f"rtn int8 sliced: {result['rows']['rtn int8, sliced']}", flush=True)
    for name in ns.runs:
        t0 = time.time()
        extra = ["--matryoshka_weights", ns.weights] if name == "matryoshka" and ns.weights else []
        tried = {}  # lr -> the job's metrics; the run keeps the lr of the best keep_best dev score
        for lr in ns.lr:
            out = work / (name if len(ns.lr) == 1 else f"{name}_lr{lr:g}")
            tried[lr] = run_job(build_arguments(job_argv(ns.bench, ns, model_dir, out, dev, lr) + RUNS[name] + extra))
        lr = min(tried, key=lambda k: tried[k]["keep_best"]["best_dev_score"])
        metrics = tried[lr]
        export_dir = Path(metrics["export_dir"])
        result["runs"][name] = {"wall_s": time.time() - t0, "train_s": metrics["train_runtime_s"],
                                "steps": metrics["steps"], "export_max_abs_diff": metrics["export_max_abs_diff"],
                                "lr": lr, "dev_score": {f"{k:g}": m["keep_best"]["best_dev_score"]
                                                        for k, m in tried.items()},
                                "kept_step": metrics["keep_best"]["best_step"]}
        if name in SLICED:
            row = {b: score(sliced(export_dir, b, work / f"{name}_w{b}")) for b in WIDTHS}
            result["rows"][f"{name}, sliced" if name == "int8" else name] = row
        else:
            result["rows"][f"{name} alone"] = {int(name[3:]): score(export_dir)}
        print(f"{name}: {result['rows']} ({time.time() - t0:.0f} s)", flush=True)
    names = ("max_steps", "batch", "lr", "step_lr", "weights", "keep_best_steps", "step_lr_relative", "block",
             "max_blocks")
    result["settings"] = {k: getattr(ns, k) for k in names}
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bench", choices=["minilm", "testbed"], required=True)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--max_steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3], help="LoRA learning rate(s): with several, "
                        "each run tries every one and keeps the best keep_best dev score (the test split is read "
                        "only for the kept one)")
    parser.add_argument("--step_lr", type=float, default=1e-4, help="step (LSQ) learning rate")
    parser.add_argument("--weights", default=None, help="the Matryoshka run's matryoshka_weights, one per width "
                        "of [8, 4, 2], e.g. '[100, 10, 1]' (default: equal)")
    parser.add_argument("--step_lr_relative", action="store_true", help="--step_lr is a fraction of each "
                        "layer's mean step (the job's step_lr_relative), the same for every width")
    parser.add_argument("--keep_best_steps", type=int, default=None,
                        help="score dev every N steps (default: the job's, 50)")
    parser.add_argument("--block", type=int, default=128, help="testbed: tokens per training block")
    parser.add_argument("--max_blocks", type=int, default=256, help="testbed: held-out blocks scored")
    parser.add_argument("--test_sentences", type=int, default=512, help="minilm: out-of-domain sentences scored")
    parser.add_argument("--work_dir", default=str(REPO / "outputs" / "matryoshka"))
    parser.add_argument("--model_dir", default=None, help="testbed: a pretrained testbed folder (default: the cached "
                        "one of testbed.settings(), pretrained first when absent)")
    parser.add_argument("--json", default=None, help="write the result here")
    ns = parser.parse_args(argv)
    result = run(ns)
    result["command"] = "HF_HUB_OFFLINE=1 python scripts/benchmarks/matryoshka.py " + " ".join(argv or sys.argv[1:])
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if ns.json:
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
