"""scripts/benchmarks/causal_lm.py at toy sizes: the cache is reused, the split is by document, and the
float perplexity is exp(mean next-token cross-entropy) on the held-out blocks, checked in float64 here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers


# A toy model on a toy corpus (8 pydoc topics + json's docstrings): seconds, not minutes.
TINY = dict(modules=("json",), max_topics=8, vocab_size=300, hidden=64, layers=2, heads=2, kv_heads=1,
            intermediate=128, block=64, pretrain_steps=6, pretrain_batch=4, pretrain_warmup=2, bits=(3,),
            qat_steps=2, qat_batch=2, qat_warmup=1)


@pytest.fixture(scope="module")
def bench(load_bench_script):
    with load_bench_script("causal_lm") as module:
        yield module


def _texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def _float64_perplexity(model_dir: Path, texts: list[str], block: int) -> float:
    """Independent reference: pack (text + EOS)*, cut into blocks, mean next-token NLL in float64."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    ids = [t for text in texts for t in tok(text)["input_ids"] + [tok.eos_token_id]]
    n = len(ids) // block
    x = torch.tensor(ids[: n * block]).view(n, block)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits.double(), dim=-1)
    nll = -logp[:, :-1].gather(-1, x[:, 1:, None]).mean()
    return math.exp(nll.item())


def test_tiny_benchmark(bench, tmp_path):
    s = bench.Settings(**TINY)
    cache = tmp_path / "cache"
    result = bench.run_benchmark(s, cache, tmp_path / "work")
    model_dir = Path(result["model_dir"])
    assert not result["reused_cache"] and model_dir.parent == cache

    # A second call finds the cached model and does not pretrain again.
    weights = model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again, reused = bench.pretrained_model(s, cache)
    assert reused and again == model_dir and weights.stat().st_mtime_ns == mtime

    # Held out by document: every 10th of the corpus, none of it in the training split.
    train, held = _texts(model_dir / "train.jsonl"), _texts(model_dir / "heldout.jsonl")
    docs = bench.stdlib_documents(s)
    assert held == docs[s.holdout_every - 1:: s.holdout_every] and len(train) + len(held) == len(docs)
    assert held and set(train).isdisjoint(held)

    (row,) = result["rows"]
    assert row["bits"] == 3 and row["qat_steps"] == s.qat_steps
    for key in ("float", "rtn", "mse", "qat"):
        assert math.isfinite(row[key]) and 1 < row[key] < 10 * s.vocab_size
    # The float row is exp(mean CE), the same number the main job reports for its float model.
    reference = _float64_perplexity(model_dir, held, s.block)
    assert result["float_perplexity"] == pytest.approx(reference, rel=1e-5)
    assert row["job_float_perplexity"] == pytest.approx(result["float_perplexity"], rel=1e-9)

    out = bench.write(result, "python scripts/benchmarks/causal_lm.py --tiny", tmp_path / "docs")
    md = (out / "causal_lm.md").read_text()
    assert "| W3 |" in md and "--tiny" in md
    assert json.loads((out / "causal_lm.json").read_text())["rows"][0]["qat"] == row["qat"]
    assert (out / "causal_lm.png").stat().st_size > 0
