"""Embedding quality of low-bit all-MiniLM-L6-v2: qat against post-training quantization and the tools
users pick instead (peft + bitsandbytes QLoRA, torchao QAT), in one run (issue 5, item 1).

Every trained method gets the same data (pydoc_data.topics sentences; held-out topics for evaluation),
the same loss (cosine of mean-pooled embeddings to the float model), the same steps, batch, learning
rate and schedule (the main job's: DEFAULT_RECIPE), and the same trainer loop (QATTrainer, which runs
any model with trainable parameters). The encoder's linear layers are quantized, group 32, symmetric.

    python scripts/benchmarks/quality.py                       # everything, writes docs/benchmarks/quality.*
    python scripts/benchmarks/quality.py --bits 4 --methods ptq_mse lora_inside --steps 20

Methods (rows), each measured on the exported model as transformers reloads it where it exports:
  ptq_rtn / ptq_mse     post-training: absmax steps / MSE-searched steps, no training
  lora_inside           qat: LoRA inside the quantizer (W_hat = Q(W0 + BA)), zero init, learned steps (the
                        main job's; the refine init lowers layer error, docs/ADAPTERS.md, but trained worse:
                        W4 cosine 0.9691 after the same 100 steps of 16 in a first run of this script)
  lora_outside          qat: LoRA outside (Q(W0) + BA), activation-weighted LoftQ init, exported as the packed
                        base + a peft adapter
  wht_inside            qat: Walsh-Hadamard adapter inside, zero init (refine helps WHT least, -10% layer
                        error in docs/ADAPTERS.md, and costs ~2 min of a 2-core machine)
  steps_only            qat: learned steps only (LSQ), no adapter
  qzo_steps             qat: zeroth-order (QZO) on the steps, no backward pass
  qlora_nf4             peft + bitsandbytes: LoRA over an NF4 base, merged back into NF4 (bitsandbytes'
                        merge re-quantizes); 4-bit only
  qlora_requant         the same QLoRA training, merged in float and re-quantized to the row's int format with
                        MSE steps, exported by qat: how a QLoRA model reaches 2-3 bits
  torchao               torchao QAT: its IntxFakeQuantizeConfig (int-b, group 32) under a peft LoRA, then
                        merge and its convert step (IntxWeightOnlyConfig); measured in memory (no export to
                        a packed checkpoint); no ternary config

Metrics on 256 held-out sentences: mean cosine to the float embeddings, nearest-neighbour agreement, and
the share of the post-training degradation recovered, (cos - cos_PTQ) / (1 - cos_PTQ), PTQ = ptq_mse.
"""

from __future__ import annotations

import argparse
import copy
import gc
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import machine, write_results  # noqa: E402
from quality_report import plot, report  # noqa: E402

BITS = {"4": 4, "3": 3, "2": 2, "ternary": 1.58}
QAT_METHODS = {
    "lora_inside": {"adapter": "lora", "adapter_placement": "inside", "adapter_init": "zero"},
    # An error-aware start wants a smaller adapter lr than the job's 1e-3, which walks it away
    # from its start (W4, 100 x 16 sweep: 1e-3 0.9791, 2e-4 0.9863, 5e-5 0.9870; W2 2e-4 0.8676
    # vs 0.8627 at 1e-3).
    "lora_outside": {"adapter": "lora", "adapter_placement": "outside", "adapter_init": "loftq_act",
                     "learning_rate": 2e-4},
    "wht_inside": {"adapter": "wht", "adapter_placement": "inside", "adapter_init": "zero"},
    "steps_only": {"adapter": "none"},
    "qzo_steps": {"adapter": "none", "optim": "zo", "zo_targets": "steps"},
}
PTQ_METHODS = ("ptq_rtn", "ptq_mse")
OTHER_METHODS = ("qlora_nf4", "qlora_requant", "torchao")
METHODS = PTQ_METHODS + tuple(QAT_METHODS) + OTHER_METHODS
ENCODER_LINEARS = r".*encoder\.layer\.\d+\..*"  # the encoder's linears; the unused pooler stays float
LORA_TARGETS = r".*encoder\.layer\.\d+\..*(query|key|value|dense)$"  # peft: the same layers


