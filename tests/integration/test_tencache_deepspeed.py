"""ds_tencache inside real DeepSpeed ZeRO-3 (CPU accelerator, gloo): same losses, higher hit rate."""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

STEPS = 50
WARMUP = 2


@pytest.fixture(scope="module")
def base_config(project_root) -> dict:
    return json.loads((project_root / "configs" / "zero3_cpu_offload.json").read_text())


@pytest.fixture(scope="module")
def half_model_bytes(tiny_model_dir) -> int:
    manifest = json.loads((tiny_model_dir / "manifest.json").read_text())
    return manifest["num_parameters"] * 4 // 2  # fp32 parameters, half of them fit


def variant(config: dict, optimizer_offload: bool, tencache: dict | None = None) -> dict:
    config = copy.deepcopy(config)
    if not optimizer_offload:
        del config["zero_optimization"]["offload_optimizer"]
    if tencache is not None:
        config["tencache"] = tencache
    return config


@pytest.mark.parametrize("optimizer_offload", [True, False], ids=["optimizer-offload", "no-optimizer-offload"])
def test_losses_identical_to_stock_with_high_hit_rate(tiny_model_dir, base_config, half_model_bytes,
                                                     optimizer_offload):
    import ds_tencache
    from ds_tencache.training_run import train

    stock = train(tiny_model_dir, variant(base_config, optimizer_offload), steps=STEPS)
    ours = train(tiny_model_dir,
                 variant(base_config, optimizer_offload,
                         {"device_budget": half_model_bytes, "warmup_steps": WARMUP}),
                 steps=STEPS, initialize=ds_tencache.initialize)
    assert stock.tencache_steps is None
    assert ours.losses == stock.losses  # bitwise, every step
    assert ours.plans_built == 1
    planned = [m for m in ours.tencache_steps if m.phase == "planned"]
    assert len(planned) == STEPS - WARMUP
    assert min(m.hit_rate for m in planned) >= 0.99
    # Half the model fits: the plan must really re-fetch, not hold everything.
    gathered = planned[-1].bytes_moved["cpu_to_device"]
    assert gathered > half_model_bytes * 2


def test_plain_deepspeed_initialize_activates_after_import(tiny_model_dir, base_config, half_model_bytes):
    import ds_tencache  # noqa: F401  (binds tencache to DeepSpeed)
    from ds_tencache.training_run import train

    result = train(tiny_model_dir, variant(base_config, True, {"device_budget": half_model_bytes}),
                   steps=4)
    assert result.tencache_steps is not None and result.plans_built == 1


def test_disabled_block_is_stock(tiny_model_dir, base_config):
    import ds_tencache
    from ds_tencache.training_run import train

    result = train(tiny_model_dir, variant(base_config, True, {"enabled": False}), steps=2,
                   initialize=ds_tencache.initialize)
    assert result.tencache_steps is None


@pytest.mark.parametrize("tencache, stage, message", [
    ({"warmup_step": 2}, 3, r"tencache\.warmup_step: unknown key"),
    ({"device_budget": -1}, 3, r"tencache\.device_budget = -1: must be at least 0 bytes"),
    ({}, 2, r"zero_optimization.stage is 2"),
])
@pytest.mark.parametrize("entry", ["ds_tencache.initialize", "deepspeed.initialize"])
def test_bad_config_stops_before_training(tiny_model_dir, base_config, tencache, stage, message, entry):
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    import ds_tencache
    from ds_tencache.config import TencacheConfigError
    from ds_tencache.training_run import ensure_single_process_env

    ensure_single_process_env()
    config = variant(base_config, True, tencache)
    config["zero_optimization"]["stage"] = stage
    if stage != 3:
        del config["zero_optimization"]["offload_param"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    initialize = ds_tencache.initialize if entry == "ds_tencache.initialize" else deepspeed.initialize
    with pytest.raises(TencacheConfigError, match=message):
        initialize(model=model, model_parameters=model.parameters(), config=config)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, model_dir: str, config: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import ds_tencache
    from ds_tencache.training_run import train
    from tiny_llama.environment import apply_runtime_defaults

    apply_runtime_defaults()
    result = train(model_dir, config, steps=STEPS, initialize=ds_tencache.initialize)
    planned = [m.hit_rate for m in result.tencache_steps or [] if m.phase == "planned"]
    Path(f"{out}.{rank}").write_text(json.dumps(
        {"losses": result.losses, "world": result.world_size, "planned_hits": planned}))


def _run_two_ranks(tmp_path, tiny_model_dir, config, name) -> list[dict]:
    import torch.multiprocessing as mp

    out = str(tmp_path / name)
    mp.spawn(_rank_worker, args=(2, _free_port(), str(tiny_model_dir), config, out), nprocs=2)
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]


def test_two_ranks_identical_to_stock(tmp_path, tiny_model_dir, base_config, half_model_bytes):
    stock = _run_two_ranks(tmp_path, tiny_model_dir, variant(base_config, True), "stock")
    ours = _run_two_ranks(tmp_path, tiny_model_dir,
                          variant(base_config, True, {"device_budget": half_model_bytes}), "tencache")
    for rank in range(2):
        assert stock[rank]["world"] == ours[rank]["world"] == 2
        assert ours[rank]["losses"] == stock[rank]["losses"]
        assert stock[rank]["planned_hits"] == []
        assert len(ours[rank]["planned_hits"]) == STEPS - WARMUP
        assert min(ours[rank]["planned_hits"]) >= 0.99
