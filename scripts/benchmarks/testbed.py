"""The causal-LM testbed: a small byte-level Llama on which weight quantization clearly costs perplexity.

The 5M-parameter BPE Llama of causal_lm.py loses only ~3% perplexity at W2 RTN: after 500 steps its
predictions come mostly from the (unquantized) embedding and output head, so its linear layers hardly
matter and methods cannot be told apart. The testbed is byte-level instead (a byte-level BPE tokenizer
with no merges: 256 byte symbols and EOS), so every prediction beyond a byte bigram must come from the
decoder's linear layers, and it is pretrained longer, without weight decay, to a low loss.

Corpus, split and packing are causal_lm.py's (pydoc_data.topics + standard-library docstrings read with
``ast``; every 10th document held out, never seen in pretraining). The model is pretrained ONCE and
cached under ``~/.cache/qat/testbed/causal_lm_<fingerprint>``, the fingerprint being a hash of every pretraining
setting and of the corpus; later runs (and other scripts, through :func:`testbed_model`) reuse it.

The report: held-out perplexity of the float model and of W8 / W4 / W3 / W2 RTN (symmetric, group 32,
every decoder linear, not the output head), each exported as compressed-tensors and reloaded by
transformers.

    HF_HUB_OFFLINE=1 python scripts/benchmarks/testbed.py     # pretrains once (~25 min), then the table

Other scripts:  ``from testbed import testbed_model, heldout_blocks, perplexity``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import causal_lm  # noqa: E402
from causal_lm import block_loss, pack_blocks, pretrained_model  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# Shared by every checkout of the project on the machine (override: QAT_TESTBED_CACHE), so it is pretrained once.
CACHE = Path(os.environ.get("QAT_TESTBED_CACHE", Path.home() / ".cache" / "qat" / "testbed"))
BYTE_VOCAB = 257  # 256 byte symbols + EOS: the BPE trainer adds no merge


def settings(**changes) -> causal_lm.Settings:
    """The testbed's pretraining settings (causal_lm.Settings, so the cache fingerprint covers them)."""
    # hidden 256 / 2000 steps: the first size at which W2 RTN costs clearly more than noise (docs/TESTBED.md);
    # the earlier 128 / 240-step model lost only 2.6% at W2.
    base = dict(vocab_size=BYTE_VOCAB, hidden=256, layers=4, heads=4, kv_heads=2, intermediate=704, block=128,
                pretrain_steps=2000, pretrain_batch=16, pretrain_lr=3e-3, pretrain_warmup=20, weight_decay=0.0,
                seed=0, bits=(8, 4, 3, 2), group_size=32)
    base.update(changes)
    return causal_lm.Settings(**base)


def testbed_model(cache_dir: Path | str = CACHE, **changes) -> Path:
    """The cached testbed folder (model, tokenizer, train.jsonl, heldout.jsonl, pretrain_log.json);
    pretrained first when absent (about 25 minutes on 2 shared cores)."""
    folder, _ = pretrained_model(settings(**changes), cache_dir)
    return folder


def _packed(folder: Path, lines: list[str]) -> torch.Tensor:
    """jsonl ``lines`` of ``folder``'s documents, tokenised, EOS-joined and cut into [n, block] as in
    pretraining."""
    from transformers import AutoTokenizer

    block = json.loads((folder / "pretrain_log.json").read_text())["settings"]["block"]
    return pack_blocks(AutoTokenizer.from_pretrained(folder), [json.loads(x)["text"] for x in lines], block)


def heldout_blocks(folder: Path | str, max_blocks: int | None = None) -> torch.Tensor:
    """The held-out documents as [n, block] (see _packed), the first ``max_blocks`` of them."""
    folder = Path(folder)
    return _packed(folder, (folder / "heldout.jsonl").read_text().splitlines())[:max_blocks]