# ---------------------------------------------------------------------------------------- set-up
def recipe_argv(a, bits: float, out: Path, extra: dict) -> list[str]:
    """The main job's recipe with the benchmark's shared settings and one method's overrides."""
    values = {"max_steps": a.steps, "per_device_train_batch_size": a.batch, "bits": bits,
              "output_dir": str(out), "overwrite_output": True, "save_strategy": "no",
              "logging_steps": max(1, a.steps // 10), "quant_include": f"['{ENCODER_LINEARS}']",
              "adapter_targets": f"['{ENCODER_LINEARS}']", "disable_tqdm": True,
              "max_eval_samples": a.eval_sentences, **extra}
    argv = []
    for k, v in values.items():
        argv += [f"--{k}", str(v)]
    return argv


def build_args(a, bits, out, extra):
    from qat.trainers.recipes import build_arguments

    return build_arguments(recipe_argv(a, bits, out, extra))


def quant_layout(a, workdir: Path) -> dict:
    """What the report says about the quantized model, read from the recipe every row uses and
    the model itself (not written by hand): layers quantized, group, symmetry, adapter rank."""
    import transformers

    from qat.surgery import linear_layers

    args = build_args(a, 4, workdir / "layout", {})
    config = args.quant_config()
    model = transformers.AutoModel.from_pretrained(args.model_name_or_path)
    layers = [n for n, _ in linear_layers(model) if config.selects(n)]
    return {"layers": len(layers), "group_size": config.group_size, "symmetric": config.symmetric,
            "adapter_rank": args.adapter_rank}


class Bench:
    """What every row shares: tokenizer, data, the float model's held-out embeddings."""

    def __init__(self, a, workdir: Path):
        from qat.trainers.data import build_datasets
        from qat.trainers.run import load_model, load_tokenizer

        self.a, self.workdir = a, workdir
        self.args = build_args(a, 4, workdir / "shared", {})
        self.path = self.args.model_name_or_path
        self.tokenizer = load_tokenizer(self.path)
        self.train_ds, self.eval_ds, self.texts = build_datasets(self.args, self.tokenizer)
        self.float_model = load_model(self.path, "embedding").eval()
        self.float_emb = self.embed(self.float_model)

    def embed(self, model):
        from qat.evaluation import sentence_embeddings

        return sentence_embeddings(model.eval(), self.tokenizer, self.texts, max_length=self.args.max_length)

    def score(self, model) -> dict:
        from qat.evaluation import embedding_agreement

        return embedding_agreement(self.float_emb, self.embed(model))

    def fresh_float(self):
        return copy.deepcopy(self.float_model)

    def train(self, model, args):
        """QATTrainer on any model with trainable parameters: same data, loss, optimizer and schedule."""
        from qat.trainers.data import collator
        from qat.trainers.trainer import QATTrainer

        trainer = QATTrainer(model=model, args=args, teacher=self.fresh_float(), train_dataset=self.train_ds,
                             data_collator=collator(self.tokenizer, "embedding"), processing_class=self.tokenizer)
        return trainer.train()

    def quantize_export_score(self, model, bits: float, init: str, name: str) -> dict:
        """Post-training quantize a float model to the row's format (the job's own ``quantize``, same
        layers and group as every qat row), export with qat, reload with transformers, score the reload."""
        import qat
        from qat.trainers.run import load_model, quantize

        quantize(build_args(self.a, bits, self.workdir / name, {"quant_init": init}), model)
        out = self.workdir / name
        qat.export_model(model, out, tokenizer=self.tokenizer, source_dir=self.path, overwrite=True)
        return self.score(load_model(str(out), "embedding"))


# ---------------------------------------------------------------------------------------- methods
def run_ptq(bench: Bench, bits: float, init: str) -> dict:
    return bench.quantize_export_score(bench.fresh_float(), bits, init, f"ptq-{init}-{bits}")


def run_qat(bench: Bench, bits: float, method: str) -> dict:
    from qat.trainers.run import run

    extra = dict(QAT_METHODS[method])
    if method == "qzo_steps":
        extra.update(learning_rate=bench.a.zo_lr, step_learning_rate=bench.a.zo_lr, zo_eps=bench.a.zo_eps)
    if method == "steps_only":
        extra.update(step_learning_rate=bench.a.steps_lr)
    args = build_args(bench.a, bits, bench.workdir / f"{method}-{bits}", extra)
    metrics = run(args)
    return dict(metrics["rows"]["qat"], export_max_abs_diff=metrics["export_max_abs_diff"])


def lora_config(args):
    """peft LoRA for the other tools' rows: the recipe's rank and alpha, on the layers qat quantizes."""
    from peft import LoraConfig

    return LoraConfig(r=args.adapter_rank, lora_alpha=args.adapter_alpha, lora_dropout=0.0,
                      target_modules=LORA_TARGETS)


def train_qlora(bench: Bench):
    """LoRA over an NF4 base (peft + bitsandbytes, as QLoRA users load it); trained once for every row."""
    from peft import get_peft_model
    from transformers import AutoModel, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                           llm_int8_skip_modules=["pooler"])
    base = AutoModel.from_pretrained(bench.path, quantization_config=q, device_map="cpu", dtype=torch.float32)
    model = get_peft_model(base, lora_config(bench.args))
    start = time.perf_counter()
    bench.train(model, build_args(bench.a, 4, bench.workdir / "qlora", {"adapter": "none"}))
    return model, time.perf_counter() - start


def qlora_merged_float(bench: Bench, peft_model):
    """Float model with W = dequant_NF4(W0) + scaling * B A for every LoRA layer (the merge, done in float)."""
    import bitsandbytes.functional as bnbf

    model = bench.fresh_float()
    for name, module in peft_model.base_model.model.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        w = bnbf.dequantize_4bit(module.base_layer.weight.data, module.base_layer.weight.quant_state).float()
        delta = module.get_delta_weight("default").float()
        model.get_submodule(name).weight.data.copy_(w + delta)
    return model


