"""ds_tencache inside real DeepSpeed ZeRO-3 (CPU accelerator, gloo): same losses, higher hit rate."""

from __future__ import annotations

import copy
import json
import time

import pytest
from engine_runs import two_ranks

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


def test_two_ranks_identical_to_stock(tmp_path, tiny_model_dir, base_config, half_model_bytes):
    stock = two_ranks(tmp_path, tiny_model_dir, variant(base_config, True), "stock", STEPS)
    ours = two_ranks(tmp_path, tiny_model_dir,
                     variant(base_config, True, {"device_budget": half_model_bytes}), "tencache", STEPS)
    for rank in range(2):
        assert stock[rank]["world"] == ours[rank]["world"] == 2
        assert ours[rank]["losses"] == stock[rank]["losses"]
        assert stock[rank]["planned_hits"] == []
        assert len(ours[rank]["planned_hits"]) == STEPS - WARMUP
        assert min(ours[rank]["planned_hits"]) >= 0.99


def _hf_trainer_losses(tmp_path, model_dir, ds_config: dict, name: str):
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from ds_tencache.training_run import ensure_single_process_env
    from tiny_llama import causal_lm_batches

    ensure_single_process_env()
    config_path = tmp_path / f"{name}.json"
    config_path.write_text(json.dumps(ds_config))
    torch.manual_seed(0)
    data = [{"input_ids": b[0], "labels": b[0]} for b in causal_lm_batches(model_dir, 1, 64, 24)]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = TrainingArguments(output_dir=str(tmp_path / name), deepspeed=str(config_path),
                             per_device_train_batch_size=4, max_steps=6, learning_rate=1e-3,
                             logging_steps=1, report_to=[], save_strategy="no", seed=0,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    try:
        trainer.train()
    finally:
        # TrainingArguments(deepspeed=...) registers a process-wide ZeRO-3 flag in transformers;
        # left set, every later from_pretrained in this process would build under zero.Init.
        unset_hf_deepspeed_config()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, trainer


def test_hugging_face_trainer_uses_the_block_unchanged(tmp_path, tiny_model_dir, base_config,
                                                        half_model_bytes):
    import ds_tencache

    hf_config = variant(base_config, True)
    hf_config["train_micro_batch_size_per_gpu"] = "auto"  # Trainer fills these in
    hf_config["optimizer"]["params"]["lr"] = "auto"
    stock, _ = _hf_trainer_losses(tmp_path, tiny_model_dir, hf_config, "stock")
    ours, trainer = _hf_trainer_losses(
        tmp_path, tiny_model_dir, {**hf_config, "tencache": {"device_budget": half_model_bytes}},
        "tencache")
    controller = ds_tencache.tencache_controller(trainer.model_wrapped)
    assert controller is not None and controller.plans_built == 1
    assert len(stock) == 6 and ours == stock


def _train_dynamic(config: dict, skip_from: int, steps: int, initialize):
    """A model whose forward skips a layer from step ``skip_from`` on (dynamic control flow)."""
    import deepspeed
    import torch

    from ds_tencache.training_run import ensure_single_process_env

    class Skipping(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(4))
            self.head = torch.nn.Linear(64, 1)
            self.skip = False

        def forward(self, x):
            for index, layer in enumerate(self.layers):
                if not (self.skip and index == 2):
                    x = torch.relu(layer(x))
            return self.head(x)

    ensure_single_process_env()
    torch.manual_seed(0)
    model = Skipping()
    data = torch.randn(steps, 8, 64, generator=torch.Generator().manual_seed(1))
    engine, *_ = initialize(model=model, model_parameters=model.parameters(), config=config)
    losses = []
    for step in range(steps):
        model.skip = step >= skip_from
        loss = engine(data[step]).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    import ds_tencache

    controller = ds_tencache.tencache_controller(engine)
    engine.destroy()
    return losses, controller


def test_changed_execution_order_reprofiles_and_keeps_losses(base_config):
    import deepspeed

    import ds_tencache

    config = variant(base_config, True)
    config["train_micro_batch_size_per_gpu"] = 8
    stock, _ = _train_dynamic(config, skip_from=6, steps=14, initialize=deepspeed.initialize)
    budget = 3 * (64 * 64 + 64) * 4  # three of the five layers
    ours, controller = _train_dynamic({**config, "tencache": {"device_budget": budget}},
                                      skip_from=6, steps=14, initialize=ds_tencache.initialize)
    assert ours == stock
    # Plan at step 2; step 6 departs from it; steps 7-8 re-profile; a new plan from step 9.
    assert controller.plans_built == 2
    controller.finish(time.perf_counter())
    phases = [m.phase for m in controller.reporter.history]
    assert phases[:2] == ["profiling"] * 2 and phases[2:6] == ["planned"] * 4
    assert phases[6:9] == ["profiling"] * 3 and set(phases[9:]) == {"planned"}
