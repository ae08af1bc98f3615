"""The state machine between ZeRO-3's fetch events and the plan: profile, plan, follow, re-profile.

The DeepSpeed adapter reports what happens (a step starts, a sub-module asks for its parameters,
they are available, an all-gather moved some bytes) and executes what this controller answers
(release these parameters, gather those ahead of time). Every decision lives here, in plain
Python, so it can be tested without DeepSpeed:

- **Profiling** (the first ``warmup_steps`` steps, and again after any change of order): stock
  ZeRO-3 runs untouched while the recorder notes each fetch group and its timings.
- **Planned**: once the warm-up steps agree on the order, a plan is built for the device budget
  and each group start returns the evictions and prefetches the plan schedules there.
- A group that differs from the plan (dynamic control flow) drops back to profiling at once: a
  stale plan would fetch the wrong parameters, so stock behaviour takes over until a new stable
  profile exists.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ds_tencache.metrics import MetricsReporter, StepCounters, StepMetrics
from ds_tencache.plan import Plan, build_plan
from ds_tencache.profile import Phase, ProfileRecorder, TensorInfo

logger = logging.getLogger("ds_tencache")


class Mode(str, Enum):
    PROFILING = "profiling"
    PLANNED = "planned"


@dataclass(frozen=True)
class PlanInputs:
    """What the plan is built from; every rank must build from the same one (collectives)."""

    groups: list[tuple[int, ...]]
    sizes: dict[int, int]
    compute_s: list[float]
    bandwidth_bytes_per_s: float


@dataclass
class GroupStart:
    """What to do when a fetch group starts: release ``evict`` before gathering the group."""

    evict: list[int] = field(default_factory=list)


# Given a builder of device plans by budget and the configured budget: the plan to follow and the
# host-tier layout that goes with it (ds_tencache.tiers.plan_tiers, bound to the NVMe store).
PlanTiers = Callable[[Callable[[int], Plan], int], tuple[Plan, Any]]


class CacheController:
    """Decides, step by step, whether to profile or to follow the plan, and what the plan says."""

    def __init__(self, warmup_steps: int, device_budget_bytes: int, reporter: MetricsReporter,
                 lookahead_bytes: int | None = None, profile_path: str | None = None,
                 plan_tiers: PlanTiers | None = None) -> None:
        self.warmup_steps = warmup_steps
        self.device_budget_bytes = device_budget_bytes
        self.lookahead_bytes = lookahead_bytes
        self.profile_path = profile_path
        self.reporter = reporter
        self.mode = Mode.PROFILING
        self.plan: Plan | None = None
        self.plans_built = 0
        self.plan_tiers = plan_tiers
        self.layout: Any = None  # the host-tier layout of the current plan (NVMe tier only)
        self._recorder = ProfileRecorder()
        self._groups: list[tuple[str, Phase, tuple[int, ...]]] = []  # the plan's order
        self._starts: list[GroupStart] = []  # the plan's evictions per group
        self._prefetches: list[list[int]] = []  # the plan's prefetches per group
        self._step = -1
        self._step_started: float | None = None
        self._group = 0
        self._counters = StepCounters()
        self._gathered_bytes = 0
        self._gather_s = 0.0
        self._step_valid = True  # False once this step departed from the plan

    # --- events from the adapter -------------------------------------------------------------

    def register_tensor(self, tensor: TensorInfo) -> None:
        if tensor.param_id not in self._recorder.profile.tensors:
            self._recorder.register_tensors([tensor])

    def start_step(self, now: float,
                   agree: Callable[[PlanInputs], PlanInputs] = lambda inputs: inputs) -> None:
        """A new forward begins: close the previous step, and plan once the profile is ready.

        ``agree`` makes every rank use the same plan inputs (the adapter broadcasts rank 0's);
        per-rank timings differ, and ranks that issued different all-gathers would deadlock.
        """
        if self._step_started is not None:
            self._close_step(now)
        self._step += 1
        self._step_started = now
        self._group = 0
        self._counters = StepCounters()
        self._step_valid = True
        if self.mode is Mode.PROFILING and self._profiled_steps() >= self.warmup_steps:
            self._try_to_plan(agree)

    def finish(self, now: float) -> None:
        """Close the last step of a run (steps otherwise close when the next one starts)."""
        if self._step_started is not None:
            self._close_step(now)
            self._step_started = None

    def begin_group(self, module: str, phase: Phase, param_ids: Sequence[int],
                    available: Sequence[bool], now: float) -> GroupStart:
        """A sub-module asks for its parameters; ``available[i]``: already gathered or in flight."""
        for hit in available:
            self._counters.use(hit)
        params = param_ids if isinstance(param_ids, tuple) else tuple(param_ids)
        if self.mode is Mode.PROFILING:
            if self._step_valid:
                self._recorder.begin_fetch(module, phase, params, now)
            return GroupStart()
        expected = self._groups[self._group] if self._group < len(self._groups) else None
        if expected != (module, phase, params):
            wanted = f"{expected[0]} ({expected[1].value})" if expected else "no more groups"
            self._abandon_plan(f"fetch group {self._group} is {module} ({phase.value}), "
                               f"the plan expected {wanted}")
            return GroupStart()
        return self._starts[self._group]

    def end_group(self, now: float, wait_s: float) -> list[int]:
        """The group's parameters are available; returns the parameters to prefetch now."""
        self._counters.fetch_wait_s += wait_s
        group = self._group
        self._group += 1
        if self.mode is Mode.PROFILING:
            if self._step_valid:
                self._recorder.end_fetch(now, wait_s)
            return []
        return self._prefetches[group]

    def record_gather(self, nbytes: int, seconds: float, direction: str) -> None:
        """An all-gather call moved ``nbytes`` (of parameters that were not available)."""
        self._counters.all_gathers += 1
        self._counters.moved(direction, nbytes)
        if self.mode is Mode.PROFILING:
            self._gathered_bytes += nbytes
            self._gather_s += seconds

    def record_moved(self, direction: str, nbytes: int) -> None:
        """Bytes moved outside an all-gather (the NVMe tier's reads)."""
        if nbytes:
            self._counters.moved(direction, nbytes)

    # --- internals -----------------------------------------------------------------------------

    def _profiled_steps(self) -> int:
        return len(self._recorder.profile.steps)

    def _close_step(self, now: float) -> None:
        assert self._step_started is not None
        step_time = now - self._step_started
        if self.mode is Mode.PROFILING and self._step_valid:
            self._recorder.end_step(self._step, now)
        self.reporter.report(StepMetrics.from_counters(
            self._step, self.mode.value if self._step_valid else Mode.PROFILING.value,
            step_time, self._counters))

    def _try_to_plan(self, agree: Callable[[PlanInputs], PlanInputs]) -> None:
        profile = self._recorder.profile
        recent = profile.steps[-self.warmup_steps:]
        profile.steps = recent
        if not profile.is_stable():
            logger.warning("tencache: the last %d steps used parameters in different orders; "
                           "profiling on with stock ZeRO-3 until the order repeats", len(recent))
            profile.steps = recent[1:]  # drop the oldest; the next step may complete a stable run
            return
        groups = profile.groups()
        bandwidth = self._gathered_bytes / self._gather_s if self._gather_s > 0 else float("inf")
        inputs = agree(PlanInputs(
            groups=[g.param_ids for g in groups],
            sizes={p: t.nbytes for p, t in profile.tensors.items()},
            compute_s=[g.compute_s for g in groups],
            bandwidth_bytes_per_s=bandwidth,
        ))

        def build(budget: int) -> Plan:
            return build_plan(inputs.groups, inputs.sizes, budget, inputs.compute_s,
                              inputs.bandwidth_bytes_per_s, lookahead_bytes=self.lookahead_bytes)

        if self.plan_tiers is None:
            self.plan = build(self.device_budget_bytes)
        else:
            self.plan, self.layout = self.plan_tiers(build, self.device_budget_bytes)
        self._groups = [(g.module, g.phase, g.param_ids) for g in groups]
        # Per group, precomputed once: this runs for every sub-module of every step.
        issued = [self.plan.issue_at.get(g, []) for g in range(len(groups))]
        self._starts = [GroupStart(evict=[v for f in fetches for v in f.evict]) for fetches in issued]
        self._prefetches = [[f.param_id for f in fetches if f.group > g]
                            for g, fetches in enumerate(issued)]
        self.plans_built += 1
        self.mode = Mode.PLANNED
        if self.profile_path:
            profile.to_json(self.profile_path)
        logger.info(
            "tencache: plan built from %d profiled steps: %d groups, %d fetches, budget %.1f MiB, "
            "predicted hit rate %.3f", len(profile.steps), len(groups), len(self.plan.fetches),
            self.plan.budget_bytes / 2**20, self.plan.predicted_hit_rate)

    def _abandon_plan(self, reason: str) -> None:
        logger.warning("tencache: execution order changed (%s); re-profiling for %d steps with "
                       "stock ZeRO-3", reason, self.warmup_steps)
        tensors = self._recorder.profile.tensors.values()
        self.mode = Mode.PROFILING
        self.plan = None
        self._groups = []
        self._recorder = ProfileRecorder()
        self._recorder.register_tensors(tensors)
        self._gathered_bytes, self._gather_s = 0, 0.0
        self._step_valid = False  # this step's partial record would be misleading
