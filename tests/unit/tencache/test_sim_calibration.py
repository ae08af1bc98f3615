"""benchmarks/tencache_sim.py's calibration host: ZeRO-3's measured cost split per group and per fetch."""

from __future__ import annotations

import pytest

from ds_tencache.sim import Trace

pytestmark = pytest.mark.unit

# A memcpy so fast that the modelled transfers vanish (20 bytes at 1e15 B/s), so the split
# below is checked against round numbers.
INSTANT_MEMCPY_BYTES_PER_S = 1e15
# Parameters A (0) and B (1) of 10 elements each, 1 byte per element: forward A, B; backward B, A.
TOKENLESS = Trace(groups=[(0,), (1,), (1,), (0,)], backward=[False, False, True, True],
                  flops=[1.0] * 4, numel={0: 10, 1: 10}, nbytes={0: 10, 1: 10})


def test_zero3_cost_splits_into_per_group_and_per_fetch(sim_bench, monkeypatch):
    monkeypatch.setattr(sim_bench, "measure_memcpy_bytes_per_s", lambda: INSTANT_MEMCPY_BYTES_PER_S)
    # DeepSpeed's defaults keep A and B live from forward to backward: 2 fetches per step; the
    # refetch config fetches at all 4 uses. With 2 ms per group and 1 ms per fetch on top of
    # plain PyTorch's 10 ms: default 10 + 4 x 2 + 2 x 1 = 20 ms, refetch 10 + 8 + 4 = 22 ms.
    # Two measurement rounds, the median taken per key.
    rounds = [{"plain_forward_backward_s": 0.5, "plain_tokenless_forward_backward_s": 0.010,
               "zero3_tokenless_forward_backward_s": 0.020, "zero3_step_s": 0.004,
               "zero3_refetch_tokenless_forward_backward_s": 0.022}] * 2
    host, derived = sim_bench.calibration_host(rounds, flops_per_step=100.0, tokenless=TOKENLESS)
    assert derived["modelled"]["default"]["fetches"] == 2
    assert derived["modelled"]["refetch"]["fetches"] == 4
    assert host.fetch_overhead_s == pytest.approx(1e-3, rel=1e-9)
    assert host.group_overhead_s == pytest.approx(2e-3, rel=1e-9)
    assert host.cpu_adam_params_per_s == pytest.approx(20 / 0.004)  # 20 parameters per step
    assert host.flops_per_s == pytest.approx(100.0 / 0.5)


def test_noise_never_yields_a_negative_cost(sim_bench, monkeypatch):
    # On a loaded machine the refetch engine can come out faster than the default one: the
    # per-fetch cost is then 0, not negative (a negative cost would speed the simulation up).
    monkeypatch.setattr(sim_bench, "measure_memcpy_bytes_per_s", lambda: INSTANT_MEMCPY_BYTES_PER_S)
    rounds = [{"plain_forward_backward_s": 0.5, "plain_tokenless_forward_backward_s": 0.010,
               "zero3_tokenless_forward_backward_s": 0.020, "zero3_step_s": 0.004,
               "zero3_refetch_tokenless_forward_backward_s": 0.015}]
    host, _ = sim_bench.calibration_host(rounds, flops_per_step=100.0, tokenless=TOKENLESS)
    assert host.fetch_overhead_s == 0.0
    assert host.group_overhead_s == pytest.approx(2.5e-3, rel=1e-9)  # (20 - 10) ms over 4 groups
