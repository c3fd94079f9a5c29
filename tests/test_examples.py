"""examples/: each float script and its qat version differ in at most three lines, and both run.

Each pair runs for a few steps on the tiny Llama the examples build offline; the qat export is then loaded
with AutoModelForCausalLM, checked against qat's own reader of the same files, and generates.
"""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import qat

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PAIRS = [("peft_sft.py", "qat_peft_sft.py"), ("trl_sft.py", "qat_trl_sft.py")]
STEPS = 6


def changed_lines(before: list[str], after: list[str]) -> int:
    """Lines changed between two files: a replaced line counts once, an added or removed line once."""
    ops = difflib.SequenceMatcher(a=before, b=after, autojunk=False).get_opcodes()
    return sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops if tag != "equal")


def test_changed_lines_counts_what_a_reader_sees():
    base = ["import a", "x = f(1)", "y = g(x)"]
    assert changed_lines(base, base) == 0
    assert changed_lines(base, ["import a", "import b", "x = h(1)", "y = g(x)"]) == 2
    assert changed_lines(base, ["x = f(1)", "y = g(x)", "z = 1", "w = 2"]) == 3


@pytest.mark.parametrize("pair", PAIRS, ids=[p[1] for p in PAIRS])
def test_each_pair_differs_in_at_most_three_lines(pair):
    before, after = ((EXAMPLES / name).read_text().splitlines() for name in pair)
    assert 1 <= changed_lines(before, after) <= 3
    assert any(line.startswith("import qat") for line in after)


def _run(script: str, out: Path) -> str:
    # A fresh process per script, run as a user would (python examples/x.py), from the repository root.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--output_dir", str(out), "--max_steps",
                           str(STEPS)], capture_output=True, text=True, timeout=600, env=env,
                          cwd=EXAMPLES.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def tiny():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import tiny as module
    finally:
        sys.path.remove(str(EXAMPLES))
    return module


@pytest.mark.parametrize("pair", PAIRS, ids=[p[1] for p in PAIRS])
def test_both_scripts_run_and_the_qat_export_loads_and_generates(pair, tmp_path, tiny):
    float_script, qat_script = pair
    float_out = _run(float_script, tmp_path / "float")
    qat_out = _run(qat_script, tmp_path / "qat")
    assert "What is 3 plus 4? ->" in float_out and "What is 3 plus 4? ->" in qat_out
    assert (tmp_path / "float" / "adapter_config.json").exists()  # peft saved its adapter, as before

    export = tmp_path / "qat"
    config = transformers.AutoConfig.from_pretrained(export)
    assert config.quantization_config["format"] == "pack-quantized"
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)  # the tokenizer went with the export
    model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    ids = tokenizer("What is 3 plus 4?", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
        generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    # at least one new token (greedy decoding may stop early at EOS, which the TRL pair learns to emit)
    assert ids.shape[1] < generated.shape[1] <= ids.shape[1] + 4 and torch.equal(generated[0, : ids.shape[1]], ids[0])
    assert generated[0, ids.shape[1]].item() == logits[0, -1].argmax().item()  # generate used these logits
    # qat's own reader of the same files (unpacks the codes itself): the numerics compressed-tensors
    # decompresses agree up to fp32 summation order.
    mine = qat.load_quantized(export)
    with torch.no_grad():
        torch.testing.assert_close(mine(ids).logits, logits, atol=1e-5, rtol=1e-5)
    # Training moved the model away from the quantized starting point (same seed, same quantizer).
    start = tiny.llama(tokenizer)
    qat.quantize_model(start, qat.QuantConfig(bits=4, group_size=32))
    with torch.no_grad():
        assert (start(ids).logits - logits).abs().max() > 1e-3
    for printed in (float_out, qat_out):  # both trained STEPS steps to a finite loss
        summary = next(line for line in printed.splitlines() if "'train_loss'" in line)
        assert 0 < float(summary.split("'train_loss': '")[1].split("'")[0]) < 10
