"""The measured execution order of parameter uses, recorded during the warm-up steps.

ZeRO-3 gathers the parameters of one sub-module at a time, just before the sub-module runs. A
training step is therefore a sequence of *fetch groups* (one per sub-module invocation, forward
and backward), each needing a known set of parameters to be resident at once, separated by the
compute of the sub-module. Because that sequence repeats every step, recording it once gives the
future: it is what lets the plan evict the parameter used farthest in the future (Belady) and
issue each prefetch just early enough.

This module is plain data plus a recorder; it imports nothing from DeepSpeed. The adapter feeds it
timestamps and parameter ids; the plan reads :meth:`Profile.groups` from it.
"""

from __future__ import annotations

import gzip
import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

# Bump when the JSON layout changes; loading another version is an error, not a guess.
PROFILE_FORMAT = 1


class Phase(str, Enum):
    FORWARD = "fwd"
    BACKWARD = "bwd"


@dataclass(frozen=True)
class TensorInfo:
    """One partitioned parameter as ZeRO-3 sees it (``ds_id``, full ``ds_numel``)."""

    param_id: int
    numel: int
    dtype: str  # e.g. "torch.bfloat16"
    nbytes: int  # of the gathered (full) tensor
    name: str = ""


@dataclass(frozen=True)
class FetchGroup:
    """One sub-module invocation: the parameters it needs together, and how long it ran.

    ``fetch_s`` is the time from asking for the parameters to having them (all-gather, and any
    copy from a slower tier); ``wait_s`` the part of it that the step really waited for;
    ``compute_s`` the time from having them to the next group's request.
    """

    module: str
    phase: Phase
    param_ids: tuple[int, ...]
    start_s: float
    fetch_s: float
    wait_s: float
    compute_s: float


@dataclass
class StepProfile:
    step: int
    groups: list[FetchGroup]
    duration_s: float

    def order(self) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
        """What must repeat for a plan to stay valid: modules, phases and parameters, in order."""
        return tuple((g.module, g.phase.value, g.param_ids) for g in self.groups)


class OrderChangedError(RuntimeError):
    """A step used parameters in another order than the profile (dynamic control flow)."""


@dataclass
class Profile:
    """Tensors and the per-step fetch sequences of the warm-up steps."""

    tensors: dict[int, TensorInfo] = field(default_factory=dict)
    steps: list[StepProfile] = field(default_factory=list)

    def is_stable(self) -> bool:
        """True when every recorded step used the parameters in the same order."""
        return len({step.order() for step in self.steps}) <= 1

    def first_divergence(self, other: StepProfile) -> int | None:
        """Index of the first fetch group where ``other`` departs from this profile's order."""
        reference = self.steps[-1].order()
        candidate = other.order()
        for index, (mine, theirs) in enumerate(zip(reference, candidate)):
            if mine != theirs:
                return index
        return None if len(reference) == len(candidate) else min(len(reference), len(candidate))

    def groups(self) -> list[FetchGroup]:
        """The fetch sequence the plan is built from, timings as the median over stable steps.

        The first recorded step is skipped when there are others: it includes one-off costs
        (allocator warm-up, JIT, trace construction) that would inflate every compute time.
        """
        if not self.steps:
            raise ValueError("the profile holds no steps; run at least one warm-up step")
        if not self.is_stable():
            raise OrderChangedError("the warm-up steps used parameters in different orders")
        steady = self.steps[1:] if len(self.steps) > 1 else self.steps
        template = steady[-1].groups
        merged = []
        for index, group in enumerate(template):
            samples = [step.groups[index] for step in steady]
            merged.append(FetchGroup(
                module=group.module,
                phase=group.phase,
                param_ids=group.param_ids,
                start_s=statistics.median(s.start_s for s in samples),
                fetch_s=statistics.median(s.fetch_s for s in samples),
                wait_s=statistics.median(s.wait_s for s in samples),
                compute_s=statistics.median(s.compute_s for s in samples),
            ))
        return merged

    def to_json(self, path: str | Path) -> None:
        """Write the profile (gzip-compressed when the name ends in .gz)."""
        payload = {
            "format": PROFILE_FORMAT,
            "tensors": [asdict(t) for t in self.tensors.values()],
            "steps": [
                {"step": s.step, "duration_s": s.duration_s,
                 "groups": [{**asdict(g), "phase": g.phase.value, "param_ids": list(g.param_ids)}
                            for g in s.groups]}
                for s in self.steps
            ],
        }
        data = json.dumps(payload, separators=(",", ":")).encode()
        path = Path(path)
        path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)

    @classmethod
    def from_json(cls, path: str | Path) -> Profile:
        path = Path(path)
        raw = path.read_bytes()
        try:
            payload = json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: not a tencache profile ({err})") from err
        if payload.get("format") != PROFILE_FORMAT:
            raise ValueError(f"{path}: profile format {payload.get('format')!r}, "
                             f"this version reads format {PROFILE_FORMAT}")
        tensors = {t["param_id"]: TensorInfo(**t) for t in payload["tensors"]}
        steps = [
            StepProfile(
                step=s["step"], duration_s=s["duration_s"],
                groups=[FetchGroup(**{**g, "phase": Phase(g["phase"]),
                                      "param_ids": tuple(g["param_ids"])}) for g in s["groups"]],
            )
            for s in payload["steps"]
        ]
        return cls(tensors=tensors, steps=steps)


class ProfileRecorder:
    """Builds a :class:`Profile` from fetch events, one step at a time.

    The adapter calls :meth:`begin_fetch` when a sub-module asks for its parameters,
    :meth:`end_fetch` when they are available, and :meth:`end_step` after the optimizer step.
    Times are passed in (seconds on any monotonic clock), so the recorder is deterministic.
    """

    def __init__(self) -> None:
        self.profile = Profile()
        self._groups: list[FetchGroup] = []
        self._step_start: float | None = None
        self._pending: tuple[str, Phase, tuple[int, ...], float] | None = None
        self._last_ready: float | None = None

    def register_tensors(self, tensors: Iterable[TensorInfo]) -> None:
        for tensor in tensors:
            self.profile.tensors[tensor.param_id] = tensor

    def begin_fetch(self, module: str, phase: Phase, param_ids: Sequence[int], now: float) -> None:
        if self._step_start is None:
            self._step_start = now
        self._close_compute(now)
        self._pending = (module, phase, tuple(param_ids), now)

    def end_fetch(self, now: float, wait_s: float | None = None) -> None:
        """The parameters are available; ``wait_s`` defaults to the whole fetch time."""
        if self._pending is None:
            raise RuntimeError("end_fetch without begin_fetch")
        module, phase, params, started = self._pending
        self._pending = None
        fetch_s = now - started
        self._groups.append(FetchGroup(module, phase, params, started - (self._step_start or started),
                                       fetch_s, fetch_s if wait_s is None else wait_s, 0.0))
        self._last_ready = now

    def end_step(self, step: int, now: float) -> StepProfile:
        self._close_compute(now)
        start = self._step_start if self._step_start is not None else now
        recorded = StepProfile(step=step, groups=self._groups, duration_s=now - start)
        self.profile.steps.append(recorded)
        self._groups, self._step_start, self._last_ready = [], None, None
        return recorded

    def _close_compute(self, now: float) -> None:
        """The compute of the previous group lasts until the next request (or the step end)."""
        if self._groups and self._last_ready is not None:
            last = self._groups[-1]
            self._groups[-1] = FetchGroup(last.module, last.phase, last.param_ids, last.start_s,
                                          last.fetch_s, last.wait_s, now - self._last_ready)
            self._last_ready = None
