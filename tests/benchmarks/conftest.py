"""Loading a benchmark script (scripts/benchmarks/NAME.py) as a module for its tests."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "scripts" / "benchmarks"


@contextlib.contextmanager
def bench_script(name: str):
    """Yield scripts/benchmarks/NAME.py loaded as module ``NAME_benchmark``, with its folder on sys.path while
    it is used (the scripts import their siblings) and the module registered in sys.modules (dataclasses
    look their module up while the class is built); both are undone afterwards."""
    module_name = f"{name}_benchmark"
    sys.path.insert(0, str(BENCH_DIR))
    try:
        spec = importlib.util.spec_from_file_location(module_name, BENCH_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(module_name, None)
        sys.path.remove(str(BENCH_DIR))


@pytest.fixture(scope="session")
def load_bench_script():
    """``with load_bench_script("NAME") as module:`` (a fixture, so that test files need no import path)."""
    return bench_script
