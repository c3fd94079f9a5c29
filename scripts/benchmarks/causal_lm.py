"""Causal-LM quality: perplexity of a small Llama at W4 / W3 / W2, post-training vs qat.

A Llama-shaped model (hidden 256, 4 layers, byte-level BPE of 4096 tokens) is pretrained here, from a
config, on a real corpus: the standard library's documentation (``pydoc_data.topics``) and the
docstrings of a fixed list of standard-library modules, read with ``ast`` from the source files (no
module is imported). Every 10th document is held out: it is never seen by the tokenizer, pretraining
or QAT, and perplexity is measured on it. The pretrained model is cached under
``outputs/bench_cache/causal_lm_<hash of settings + corpus>`` and reused by later runs.

Then, for every bit width (group 32, symmetric):
    RTN, MSE    qat.quantize_model with init 'rtn' / 'mse' steps, no training;
    qat         the project's main job (qat.trainers.run.run) with scripts/recipes/causal_lm_cpt.yaml:
                inside LoRA + learned steps, distilled (KL only) from the float model on the training
                split; its perplexity is measured on the export as reloaded by transformers.
All rows use the same held-out blocks, tokenised and packed by qat.trainers.data as the job does.

    HF_HUB_OFFLINE=1 python scripts/benchmarks/causal_lm.py        # writes docs/benchmarks/causal_lm.*
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # siblings, also when imported by path
from stdlib_corpus import MODULES, corpus_hash, split_documents, stdlib_documents  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "scripts" / "recipes" / "causal_lm_cpt.yaml"
NAME = "causal_lm"
EOS = "</s>"


# What the markdown says about the qat runs, read from the job's own record of its recipe.
RECIPE_KEYS = ("adapter", "adapter_rank", "adapter_alpha", "adapter_placement", "quant_init", "storage_bits",
               "distill", "distill_weight", "learn_scale")

# Settings that decide the pretrained model (and so its cache key); the rest only change the QAT runs.
PRETRAIN_KEYS = ("modules", "max_topics", "min_doc_chars", "holdout_every", "vocab_size", "hidden", "layers",
                 "heads", "kv_heads", "intermediate", "block", "pretrain_steps", "pretrain_batch", "pretrain_lr",
                 "pretrain_warmup", "weight_decay", "seed")


@dataclass
class Settings:
    # corpus
    modules: tuple = MODULES
    max_topics: int | None = None  # pydoc topics used (None: all); tests take a few
    min_doc_chars: int = 40  # shorter docstrings ("Return self.") teach nothing
    holdout_every: int = 10  # document i is held out when i % holdout_every == holdout_every - 1
    # tokenizer and model
    vocab_size: int = 4096
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 704  # ~8/3 x hidden, a multiple of 32 so group 32 divides every linear's inputs
    block: int = 256
    # pretraining
    pretrain_steps: int = 500
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    pretrain_warmup: int = 30
    weight_decay: float = 0.1
    seed: int = 0
    # quantization and QAT (identical for every bit width)
    bits: tuple = (4, 3, 2)
    group_size: int = 32
    qat_steps: int = 120
    qat_batch: int = 8
    # LoRA / step learning rates (held-out ppl, float 81.41, one run each, same seed): at W2, 50 steps,
    # 82.25 (1e-3 / 1e-4), 82.22 (3e-3 / 1e-4), 82.11 (1e-3 / 1e-3), post-training 85.11; but at W4, 120
    # steps, 81.45 (1e-3 / 1e-4) vs 81.48 (1e-3 / 1e-3), RTN 81.47: fast steps overshoot a small gap.
    qat_lr: float = 1e-3
    qat_step_lr: float = 1e-4
    qat_warmup: int = 12
    # Pure distillation (the recipe mixes in 0.5 CE): the float model is not trained to convergence, so
    # CE on more training text lowers held-out perplexity by itself, below the float model's; with KL
    # alone the qat row measures how much of the quantization loss is recovered, not extra pretraining.
    qat_distill_weight: float = 1.0


def cache_key(s: Settings, docs: list[str]) -> str:
    pretrain = {k: getattr(s, k) for k in PRETRAIN_KEYS}
    blob = json.dumps({"settings": pretrain, "corpus": corpus_hash(docs)}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------------ tokenizer and model
def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained on ``texts`` (the training split only), as a transformers fast tokenizer."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def build_model(s: Settings, tokenizer):
    import transformers

    torch.manual_seed(s.seed)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        max_position_embeddings=s.block, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return transformers.LlamaForCausalLM(cfg)


def pack_blocks(tokenizer, texts: list[str], block: int) -> torch.Tensor:
    """Every text followed by EOS, concatenated and cut into [n, block] (the tail dropped), as the job packs."""
    ids = [t for ids in tokenizer(texts)["input_ids"] for t in ids + [tokenizer.eos_token_id]]
    n = len(ids) // block
    return torch.tensor(ids[: n * block], dtype=torch.long).view(n, block)


# ------------------------------------------------------------------------------------------ pretraining
@torch.no_grad()
def block_loss(model, blocks: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross-entropy over every prediction in ``blocks``."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        x = blocks[i: i + batch]
        logits = model(input_ids=x).logits.float()
        total += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(),
                                                   reduction="sum").item()
        count += x[:, 1:].numel()
    model.train()
    return total / max(count, 1)


def _lr_lambda(warmup: int, steps: int):
    def f(step):  # linear warm-up, then cosine to 10% of the peak
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def pretrain(model, train_blocks: torch.Tensor, eval_blocks: torch.Tensor, s: Settings) -> dict:
    """AdamW on random batches of packed blocks; returns the log (loss curve, held-out loss, time)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norms: decaying them only hurts
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=s.pretrain_lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(s.pretrain_warmup, s.pretrain_steps))
    gen = torch.Generator().manual_seed(s.seed)
    order, pos = torch.randperm(len(train_blocks), generator=gen), 0
    log = {"train": [], "eval": []}
    eval_every = max(s.pretrain_steps // 5, 1)
    probe = eval_blocks[:32]  # a cheap held-out probe during training; the full set at the end
    model.train()
    t0, recent = time.time(), []
    for step in range(1, s.pretrain_steps + 1):
        if pos + s.pretrain_batch > len(order):  # a new epoch: reshuffle
            order, pos = torch.randperm(len(train_blocks), generator=gen), 0
        x = train_blocks[order[pos: pos + s.pretrain_batch]]
        pos += s.pretrain_batch
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        recent.append(loss.item())
        if step % 10 == 0 or step == s.pretrain_steps:
            log["train"].append({"step": step, "loss": sum(recent) / len(recent), "lr": sched.get_last_lr()[0],
                                 "elapsed_s": time.time() - t0})
            recent = []
            print(f"  pretrain step {step}/{s.pretrain_steps} loss {log['train'][-1]['loss']:.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
        if step % eval_every == 0 and step < s.pretrain_steps:
            log["eval"].append({"step": step, "loss": block_loss(model, probe), "blocks": len(probe)})
    log["train_s"] = time.time() - t0
    final = block_loss(model, eval_blocks)
    log["eval"].append({"step": s.pretrain_steps, "loss": final, "blocks": len(eval_blocks)})
    log["heldout_loss"], log["heldout_perplexity"] = final, math.exp(final)
    return log


def pretrained_model(s: Settings, cache_root: Path | str) -> tuple[Path, bool]:
    """The cached pretrained model folder for these settings and corpus, pretrained first if absent.

    Returns (folder, reused). The folder holds the model, its tokenizer, the train / held-out splits
    (train.jsonl, heldout.jsonl) and pretrain_log.json. It is written beside its final name and renamed
    at the end, so an interrupted run never leaves a half-written cache behind.
    """
    docs = stdlib_documents(s)
    folder = Path(cache_root) / f"{NAME}_{cache_key(s, docs)}"
    if (folder / "model.safetensors").is_file() and (folder / "pretrain_log.json").is_file():
        print(f"reusing the pretrained model in {folder}", flush=True)
        return folder, True
    train, held = split_documents(docs, s.holdout_every)
    print(f"corpus: {len(docs)} documents ({len(train)} train, {len(held)} held out); training the tokenizer",
          flush=True)
    tokenizer = train_tokenizer(train, s.vocab_size)
    train_blocks = pack_blocks(tokenizer, train, s.block)
    eval_blocks = pack_blocks(tokenizer, held, s.block)
    model = build_model(s, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"pretraining a {n_params / 1e6:.2f}M-parameter Llama on {train_blocks.numel()} tokens "
          f"({len(train_blocks)} blocks of {s.block}), {s.pretrain_steps} steps of {s.pretrain_batch} blocks",
          flush=True)
    log = pretrain(model, train_blocks, eval_blocks, s)
    log.update(settings={k: getattr(s, k) for k in PRETRAIN_KEYS}, corpus_sha256=corpus_hash(docs),
               parameters=n_params, documents={"train": len(train), "heldout": len(held)},
               chars={"train": sum(map(len, train)), "heldout": sum(map(len, held))},
               tokens={"train": train_blocks.numel(), "heldout": eval_blocks.numel()})
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for name, texts in (("train.jsonl", train), ("heldout.jsonl", held)):
        with open(tmp / name, "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    (tmp / "pretrain_log.json").write_text(json.dumps(log, indent=2, default=list))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    print(f"pretrained in {log['train_s']:.0f} s, held-out perplexity {log['heldout_perplexity']:.2f}; "
          f"cached in {folder}", flush=True)
    return folder, False


# ------------------------------------------------------------------------------------------ quantization
def qat_argv(s: Settings, model_dir: Path, bits, out: Path) -> list[str]:
    """The main job's command line: the continued-pretraining recipe, at this benchmark's sizes."""
    return ["--config", str(RECIPE), "--model_name_or_path", str(model_dir),
            "--dataset", str(model_dir / "train.jsonl"), "--eval_dataset", str(model_dir / "heldout.jsonl"),
            "--max_eval_samples", "null", "--max_length", str(s.block), "--bits", str(bits),
            "--group_size", str(s.group_size), "--max_steps", str(s.qat_steps),
            "--per_device_train_batch_size", str(s.qat_batch), "--gradient_accumulation_steps", "1",
            "--learning_rate", str(s.qat_lr), "--step_learning_rate", str(s.qat_step_lr),
            "--warmup_steps", str(s.qat_warmup), "--distill_weight", str(s.qat_distill_weight),
            "--eval_strategy", "no", "--save_strategy", "no",
            "--logging_steps", str(max(s.qat_steps // 10, 1)), "--disable_tqdm", "true", "--seed", str(s.seed),
            "--run_name", f"{NAME}_w{bits}", "--output_dir", str(out), "--overwrite_output", "true",
            "--report_to", "none"]


def heldout_dataset(args, tokenizer):
    """The held-out blocks exactly as the main job builds its eval split (same loader, same packing)."""
    from qat.trainers.data import load_raw, tokenize

    return tokenize(load_raw(args.eval_dataset), tokenizer, args, args.eval_dataset)


def perplexity(model, eval_ds, collate) -> float:
    from qat.trainers.run import lm_loss

    return math.exp(lm_loss(model, eval_ds, collate))


def ptq_rows(s: Settings, model_dir: Path, eval_ds, collate, bits) -> dict:
    """Post-training quantization at ``bits``: RTN and MSE-searched steps; perplexity and seconds each."""
    import qat
    from qat.trainers.run import load_model

    rows = {}
    for init in ("rtn", "mse"):
        t0 = time.time()
        model = load_model(str(model_dir), "causal_lm").eval()
        qat.quantize_model(model, qat.QuantConfig(bits=bits, group_size=s.group_size, init=init))
        rows[init] = {"perplexity": perplexity(model, eval_ds, collate), "wall_s": time.time() - t0}
    return rows


def qat_row(s: Settings, model_dir: Path, bits, work_dir: Path) -> dict:
    """One run of the main job; perplexity of its export reloaded by transformers, and its wall-clock."""
    from qat.trainers.recipes import build_arguments
    from qat.trainers.run import run

    # run() seeds (--seed) before drawing the LoRA init, so a row does not depend on what ran before it.
    args = build_arguments(qat_argv(s, model_dir, bits, work_dir / f"w{bits}"))
    t0 = time.time()
    metrics = run(args)
    wall = time.time() - t0
    rows = metrics["rows"]
    return {"perplexity": rows["qat"]["perplexity"], "wall_s": wall, "train_s": metrics["train_runtime_s"],
            "steps": metrics["steps"], "export_max_abs_diff": metrics["export_max_abs_diff"],
            "job_float_perplexity": rows["float"]["perplexity"],
            "job_post_training_perplexity": rows["post-training"]["perplexity"],
            "recipe": {k: metrics["recipe"][k] for k in RECIPE_KEYS}}


def recovered(float_ppl: float, ptq_ppl: float, qat_ppl: float) -> float | None:
    """Share of the post-training perplexity gap to the float model that QAT closes."""
    gap = ptq_ppl - float_ppl
    return (ptq_ppl - qat_ppl) / gap if gap > 0 else None


# ------------------------------------------------------------------------------------------ the benchmark
def run_benchmark(s: Settings, cache_root: Path | str, work_dir: Path | str) -> dict:
    import datasets
    import transformers

    from qat.trainers.data import collator
    from qat.trainers.recipes import build_arguments
    from qat.trainers.run import load_model, load_tokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # one line per step of ours, not a bar per load
    datasets.disable_progress_bars()
    t_start = time.time()
    model_dir, reused = pretrained_model(s, cache_root)
    log = json.loads((model_dir / "pretrain_log.json").read_text())
    tokenizer = load_tokenizer(str(model_dir))
    # Any bit width's arguments build the same held-out split: the eval data does not depend on bits.
    args = build_arguments(qat_argv(s, model_dir, s.bits[0], Path(work_dir) / "unused"))
    eval_ds = heldout_dataset(args, tokenizer)
    collate = collator(tokenizer, "causal_lm")
    float_ppl = perplexity(load_model(str(model_dir), "causal_lm").eval(), eval_ds, collate)
    print(f"float model: held-out perplexity {float_ppl:.3f} on {len(eval_ds)} blocks of {s.block}", flush=True)
    rows, qat_recipe = [], None
    for bits in s.bits:
        ptq = ptq_rows(s, model_dir, eval_ds, collate, bits)
        print(f"W{bits}: RTN {ptq['rtn']['perplexity']:.3f}, MSE {ptq['mse']['perplexity']:.3f}; running qat",
              flush=True)
        q = qat_row(s, model_dir, bits, Path(work_dir))
        qat_recipe = q["recipe"]  # the same at every bit width but `bits`, which is not in it
        best = min(ptq["rtn"]["perplexity"], ptq["mse"]["perplexity"])
        rows.append({"bits": bits, "float": float_ppl, "rtn": ptq["rtn"]["perplexity"],
                     "mse": ptq["mse"]["perplexity"], "qat": q["perplexity"],
                     "recovered": recovered(float_ppl, best, q["perplexity"]),
                     "rtn_s": ptq["rtn"]["wall_s"], "mse_s": ptq["mse"]["wall_s"], "qat_s": q["wall_s"],
                     "qat_train_s": q["train_s"], "qat_steps": q["steps"],
                     "export_max_abs_diff": q["export_max_abs_diff"],
                     "job_float_perplexity": q["job_float_perplexity"],
                     "job_post_training_perplexity": q["job_post_training_perplexity"]})
        print(f"W{bits}: qat {q['perplexity']:.3f} ({q['wall_s']:.0f} s)", flush=True)
    return {"settings": dataclasses.asdict(s), "model_dir": str(model_dir), "reused_cache": reused,
            "float_perplexity": float_ppl, "eval_blocks": len(eval_ds), "eval_tokens": len(eval_ds) * s.block,
            "pretrain": {k: log[k] for k in ("parameters", "documents", "chars", "tokens", "train_s",
                                             "heldout_perplexity", "train", "eval")},
            "qat_recipe": qat_recipe, "rows": rows, "total_s": time.time() - t_start}


def table(rows: list[dict]) -> list[str]:
    lines = ["| bits | float ppl | RTN ppl | MSE ppl | qat ppl | PTQ gap recovered | qat wall-clock (s) "
             "| PTQ wall-clock RTN / MSE (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rec = "-" if r["recovered"] is None else f"{100 * r['recovered']:.1f}%"
        lines.append(f"| W{r['bits']} | {r['float']:.2f} | {r['rtn']:.2f} | {r['mse']:.2f} | {r['qat']:.2f} | "
                     f"{rec} | {r['qat_s']:.0f} | {r['rtn_s']:.1f} / {r['mse_s']:.1f} |")
    return lines


def loss_text(recipe: dict) -> str:
    w, teacher = recipe["distill_weight"], f"{recipe['distill'].upper()} to the float model"
    if recipe["distill"] == "none" or w == 0:
        return "next-token CE"
    return f"{teacher} only" if w == 1 else f"{1 - w:g} CE + {w:g} {teacher}"


def markdown(result: dict, command: str, machine: str) -> str:
    s, p, q = result["settings"], result["pretrain"], result["qat_recipe"]
    kind = {"lora": "LoRA", "wht": "Walsh-Hadamard adapter"}.get(q["adapter"], q["adapter"])
    adapter = ("no adapter" if q["adapter"] == "none" else
               f"{q['adapter_placement']} {kind} r{q['adapter_rank']} (alpha {q['adapter_alpha']:g})")
    lines = [
        "# Causal-LM quality: post-training vs qat (perplexity on held-out text)", "",
        f"Command: `{command}`", "",
        f"Machine: {machine}.", "",
        f"Model: Llama-shaped, built from a config and pretrained by the script: hidden {s['hidden']}, "
        f"{s['layers']} layers, {s['heads']} heads ({s['kv_heads']} KV), intermediate {s['intermediate']}, "
        f"byte-level BPE vocabulary {s['vocab_size']}, {p['parameters'] / 1e6:.2f}M parameters; "
        f"{s['pretrain_steps']} AdamW steps of {s['pretrain_batch']} x {s['block']} tokens "
        f"({p['train_s']:.0f} s{', cached from an earlier run' if result['reused_cache'] else ''}), "
        f"held-out perplexity {p['heldout_perplexity']:.2f}.", "",
        f"Corpus: `pydoc_data.topics` and the docstrings of {len(s['modules'])} standard-library modules "
        f"(read with `ast`), deduplicated: {p['documents']['train']} training documents "
        f"({p['chars']['train']:,} characters, {p['tokens']['train']:,} tokens) and "
        f"{p['documents']['heldout']} held-out documents (every {s['holdout_every']}th; "
        f"{p['chars']['heldout']:,} characters), never seen by the tokenizer, pretraining or QAT. "
        f"Perplexity on {result['eval_blocks']} held-out blocks of {s['block']} tokens.", "",
        f"Quantization: every linear layer of the decoder (not the output head), symmetric, group "
        f"{s['group_size']}. RTN / MSE: post-training steps, no training. qat: the main job "
        f"(`scripts/recipes/causal_lm_cpt.yaml`: {adapter}, {'learned' if q['learn_scale'] else 'fixed'} "
        f"{q['quant_init'].upper()}-initialised steps, {loss_text(q)}, "
        f"frozen base at storage {q['storage_bits'] or 'bits'}), "
        f"{s['qat_steps']} steps of {s['qat_batch']} x {s['block']} tokens "
        f"from the training split, LoRA lr {s['qat_lr']}, step lr {s['qat_step_lr']}; measured on the export "
        f"reloaded by transformers. Same steps and batch at every bit width.", "",
    ] + table(result["rows"])
    lines += ["", "PTQ gap recovered = (ppl_PTQ - ppl_qat) / (ppl_PTQ - ppl_float), PTQ = the better of RTN and "
              "MSE. qat wall-clock covers the whole job (load, post-training row, training, export, reload, "
              "evaluation); PTQ wall-clock covers loading, quantizing and evaluating. The distillation is KL "
              "only (the recipe mixes in 0.5 CE) because the float model is not trained to convergence: CE on "
              "more training text would lower held-out perplexity by itself and credit QAT with extra pretraining. "
              "A model this small and this briefly pretrained loses little to quantization, so the recovered "
              "share is a ratio of small perplexity differences.",
              "", f"Total wall-clock of this run: {result['total_s']:.0f} s.", "", f"![perplexity]({NAME}.png)"]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        return False
    rows = result["rows"]
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # log axes otherwise label a narrow range as 8.2 x 10^1
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    bits = [r["bits"] for r in rows]
    for key, label, marker in (("rtn", "RTN", "s"), ("mse", "MSE", "^"), ("qat", "qat", "o")):
        ax.plot(bits, [r[key] for r in rows], marker=marker, label=label)
    ax.axhline(result["float_perplexity"], color="k", ls="--", lw=1, label="float")
    ax.set_xlabel("weight bits (group 32)")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xticks(bits)
    ax.invert_xaxis()
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    ax.set_title("post-training vs qat")
    p = result["pretrain"]
    ax2.plot([h["step"] for h in p["train"]], [math.exp(h["loss"]) for h in p["train"]], label="train")
    ax2.plot([h["step"] for h in p["eval"]], [math.exp(h["loss"]) for h in p["eval"]], marker="o",
             label="held out (32 blocks; last point: all)")
    ax2.set_xlabel("pretraining step")
    ax2.set_ylabel("perplexity")
    ax2.set_yscale("log")
    ax2.yaxis.set_major_formatter(plain)
    ax2.yaxis.set_minor_formatter(NullFormatter())
    ax2.legend()
    ax2.grid(alpha=0.3, which="both")
    ax2.set_title("pretraining of the float model")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write(result: dict, command: str, out_dir: Path | str | None = None) -> Path:
    from bench_common import machine, write_results

    out = write_results(NAME, markdown(result, command, machine()), {**result, "command": command,
                                                                       "machine": machine()}, out_dir)
    plot(result, out / f"{NAME}.png")
    return out


def parse_args(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache_dir", default=str(REPO / "outputs" / "bench_cache"),
                        help="where pretrained models are cached (one folder per settings + corpus hash)")
    parser.add_argument("--work_dir", default=str(REPO / "outputs" / "bench_causal_lm"), help="QAT runs")
    parser.add_argument("--out_dir", default=None, help="results folder (default docs/benchmarks)")
    defaults = Settings()
    for f in dataclasses.fields(Settings):
        if f.name == "modules":
            continue
        value = getattr(defaults, f.name)
        if isinstance(value, tuple):
            parser.add_argument(f"--{f.name}", type=int, nargs="+", default=list(value))
        else:
            kind = type(value) if value is not None else int
            parser.add_argument(f"--{f.name}", type=kind, default=value)
    ns = parser.parse_args(argv)
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(Settings) if f.name != "modules"}
    values["bits"] = tuple(values["bits"])
    return Settings(**values), ns


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    s, ns = parse_args(argv)
    result = run_benchmark(s, ns.cache_dir, ns.work_dir)
    command = "HF_HUB_OFFLINE=1 python scripts/benchmarks/causal_lm.py" + "".join(f" {a}" for a in argv)
    out = write(result, command, ns.out_dir)
    print("\n" + "\n".join(table(result["rows"])))
    print(f"results: {out / NAME}.{{md,json,png}}")
    return result


if __name__ == "__main__":
    main()
