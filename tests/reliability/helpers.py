"""Shared pieces of the fault-injection suite: a tiny local model, small recipes, CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.trainers.helpers import chat_jsonl, text_file, tiny_llama_dir  # noqa: F401  (re-exported)

REPO = Path(__file__).resolve().parents[2]
SFT = REPO / "scripts" / "recipes" / "causal_lm_sft.yaml"


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """A seconds-long `qat train` on the tiny Llama: 32 tokens, rank 4, no evaluation during training."""
    return ["--config", str(SFT), "--model_name_or_path", str(model), "--dataset", str(data),
            "--output_dir", str(out), "--max_length", "64", "--adapter_rank", "4", "--gradient_accumulation_steps",
            "1", "--per_device_train_batch_size", "4", "--eval_ratio", "0.2", "--logging_steps", "1",
            "--save_steps", "1", "--eval_strategy", "no", "--disable_tqdm", "true", "--max_eval_samples", "8",
            "--warmup_steps", "0", *extra]


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    """`qat ARGV` as the interpreter runs it: SystemExit(str) prints the string to stderr and exits 1;
    any other exception propagates (a traceback: the test fails). Returns (exit code, stderr)."""
    from qat.cli import main

    message = ""
    try:
        code = main(argv)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
        message = done.code if isinstance(done.code, str) else ""
    err = capsys.readouterr().err
    return code, (err + message + "\n") if message else err


def run_subprocess(args: list[str], cwd: Path, timeout: int = 300, code: str | None = None):
    """A real `qat` process (or ``python -c code`` with ``args`` as argv) in ``cwd`` (never the repo
    root: its kernels/ folder would shadow the installed package)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ""}
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-c", "import sys; from qat.cli import "
                                                                "main; sys.exit(main())", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def one_line_error(stderr: str, expected: str) -> None:
    """The failure is one sentence on stderr that contains ``expected``, and no Python traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("qat")]
    assert any(expected in line for line in lines), stderr[-3000:]
