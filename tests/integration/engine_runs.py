"""Training runs shared by the tencache integration tests: a built engine on the tiny model's
seeded batches, a checkpoint round trip, and a two-rank run."""

from __future__ import annotations

import copy
import json
import os
import socket
from pathlib import Path


def train_steps(engine, model_dir, count: int, skip: int = 0) -> list[float]:
    """Train on batches ``skip`` to ``count`` of the seeded sequence; their losses."""
    from tiny_llama import causal_lm_batches

    losses = []
    for batch in causal_lm_batches(model_dir, 4, 64, count, seed=1)[skip:]:
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def checkpoint_round_trip(engine_at, model_dir, tmp_path: Path, name: str) -> tuple[list[float], list[float]]:
    """Losses of 8 uninterrupted steps, and of steps 6-8 after a save at step 5 and a reload.

    ``engine_at(folder)`` builds a fresh engine whose swap files go under ``folder``.
    """
    uninterrupted = engine_at(tmp_path / f"{name}-a")
    expected = train_steps(uninterrupted, model_dir, 8)
    uninterrupted.destroy()
    saver = engine_at(tmp_path / f"{name}-b")
    assert train_steps(saver, model_dir, 5) == expected[:5]
    saver.save_checkpoint(str(tmp_path / f"{name}-ckpt"), tag="step5")
    saver.destroy()
    resumed = engine_at(tmp_path / f"{name}-c")
    resumed.load_checkpoint(str(tmp_path / f"{name}-ckpt"), tag="step5")
    losses = train_steps(resumed, model_dir, 8, skip=5)
    resumed.destroy()
    return expected, losses


def _rank_worker(rank: int, world: int, port: int, model_dir: str, config: dict, out: str,
                 steps: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import ds_tencache
    from ds_tencache.training_run import train
    from tiny_llama.environment import apply_runtime_defaults

    apply_runtime_defaults()
    config = copy.deepcopy(config)
    offload = config["zero_optimization"].get("offload_param", {})
    if "nvme_path" in offload:  # each rank its own folder for stock (tencache adds rank<N> itself)
        offload["nvme_path"] += f"-{rank}"
    result = train(model_dir, config, steps=steps, initialize=ds_tencache.initialize)
    steps_seen = result.tencache_steps or []
    Path(f"{out}.{rank}").write_text(json.dumps(
        {"losses": result.losses, "world": result.world_size, "tier": result.host_tier,
         "phases": [m.phase for m in steps_seen],
         "planned_hits": [m.hit_rate for m in steps_seen if m.phase == "planned"]}))


def two_ranks(tmp_path: Path, model_dir, config: dict, name: str, steps: int) -> list[dict]:
    """Train ``steps`` steps on two gloo ranks through ``ds_tencache.initialize`` (stock ZeRO-3
    when the config has no active tencache block); each rank's losses, world size, NVMe tier
    figures, step phases and planned hit rates."""
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = str(tmp_path / name)
    mp.spawn(_rank_worker, args=(2, port, str(model_dir), config, out, steps), nprocs=2)
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(2)]
