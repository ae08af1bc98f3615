"""tencache's NVMe tier inside real DeepSpeed ZeRO-Infinity (CPU accelerator, gloo, DeepSpeed's aio).

The tiny model's partitions are all under 1 MiB, which ZeRO-Infinity never swaps; tencache stages
every size, so with a CPU tier of a third of the model most of it really lives on NVMe here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine_runs import checkpoint_round_trip, train_steps, two_ranks
from swap_faults import SWAP_FILE_FAULTS, damage_swap_file

pytestmark = pytest.mark.integration

STEPS = 50
WARMUP = 2


@pytest.fixture(scope="module")
def model_bytes(tiny_model_dir) -> int:
    """Parameter bytes of the tiny model in bf16."""
    return json.loads((tiny_model_dir / "manifest.json").read_text())["num_parameters"] * 2


def nvme_config(project_root: Path, swap: Path, dtype: str = "bf16", tencache: dict | None = None) -> dict:
    config = json.loads((project_root / "configs" / "zero3_cpu_offload.json").read_text())
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    zero = config["zero_optimization"]
    zero["offload_param"] = {"device": "nvme", "nvme_path": str(swap), "pin_memory": True,
                             "max_in_cpu": 0}
    zero["stage3_prefetch_bucket_size"] = 0  # stock's NVMe prefetch fails here (see the benchmark)
    if tencache is not None:
        config["tencache"] = tencache
    return config


def tier_block(model_bytes: int, **extra) -> dict:
    # A third of the model in pinned memory, half of it gathered at most: most partitions stream.
    return {"device_budget": model_bytes // 2, "cpu_budget": model_bytes // 3,
            "warmup_steps": WARMUP, **extra}


def test_bf16_losses_identical_to_stock_with_most_of_the_model_on_nvme(
        tmp_path, project_root, tiny_model_dir, model_bytes):
    import ds_tencache
    from ds_tencache.training_run import train

    stock = train(tiny_model_dir, nvme_config(project_root, tmp_path / "stock"), steps=STEPS)
    ours = train(tiny_model_dir,
                 nvme_config(project_root, tmp_path / "ours", tencache=tier_block(model_bytes)),
                 steps=STEPS, initialize=ds_tencache.initialize)
    assert ours.losses == stock.losses  # bitwise, every step
    tier = ours.host_tier
    assert tier["pinned_bytes_reserved"] == model_bytes // 3
    assert tier["allocations_after_warmup"] == 0
    assert 0 < tier["cpu_resident_bytes"] < model_bytes // 3
    assert tier["packed_partitions"] == 9  # the RMSNorm weights (256 bytes each) share one buffer
    planned = [m for m in ours.tencache_steps if m.phase == "planned"]
    assert len(planned) == STEPS - WARMUP
    # The streamed part of the model is read back from NVMe every step.
    streamed = model_bytes - tier["cpu_resident_bytes"]
    assert min(m.bytes_moved.get("nvme_to_cpu", 0) for m in planned) >= streamed
    assert min(m.hit_rate for m in planned) >= 0.99
    assert stock.host_tier["pinned_bytes_reserved"] > 0  # ZeRO-Infinity's own slots


def test_fp32_nvme_offload_works_where_stock_fails(tmp_path, project_root):
    import ds_tencache
    from ds_tencache.training_run import train
    from tiny_llama import ensure_model

    # The small model: ZeRO-Infinity swaps only partitions of 1 MiB and more, and it sizes its
    # swap slots by zero.Init's dtype, bf16 here for an fp32 model (operator precedence in
    # Init._set_dtype). If upstream fixes it, this test says so.
    small = ensure_model("small")
    fp32_bytes = json.loads((small / "manifest.json").read_text())["num_parameters"] * 4
    with pytest.raises(RuntimeError, match="(?i)float.*bfloat16|bfloat16.*float"):
        train(small, nvme_config(project_root, tmp_path / "stock", "fp32"), steps=2)
    cpu = json.loads((project_root / "configs" / "zero3_cpu_offload.json").read_text())
    reference = train(small, cpu, steps=4)
    ours = train(small, nvme_config(project_root, tmp_path / "ours", "fp32", tier_block(fp32_bytes)),
                 steps=4, initialize=ds_tencache.initialize)
    assert ours.plans_built == 1 and ours.host_tier["cpu_resident_bytes"] < fp32_bytes
    assert ours.losses == reference.losses  # fp32 through NVMe == fp32 in host memory


def test_fp16_cannot_be_tested_on_the_cpu_accelerator(tmp_path, project_root, tiny_model_dir,
                                                      model_bytes):
    """The tier keeps each partition in its parameter's own dtype, fp16 included, but DeepSpeed
    refuses fp16 training on the CPU accelerator, so only a GPU run can show it. When DeepSpeed
    lifts this, this test fails and an fp16 twin of the bf16 test belongs here."""
    import ds_tencache
    from ds_tencache.training_run import train

    config = nvme_config(project_root, tmp_path, "fp32", tier_block(model_bytes))
    config["fp16"] = {"enabled": True}
    with pytest.raises(ValueError, match="Type fp16 is not supported on your device"):
        train(tiny_model_dir, config, steps=1, initialize=ds_tencache.initialize)


def test_two_ranks_identical_to_stock(tmp_path, project_root, tiny_model_dir, model_bytes):
    stock = two_ranks(tmp_path, tiny_model_dir, nvme_config(project_root, tmp_path / "s"), "stock", 12)
    # Each rank holds half of every partition: a sixth of the model per rank's CPU tier.
    ours = two_ranks(tmp_path, tiny_model_dir,
                     nvme_config(project_root, tmp_path / "o", tencache=tier_block(model_bytes // 2)),
                     "ours", 12)
    for rank in range(2):
        assert ours[rank]["losses"] == stock[rank]["losses"]
        assert ours[rank]["phases"].count("planned") == 12 - WARMUP
        assert ours[rank]["tier"]["allocations_after_warmup"] == 0


# --- faults: each stops training with the file and the cause ------------------------------------

def _engine(project_root, model_dir, swap: Path, model_bytes: int, **extra):
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    import ds_tencache
    from ds_tencache.training_run import ensure_single_process_env

    ensure_single_process_env()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = nvme_config(project_root, swap, tencache=tier_block(model_bytes, **extra))
    engine, *_ = ds_tencache.initialize(model=model, model_parameters=model.parameters(),
                                        config=config)
    return engine


def _store(engine):
    from ds_tencache.deepspeed_hooks import TieredParameterSwapper

    return next(p.nvme_swapper for p in engine.module.parameters()
                if isinstance(getattr(p, "nvme_swapper", None), TieredParameterSwapper))


def _streamed_file(engine) -> Path:
    store = _store(engine)
    store.synchronize_writes()
    param_id = min(p for p in store.partition_bytes if p not in store.layout.cpu_resident)
    return Path(store.files.path(param_id))


@pytest.mark.parametrize("fault, message", SWAP_FILE_FAULTS.items())
def test_damaged_swap_file_stops_training_naming_it(tmp_path, project_root, tiny_model_dir,
                                                    model_bytes, fault, message):
    from ds_tencache.tiers import SwapFileError

    engine = _engine(project_root, tiny_model_dir, tmp_path / "swap", model_bytes)
    train_steps(engine, tiny_model_dir, WARMUP + 1)
    path = _streamed_file(engine)
    damage_swap_file(path, fault)
    with pytest.raises(SwapFileError, match=rf"{path}.*{message}|{message}"):
        train_steps(engine, tiny_model_dir, 1)
    engine.destroy()


def test_checksums_off_is_the_users_choice(tmp_path, project_root, tiny_model_dir, model_bytes):
    engine = _engine(project_root, tiny_model_dir, tmp_path / "swap", model_bytes,
                     verify_checksums=False)
    train_steps(engine, tiny_model_dir, WARMUP + 1)
    assert not _store(engine).files.verify
    engine.destroy()


def test_full_disk_stops_the_write_back(tmp_path, project_root, tiny_model_dir, model_bytes,
                                        monkeypatch):
    from ds_tencache.tiers import SwapFileError

    engine = _engine(project_root, tiny_model_dir, tmp_path / "swap", model_bytes)
    train_steps(engine, tiny_model_dir, WARMUP + 1)
    monkeypatch.setattr("shutil.disk_usage", lambda _: type("Usage", (), {"free": 0})())
    with pytest.raises(SwapFileError, match=r"swap/tencache/rank0: disk full \(No space left on device\); \d+ bytes to write, 0 free"):
        train_steps(engine, tiny_model_dir, 1)


def test_unwritable_folder_is_refused_at_start(tmp_path, project_root, tiny_model_dir, model_bytes):
    from ds_tencache.tiers import SwapFileError

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(SwapFileError, match=rf"NVMe tier folder {blocker}/tencache/rank0 is not writable"):
        _engine(project_root, tiny_model_dir, blocker, model_bytes)


def test_swap_files_are_removed_at_exit(tmp_path, project_root, tiny_model_dir, model_bytes):
    swap = tmp_path / "swap"
    script = f"""
