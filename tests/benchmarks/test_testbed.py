"""scripts/benchmarks/testbed.py at toy sizes: byte-level tokenizer, cache under the fingerprint, and RTN rows
measured on exports reloaded by transformers (equal to the in-memory quantized model)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import transformers

# 8 pydoc topics + json's docstrings, a 2-layer model, 6 steps: seconds.
TINY = dict(modules=("json",), max_topics=8, hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, block=64,
            pretrain_steps=6, pretrain_batch=4, pretrain_warmup=2, bits=(8, 2))


@pytest.fixture(scope="module")
def testbed(load_bench_script):
    with load_bench_script("testbed") as module:
        yield module


def test_tiny_testbed(testbed, tmp_path):
    s = testbed.settings(**TINY)
    result = testbed.run(s, tmp_path / "cache", tmp_path / "work", max_blocks=None)
    folder = Path(result["model_dir"])
    assert folder.parent == tmp_path / "cache" and not result["reused_cache"]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    assert len(tok) == 257  # 256 byte symbols + EOS, no merges: byte-level
    assert testbed.run(s, tmp_path / "cache", tmp_path / "work", max_blocks=4)["reused_cache"]
    w8, w2 = result["rows"]
    # The export reloaded by transformers computes what the in-memory RTN model computed (fp32 sums only).
    for row in (w8, w2):
        assert row["perplexity"] == pytest.approx(row["in_memory_perplexity"], rel=1e-4)
    # W8 RTN is within 1% of float; W2 RTN is a different (worse) model even after 6 steps.
    assert abs(w8["increase"]) < 0.01 and w2["increase"] > 0.01
    assert math.isfinite(result["float_perplexity"]) and 1 < result["float_perplexity"] < 257
    # the jobs' dev split: held-out documents beyond every block the benchmarks score
    blocks = testbed.heldout_blocks(folder)
    dev = testbed.dev_file(folder, tmp_path / "dev", scored_blocks=1)
    heldout = (folder / "heldout.jsonl").read_text().splitlines()
    dev_lines = dev.read_text().splitlines()
    assert dev_lines == heldout[len(heldout) // 2:] and not set(dev_lines) & set(heldout[: len(heldout) // 2])
    with pytest.raises(ValueError, match="score fewer blocks"):
        testbed.dev_file(folder, tmp_path / "dev", scored_blocks=len(blocks) + 1)
