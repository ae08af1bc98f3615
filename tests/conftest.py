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


SWAP_FILE_FAULTS = {  # how a swap file is damaged, and what the error must then say
    "corrupt": r"is corrupted: its checksum does not match",
    "truncate": r"is truncated: \d+ of \d+ bytes",
    "delete": r"is missing",
}


def damage_swap_file(path: Path, fault: str) -> None:
    """Damage a swap file as a failing disk or a careless user would (see SWAP_FILE_FAULTS)."""
    import os

    if fault == "corrupt":
        raw = bytearray(path.read_bytes())
        raw[0] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif fault == "truncate":
        os.truncate(path, 512)
    else:
        path.unlink()