import json, sys
sys.path.insert(0, {str(project_root)!r})
sys.path.insert(0, {str(Path(__file__).parent)!r})
from tiny_llama.environment import apply_runtime_defaults
apply_runtime_defaults()
import ds_tencache
from ds_tencache.training_run import train
from test_tencache_nvme import nvme_config, tier_block
from pathlib import Path
config = nvme_config(Path({str(project_root)!r}), Path({str(swap)!r}), tencache=tier_block({model_bytes}))
train(Path({str(tiny_model_dir)!r}), config, steps=3, initialize=ds_tencache.initialize)
print("files during the run:", len(list(Path({str(swap)!r}).rglob("*.swp"))))
"""
    # a world of its own: this process's distributed settings point at its own rendezvous
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "files during the run: 0" not in done.stdout
    assert not list(swap.rglob("*.swp"))


def test_checkpoint_round_trip_resumes_like_stock(tmp_path, project_root, tiny_model_dir,
                                                 model_bytes):
    """Stock ZeRO-Infinity cannot load this checkpoint at all (its fp16 restore needs a host
    buffer that partitions on NVMe do not have); tencache restores them to their tier. DeepSpeed's
    own round trip (parameters in host memory) is the reference: its first resumed step equals
    the uninterrupted run and later steps drift in the last digits (the CPU Adam op keeps state
    that checkpoints do not carry), and tencache's resumed losses equal it bitwise."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from ds_tencache.training_run import ensure_single_process_env

    def host_memory_engine(_swap: Path):
        ensure_single_process_env()
        deepspeed.init_distributed(dist_backend="gloo")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        config = json.loads((project_root / "configs" / "zero3_cpu_offload.json").read_text())
        config["bf16"] = {"enabled": True}
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=config)
        return engine

    def our_engine(swap: Path):
        return _engine(project_root, tiny_model_dir, swap, model_bytes)

    reference_expected, reference = checkpoint_round_trip(host_memory_engine, tiny_model_dir, tmp_path, "host")
    expected, ours = checkpoint_round_trip(our_engine, tiny_model_dir, tmp_path, "nvme")
    assert expected == reference_expected
    assert ours[0] == expected[5]
    assert ours == reference
