"""The controller's state machine, driven by synthetic ZeRO-3 events (no DeepSpeed)."""

from __future__ import annotations

import logging

import pytest

from ds_tencache.controller import CacheController, Mode
from ds_tencache.metrics import MetricsReporter
from ds_tencache.profile import Phase, TensorInfo

pytestmark = pytest.mark.unit

# A three-layer model: forward 0, 1, 2 then backward 2, 1, 0; each layer one 100-byte parameter.
LAYERS = [(f"Linear#{i}", i) for i in range(3)]
STEP = [(name, Phase.FORWARD, p) for name, p in LAYERS] + \
       [(name, Phase.BACKWARD, p) for name, p in reversed(LAYERS)]


def make_controller(budget=200, warmup=2, **kwargs) -> CacheController:
    controller = CacheController(warmup, budget, MetricsReporter(None), **kwargs)
    for _, p in LAYERS:
        controller.register_tensor(TensorInfo(p, 25, "torch.float32", 100))
    return controller


def run_step(controller, clock, order=STEP, resident=frozenset()):
    """Drive one step; returns (evictions, prefetches) per group and the new clock."""
    controller.start_step(clock)
    actions = []
    for module, phase, param in order:
        clock += 0.001
        start = controller.begin_group(module, phase, [param], [param in resident], clock)
        clock += 0.002
        prefetch = controller.end_group(clock, wait_s=0.002)
        actions.append((start.evict, prefetch))
        clock += 0.01  # compute
    return actions, clock


def test_profiles_then_follows_the_plan():
    controller = make_controller()
    clock = 0.0
    for _ in range(2):
        _, clock = run_step(controller, clock)
        assert controller.mode is Mode.PROFILING
    actions, clock = run_step(controller, clock)
    assert controller.mode is Mode.PLANNED and controller.plans_built == 1
    # Budget of two layers: layer 2's fetch must evict one; layer 0 is used farthest ahead.
    fetched_for_group = {f.group: f for f in controller.plan.fetches}
    assert fetched_for_group[2].evict == (0,)
    # Prefetches are returned at the end of the group they are issued in, never for itself.
    for group, (_, prefetch) in enumerate(actions):
        assert all(controller.plan.fetches[[f.param_id for f in controller.plan.fetches].index(p)].group > group
                   for p in prefetch)
    phases = [m.phase for m in controller.reporter.history]
    assert phases == ["profiling", "profiling"]  # step 2 closes when step 3 starts
    controller.finish(clock)
    assert [m.phase for m in controller.reporter.history][-1] == "planned"


def test_agree_hook_sees_the_plan_inputs():
    seen = []
    controller = make_controller()
    clock = 0.0
    for _ in range(2):
        _, clock = run_step(controller, clock)

    def agree(inputs):
        seen.append(inputs)
        return inputs

    controller.start_step(clock, agree=agree)
    assert len(seen) == 1 and seen[0].groups == [(0,), (1,), (2,), (2,), (1,), (0,)]
    assert seen[0].sizes == {0: 100, 1: 100, 2: 100}


def test_changed_order_falls_back_to_stock_and_replans(caplog):
    controller = make_controller()
    clock = 0.0
    for _ in range(3):
        _, clock = run_step(controller, clock)
    assert controller.mode is Mode.PLANNED
    skipping = [step for step in STEP if step[2] != 1]  # layer 1 skipped: dynamic control flow
    with caplog.at_level(logging.WARNING, logger="ds_tencache"):
        actions, clock = run_step(controller, clock, order=skipping)
    assert controller.mode is Mode.PROFILING and controller.plan is None
    assert "execution order changed (fetch group 1 is Linear#2 (fwd)" in caplog.text
    assert all(evict == [] and prefetch == [] for evict, prefetch in actions[1:])
    # The abandoned step is not part of the new profile; two clean steps make a new plan.
    for _ in range(2):
        _, clock = run_step(controller, clock, order=skipping)
    run_step(controller, clock, order=skipping)
    assert controller.mode is Mode.PLANNED and controller.plans_built == 2


def test_unstable_warmup_keeps_profiling(caplog):
    controller = make_controller()
    clock = 0.0
    _, clock = run_step(controller, clock)
    _, clock = run_step(controller, clock, order=STEP[:3])  # an evaluation forward, say
    with caplog.at_level(logging.WARNING, logger="ds_tencache"):
        _, clock = run_step(controller, clock)
    assert controller.mode is Mode.PROFILING
    assert "used parameters in different orders" in caplog.text
    _, clock = run_step(controller, clock)
    assert controller.mode is Mode.PROFILING  # steps 1 and 2 still differ
    run_step(controller, clock)
    assert controller.mode is Mode.PLANNED  # steps 2 and 3 agree
    assert [m.uses for m in controller.reporter.history] == [6, 3, 6, 6]


def test_hits_and_gathers_are_counted_per_step():
    controller = make_controller()
    controller.start_step(0.0)
    controller.begin_group("Linear#0", Phase.FORWARD, [0], [False], 0.1)
    controller.record_gather(100, 0.01, "cpu_to_device")
    controller.end_group(0.2, wait_s=0.1)
    controller.begin_group("Linear#1", Phase.FORWARD, [1], [True], 0.3)
    controller.end_group(0.3, wait_s=0.0)
    controller.finish(0.5)
    (metrics,) = controller.reporter.history
    assert metrics.hit_rate == 0.5 and metrics.all_gathers == 1
    assert metrics.bytes_moved == {"cpu_to_device": 100}
    assert metrics.fetch_wait_s == pytest.approx(0.1) and metrics.step_time_s == pytest.approx(0.5)


def test_profile_is_written_when_the_plan_is_built(tmp_path):
    path = tmp_path / "profile.json.gz"
    controller = make_controller(profile_path=str(path))
    clock = 0.0
    for _ in range(3):
        _, clock = run_step(controller, clock)
    from ds_tencache.profile import Profile

    assert len(Profile.from_json(path).steps) == 2
