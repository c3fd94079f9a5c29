"""Smoke test of scripts/benchmarks/speed_memory.py: a tiny model, float LoRA and one qat row."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "benchmarks"


def _load_script():
    """The script is not a package module: load it by path (its folder first, for bench_common)."""
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("speed_memory", BENCH / "speed_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_sane_ratios(tmp_path):
    script = _load_script()
    # Each row is a fresh subprocess, as in the real run.
    assert script.main(["--quick", "--threads", "1", "--rows", "float_lora,qat_s4_lora", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "speed_memory.json").read_text())
    rows = data["rows"]
    assert list(rows) == ["float_lora", "qat_s4_lora"]
    ref, q4 = rows["float_lora"], rows["qat_s4_lora"]
    assert ref["time_ratio"] == 1.0 and ref["memory_ratio"] == 1.0 and ref["peak_ratio"] == 1.0
    for r in rows.values():
        assert r["seconds_per_step"] > 0 and r["time_ratio"] > 0 and r["memory_ratio"] > 0
        assert r["peak_bytes"] > r["baseline_bytes"] > 0 and r["trainable"] > 0
    # 4-bit codes + one step per 32 weights: well under a quarter of the float32 projections.
    assert 0 < q4["base_linear_bytes"] < ref["base_linear_bytes"] / 4
    assert q4["model_bytes"] < ref["model_bytes"]
    assert q4["rebuild_seconds"] > 0 and "rebuild_seconds" not in ref
    text = (tmp_path / "speed_memory.md").read_text()
    assert "| qat_s4_lora |" in text and "target <= 0.4x" in text
    assert (tmp_path / "speed_memory.png").stat().st_size > 0
    # --render rewrites the report from the JSON alone, with the same numbers.
    again = tmp_path / "again"
    assert script.main(["--render", str(tmp_path / "speed_memory.json"), "--out", str(again)]) == 0
    assert (again / "speed_memory.md").read_text() == text
