"""Smoke test of scripts/benchmarks/gpu_check.py (the one-GPU session script): all three stages at
toy sizes on the CPU under the Triton interpreter, so the first lent GPU is not spent finding a
script error. Its figures mean nothing; what is checked is that every stage runs and reports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "benchmarks" / "gpu_check.py"


def test_every_stage_runs_at_toy_size():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "tests/gpu/test_public_path.py::test_layer_step_auto_vs_reference" in out   # collected
    assert "48x64: path 'triton', check: 0 of 3072 codes differ" in out               # timings ran
    assert "training under 'triton'" in out and "training under 'reference'" in out
    assert "largest relative loss gap kernels vs reference" in out


def test_refuses_without_cuda():
    done = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert done.returncode == 2 and "needs a CUDA device" in done.stderr
