"""Smoke test of scripts/benchmarks/kernels_gpu.py: every table on tiny shapes, on the CPU under
the Triton interpreter (``--device cpu``, where the script uses use_kernels("triton") for the
public calls it makes under "auto" on CUDA). The timings mean nothing here; what is checked is
that the script runs end to end (every public call, baseline and ratio column), so the first lent
GPU is not spent finding a script error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "benchmarks" / "kernels_gpu.py"
ARGS = ["--device", "cpu", "--shapes", "48x64", "--tokens", "16", "--iters", "1", "--warmup", "0",
        "--group-size", "32", "--rank", "4", "--pack-shapes", "8x40", "--pack-bits", "3"]


def _run(*extra, interpret="1"):
    env = dict(os.environ, TRITON_INTERPRET=interpret, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *ARGS, *extra], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def _rows(stdout: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("|")] for line in stdout.splitlines()
            if line.strip().startswith(first_cell)]


def test_every_table_runs_on_the_interpreter():
    done = _run()
    assert done.returncode == 0, done.stderr[-3000:]
    # the public path against the reference first
    assert "48x64: path 'triton', check: 0 of 3072 codes differ" in done.stdout
    main, wht = [r for r in _rows(done.stdout, "48x64") if len(r) > 1]
    pack = _rows(done.stdout, "8x40")[0]
    assert len(main) == 13 and main[1] == "16"
    assert all(c.endswith("ms") for c in main[2:11]), main   # every timed row ran (bnb NF4 works on CPU)
    assert all(c.endswith("x") for c in main[11:]), main     # vs bnb, vs bf16
    assert len(wht) == 10 and all(c.endswith("ms") for c in wht[2:9]), wht
    assert pack[1] == "3" and pack[2].endswith("ms") and pack[5].endswith("ms"), pack


def test_refuses_to_run_without_cuda_or_interpreter():
    done = _run(interpret="0")
    assert done.returncode == 2 and "TRITON_INTERPRET=1" in done.stderr
