"""Shared fixtures: an offline environment and the cached tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_llama.environment import apply_runtime_defaults

# Before any test imports transformers or vLLM: no hub exists here, so never try one.
apply_runtime_defaults()


@pytest.fixture(scope="session")
def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The ~1M-parameter model, built once per machine into the shared cache."""
    from tiny_llama import ensure_model

    return ensure_model("tiny")

