"""One short, seeded ZeRO-3 training run of a tiny Llama.

The demo, the integration tests and the benchmarks all need the same thing: train a model from the
tiny-model factory under a given DeepSpeed config and report the loss of every step, so that a
stock run and a tencache run can be compared step by step. Only DeepSpeed's public API is used
here; DeepSpeed internals stay in ``deepspeed_hooks.py``.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds_tencache.metrics import StepMetrics


@dataclass
class TrainingResult:
    losses: list[float]
    step_times_s: list[float]
    accelerator: str
    backend: str
    world_size: int
    zero_stage: int
    # per-step tencache records (None when the run had no active tencache block)
    tencache_steps: list[StepMetrics] | None = None
    plans_built: int = 0
    # pinned-memory figures of the NVMe parameter swapper (None without NVMe offload)
    host_tier: dict[str, Any] | None = None
    # figures of the NVMe optimizer-state swapper (None without NVMe optimizer offload)
    optimizer_tier: dict[str, Any] | None = None


def ensure_single_process_env() -> None:
    """Give ``torch.distributed`` a world of one when no launcher set one up.

    DeepSpeed needs RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT even for one process; a free loopback
    port avoids clashes between concurrent runs.
    """
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def train(model_dir: Path, ds_config: dict[str, Any], steps: int, seq_len: int = 64,
          seed: int = 0, initialize=None) -> TrainingResult:
    """Train ``steps`` steps and return per-step losses and wall times.

    ``initialize`` defaults to ``deepspeed.initialize``; passing ``ds_tencache.initialize`` is how
    a caller compares the two on identical model, data and seed.
    """
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoModelForCausalLM

    from ds_tencache.deepspeed_hooks import (host_tier_figures, optimizer_tier_figures,
                                             tencache_controller)
    from tiny_llama import causal_lm_batches

    ensure_single_process_env()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    torch.manual_seed(seed)
    batch_size = int(ds_config["train_micro_batch_size_per_gpu"])
    batches = causal_lm_batches(model_dir, batch_size, seq_len, steps, seed=seed + 1)
    # Loaded whole, then partitioned by deepspeed.initialize: transformers 5 cannot initialise a
    # model inside deepspeed.zero.Init unless its own HfDeepSpeedConfig integration is active.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine, *_ = (initialize or deepspeed.initialize)(
        model=model, model_parameters=model.parameters(), config=ds_config)
    losses, times = [], []
    device = engine.device
    for batch in batches:
        start = time.perf_counter()
        batch = batch.to(device)
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    result = TrainingResult(
        losses=losses, step_times_s=times,
        accelerator=get_accelerator().device_name(),
        backend=get_accelerator().communication_backend_name(),
        world_size=torch.distributed.get_world_size(),
        zero_stage=engine.zero_optimization_stage(),
    )
    controller = tencache_controller(engine)
    if controller is not None:
        controller.finish(time.perf_counter())
        result.tencache_steps = list(controller.reporter.history)
        result.plans_built = controller.plans_built
    result.host_tier = host_tier_figures(engine)
    result.optimizer_tier = optimizer_tier_figures(engine, steps)
    engine.destroy()
    return result