def dev_file(folder: Path | str, out_dir: Path | str, scored_blocks: int) -> Path:
    """``out_dir/dev.jsonl``: the second half of the held-out documents, for the jobs' dev split
    (keep_best), disjoint from the text the benchmarks report on: they score the first ``scored_blocks``
    held-out blocks, which must lie inside the first half (checked)."""
    folder, out_dir = Path(folder), Path(out_dir)
    lines = (folder / "heldout.jsonl").read_text().splitlines()
    half = len(lines) // 2
    first = _packed(folder, lines[:half])
    if len(first) < scored_blocks:
        raise ValueError(f"the first half of the held-out documents holds {len(first)} blocks, fewer than the "
                         f"{scored_blocks} scored: score fewer blocks")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dev.jsonl").write_text("\n".join(lines[half:]) + "\n")
    return out_dir / "dev.jsonl"


def perplexity(model, blocks: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) over every prediction in ``blocks``."""
    return math.exp(block_loss(model, blocks))


def rtn_perplexity(folder: Path, bits: int, group_size: int, blocks: torch.Tensor, work_dir: Path) -> dict:
    """RTN (absmax steps) at ``bits``, exported as compressed-tensors and reloaded by transformers."""
    import transformers

    import qat

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    qat.quantize_model(model, qat.QuantConfig(bits=bits, group_size=group_size, init="rtn"))
    trained_ppl = perplexity(model, blocks)
    out = qat.export_model(model, work_dir / f"w{bits}_rtn", overwrite=True, source_dir=folder)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    return {"bits": bits, "perplexity": perplexity(reloaded, blocks), "in_memory_perplexity": trained_ppl}


def run(s: causal_lm.Settings, cache_dir: Path, work_dir: Path, max_blocks: int | None) -> dict:
    import transformers

    t0 = time.time()
    folder, reused = pretrained_model(s, cache_dir)
    log = json.loads((folder / "pretrain_log.json").read_text())
    blocks = heldout_blocks(folder, max_blocks)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    float_ppl = perplexity(model, blocks)
    print(f"float: held-out perplexity {float_ppl:.4f} on {len(blocks)} blocks of {s.block}", flush=True)
    rows = []
    for bits in s.bits:
        row = rtn_perplexity(folder, bits, s.group_size, blocks, work_dir)
        row["increase"] = row["perplexity"] / float_ppl - 1
        rows.append(row)
        print(f"W{bits} RTN g{s.group_size}: {row['perplexity']:.4f} (+{100 * row['increase']:.1f}%)", flush=True)
    return {"model_dir": str(folder), "reused_cache": reused, "float_perplexity": float_ppl, "rows": rows,
            "eval_blocks": len(blocks), "settings": {k: log["settings"][k] for k in causal_lm.PRETRAIN_KEYS
                                                     if k != "modules"},
            "pretrain": {k: log[k] for k in ("parameters", "documents", "tokens", "train_s", "heldout_perplexity")},
            "total_s": time.time() - t0}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache_dir", default=str(CACHE), help="where the pretrained testbed is cached")
    parser.add_argument("--work_dir", default=str(REPO / "outputs" / "testbed_rtn"), help="RTN exports")
    parser.add_argument("--max_blocks", type=int, default=None, help="held-out blocks evaluated (default all)")
    parser.add_argument("--pretrain_steps", type=int, default=None, help="override (changes the fingerprint)")
    parser.add_argument("--hidden", type=int, default=None, help="override (changes the fingerprint)")
    parser.add_argument("--intermediate", type=int, default=None, help="override (changes the fingerprint)")
    parser.add_argument("--pretrain_lr", type=float, default=None, help="override (changes the fingerprint)")
    parser.add_argument("--json", default=None, help="also write the result here")
    ns = parser.parse_args(argv)
    changes = {k: getattr(ns, k) for k in ("pretrain_steps", "hidden", "intermediate", "pretrain_lr") if getattr(ns, k) is not None}
    result = run(settings(**changes), Path(ns.cache_dir), Path(ns.work_dir), ns.max_blocks)
    if ns.json:
        Path(ns.json).write_text(json.dumps(result, indent=2, default=list) + "\n")
    return result


if __name__ == "__main__":
    main()