def run_qlora_nf4(bench: Bench, peft_model) -> dict:
    """bitsandbytes' own merge (dequantize, add, re-quantize to NF4), saved and reloaded with transformers."""
    from transformers import AutoModel

    merged = copy.deepcopy(peft_model).merge_and_unload()
    out = bench.workdir / "qlora-nf4"
    shutil.rmtree(out, ignore_errors=True)
    merged.save_pretrained(out)
    reloaded = AutoModel.from_pretrained(out, device_map="cpu", dtype=torch.float32)
    return bench.score(reloaded)


def run_qlora_requant(bench: Bench, peft_model, bits: float) -> dict:
    return bench.quantize_export_score(qlora_merged_float(bench, peft_model), bits, "mse", f"qlora-requant-{bits}")


def run_torchao(bench: Bench, bits: float) -> dict:
    """torchao's QAT flow: prepare (fake-quantized linears), peft LoRA on top, train, merge, convert."""
    from peft import get_peft_model
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup, quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    dtype = getattr(torch, f"int{int(bits)}")
    is_encoder_linear = lambda m, fqn: isinstance(m, torch.nn.Linear) and ".encoder.layer." in f".{fqn}."  # noqa: E731
    model = bench.fresh_float()
    fake = IntxFakeQuantizeConfig(dtype, group_size=32, is_symmetric=True)
    quantize_(model, QATConfig(weight_config=fake, step="prepare"), filter_fn=is_encoder_linear)
    model.requires_grad_(False)
    peft_model = get_peft_model(model, lora_config(bench.args))
    bench.train(peft_model, build_args(bench.a, bits, bench.workdir / f"torchao-{bits}", {"adapter": "none"}))
    merged = peft_model.merge_and_unload()
    base = IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(32))
    quantize_(merged, QATConfig(base, step="convert"), filter_fn=is_encoder_linear)
    return bench.score(merged)


# ---------------------------------------------------------------------------------------- the grid
NOT_RUN = {
    ("qlora_nf4", "3"): "NF4 is 4-bit only", ("qlora_nf4", "2"): "NF4 is 4-bit only",
    ("qlora_nf4", "ternary"): "NF4 is 4-bit only", ("torchao", "ternary"): "torchao has no ternary config",
}


def timed(fn, *args) -> dict:
    start = time.perf_counter()
    row = fn(*args)
    row["seconds"] = time.perf_counter() - start
    gc.collect()
    return row


def run_grid(a, workdir: Path) -> dict:
    bench = Bench(a, workdir)
    results = {b: {} for b in a.bits}
    qlora = None
    for bits_name in a.bits:
        bits = BITS[bits_name]
        for method in a.methods:
            if (method, bits_name) in NOT_RUN:
                results[bits_name][method] = {"not_run": NOT_RUN[(method, bits_name)]}
                continue
            print(f"[quality] W{bits_name} {method}", flush=True)
            if method in PTQ_METHODS:
                row = timed(run_ptq, bench, bits, method.split("_")[1])
            elif method in QAT_METHODS:
                row = timed(run_qat, bench, bits, method)
            elif method == "torchao":
                row = timed(run_torchao, bench, bits)
            else:
                if qlora is None:
                    qlora = train_qlora(bench)
                if method == "qlora_nf4":
                    row = timed(run_qlora_nf4, bench, qlora[0])
                else:
                    row = timed(run_qlora_requant, bench, qlora[0], bits)
                row["train_seconds"] = qlora[1]  # one QLoRA training serves every bit width
            results[bits_name][method] = row
            print(f"[quality] W{bits_name} {method}: {row}", flush=True)
    return add_recovered(results)


def add_recovered(results: dict) -> dict:
    for rows in results.values():
        ptq = rows.get("ptq_mse", {}).get("cosine")
        for row in rows.values():
            if ptq is not None and "cosine" in row and ptq < 1:
                row["recovered"] = (row["cosine"] - ptq) / (1 - ptq)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", nargs="+", default=list(BITS), choices=list(BITS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval_sentences", type=int, default=256, help="held-out sentences scored")
    p.add_argument("--steps_lr", type=float, default=1e-3, help="step learning rate of steps_only")
    p.add_argument("--zo_lr", type=float, default=0.2, help="learning rate of qzo_steps (relative to each step)")
    p.add_argument("--zo_eps", type=float, default=1e-2, help="relative perturbation of qzo_steps")
    p.add_argument("--out", default=None, help="results folder (default docs/benchmarks)")
    p.add_argument("--workdir", default=None, help="exports go here (default: a temporary folder)")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    workdir = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="qat-quality-"))
    start = time.perf_counter()
    results = run_grid(a, workdir)
    total = time.perf_counter() - start
    lr_overrides = {m: v["learning_rate"] for m, v in QAT_METHODS.items() if "learning_rate" in v}
    markdown, data = report(results, a, total, machine(), argv if argv is not None else sys.argv[1:],
                            lr_overrides, quant_layout(a, workdir))
    out = write_results("quality", markdown, data, a.out)
    plot(results, out / "quality.png")
    print(markdown)
    if not a.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
