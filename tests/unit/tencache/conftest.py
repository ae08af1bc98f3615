"""Fixtures of the tencache unit tests: the benchmark scripts, importable as modules."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"


def _benchmark(name: str) -> Iterator[ModuleType]:
    """``benchmarks/<name>.py`` as a module (benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[name]


@pytest.fixture(scope="module")
def sim_bench() -> Iterator[ModuleType]:
    yield from _benchmark("tencache_sim")


@pytest.fixture(scope="module")
def gpu_bench() -> Iterator[ModuleType]:
    yield from _benchmark("tencache_gpu")


@pytest.fixture(scope="module")
def train_bench() -> Iterator[ModuleType]:
    yield from _benchmark("tencache_train")
