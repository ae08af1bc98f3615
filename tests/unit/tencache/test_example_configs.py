"""Every example DeepSpeed config in configs/ with a tencache block validates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ds_tencache.config import from_ds_config

pytestmark = pytest.mark.unit

CONFIGS = sorted((Path(__file__).resolve().parents[3] / "configs").glob("zero3*.json"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_config_is_valid(path):
    config = json.loads(path.read_text())
    parsed = from_ds_config(path)
    assert (parsed is not None) == ("tencache" in config)
