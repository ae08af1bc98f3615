"""The tencache block: defaults, sizes, and a clear error naming the key for every mistake."""

from __future__ import annotations

import json

import pytest

from ds_tencache.config import (TencacheConfigError, from_ds_config, nvme_tier_active,
                                optimizer_tier_active, parse_block)

pytestmark = pytest.mark.unit


def ds_config(tencache=None, stage=3, offload=None, **extra):
    config = {"train_micro_batch_size_per_gpu": 1,
              "zero_optimization": {"stage": stage, "offload_param": offload or {"device": "cpu"}}}
    if tencache is not None:
        config["tencache"] = tencache
    config.update(extra)
    return config


def test_defaults_when_block_is_empty():
    config = from_ds_config(ds_config({}))
    assert config.enabled and config.warmup_steps == 2
    assert config.device_budget == "auto" and config.prefetch_lookahead == "auto"
    assert config.verify_checksums and config.metrics.every_n_steps == 1
    assert config.pool.alignment_bytes == 4096


def test_no_block_or_disabled_means_stock():
    assert from_ds_config(ds_config()) is None
    assert from_ds_config(ds_config({"enabled": False})) is None
    assert from_ds_config(ds_config(False)) is None
    assert from_ds_config(ds_config(True)).enabled


@pytest.mark.parametrize("written, expected", [
    (1048576, 1 << 20), (1e6, 10**6), ("512MiB", 512 << 20), ("1.5GB", 1_500_000_000),
    ("64 kib", 64 << 10), ("AUTO", "auto"),
])
def test_sizes_accept_numbers_and_units(written, expected):
    assert parse_block({"device_budget": written}).device_budget == expected


def test_reads_a_json_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds_config({"warmup_steps": 3})))
    assert from_ds_config(path).warmup_steps == 3
    assert from_ds_config(str(path)).warmup_steps == 3


@pytest.mark.parametrize("block, message", [
    ({"warmup_step": 2}, r"tencache\.warmup_step: unknown key; allowed keys here: enabled, warmup_steps"),
    ({"metrics": {"every": 2}}, r"tencache\.metrics\.every: unknown key; allowed keys here: path, every_n_steps"),
    ({"warmup_steps": "two"}, r"tencache\.warmup_steps = 'two': Input should be a valid integer"),
    ({"warmup_steps": 0}, r"tencache\.warmup_steps = 0: Input should be greater than or equal to 1"),
    ({"device_budget": -5}, r"tencache\.device_budget = -5: must be at least 0 bytes"),
    ({"cpu_budget": "12 parsecs"}, r"tencache\.cpu_budget = '12 parsecs': '12 parsecs' is not a size"),
    ({"prefetch_lookahead": 1.5}, r"tencache\.prefetch_lookahead = 1.5: must be \"auto\", a whole number"),
    ({"enabled": "yes please"}, r"tencache\.enabled = 'yes please': Input should be a valid boolean"),
    ({"pool": {"alignment_bytes": 3000}}, r"tencache\.pool\.alignment_bytes = 3000: must be a power of two"),
    ([1, 2], r"tencache = \[1, 2\]: must be an object"),
])
def test_bad_blocks_name_the_key_and_the_valid_values(block, message):
    with pytest.raises(TencacheConfigError, match=message):
        from_ds_config(ds_config(block))


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_requires_zero_stage_3(stage):
    with pytest.raises(TencacheConfigError, match=rf"zero_optimization.stage is {stage}; set .*stage.: 3"):
        from_ds_config(ds_config({}, stage=stage))


def test_nvme_tier_needs_a_folder():
    with pytest.raises(TencacheConfigError, match="no folder is given for the NVMe tier"):
        from_ds_config(ds_config({}, offload={"device": "nvme"}))
    assert from_ds_config(ds_config({}, offload={"device": "nvme", "nvme_path": "/tmp/x"}))
    assert from_ds_config(ds_config({"nvme_path": "/tmp/y"}, offload={"device": "nvme"})).nvme_path == "/tmp/y"


def test_nvme_tier_is_active_only_with_nvme_parameter_offload():
    nvme = {"device": "nvme", "nvme_path": "/tmp/x"}
    assert nvme_tier_active(ds_config({}, offload=nvme))
    assert not nvme_tier_active(ds_config({"nvme_tier": False}, offload=nvme))
    assert not nvme_tier_active(ds_config({}, offload={"device": "cpu"}))
    assert not nvme_tier_active(ds_config(None, offload=nvme))  # no block: stock swapper


def test_optimizer_tier_is_active_only_with_nvme_optimizer_offload():
    config = ds_config({}, offload={"device": "cpu"})
    config["zero_optimization"]["offload_optimizer"] = {"device": "nvme", "nvme_path": "/tmp/x"}
    assert optimizer_tier_active(config) and not nvme_tier_active(config)
    config["tencache"] = {"nvme_tier": False}
    assert not optimizer_tier_active(config)
    config["tencache"] = {"enabled": False}
    assert not optimizer_tier_active(config)
    del config["tencache"]
    assert not optimizer_tier_active(config)


def test_optimizer_cpu_budget_takes_sizes_but_not_auto():
    assert parse_block({"optimizer_cpu_budget": "2GiB"}).optimizer_cpu_budget == 2 * 2**30
    assert parse_block({}).optimizer_cpu_budget == 0
    with pytest.raises(TencacheConfigError, match=r"optimizer_cpu_budget = 'auto': .*no \"auto\" here"):
        parse_block({"optimizer_cpu_budget": "auto"})
    with pytest.raises(TencacheConfigError, match="optimizer_cpu_budget = -1: must be at least 0"):
        parse_block({"optimizer_cpu_budget": -1})


def test_fast_init_beside_the_parameter_tier_is_refused_clearly():
    config = ds_config({}, offload={"device": "nvme", "nvme_path": "/tmp/x"})
    config["zero_optimization"]["offload_optimizer"] = {"device": "nvme", "nvme_path": "/tmp/x",
                                                        "fast_init": True}
    with pytest.raises(TencacheConfigError, match="fast_init borrows ZeRO-Infinity's parameter swap"):
        from_ds_config(config)
    del config["zero_optimization"]["offload_optimizer"]["fast_init"]
    assert from_ds_config(config) is not None
    config["tencache"] = {"nvme_tier": False}
    config["zero_optimization"]["offload_optimizer"]["fast_init"] = True
    assert from_ds_config(config) is not None


def test_block_in_the_wrong_place_says_where_it_goes():
    config = ds_config(offload={"device": "cpu", "tencache": {}})
    with pytest.raises(TencacheConfigError, match="inside zero_optimization.offload_param; move it"):
        from_ds_config(config)


def test_unreadable_file_is_a_clear_error(tmp_path):
    with pytest.raises(TencacheConfigError, match="cannot read DeepSpeed config .*missing.json"):
        from_ds_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(TencacheConfigError, match="bad.json is not valid JSON"):
        from_ds_config(bad)


def test_settings_of_an_inactive_tier_are_reported():
    assert parse_block({"device_budget": 10}).tier_settings_ignored(False, False) == []
    given = parse_block({"cpu_budget": "1GiB", "pool": {"max_size_classes": 4}, "nvme_tier": True,
                         "optimizer_cpu_budget": 0})
    assert given.tier_settings_ignored(False, False) == ["nvme_tier", "cpu_budget", "pool",
                                                         "optimizer_cpu_budget"]
    assert given.tier_settings_ignored(True, False) == ["optimizer_cpu_budget"]
    assert given.tier_settings_ignored(False, True) == ["cpu_budget", "pool"]
    assert given.tier_settings_ignored(True, True) == []
