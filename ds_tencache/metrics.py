"""Per-step figures of the cache: hit rate, fetch wait, all-gathers and bytes moved per direction.

The adapter counts events into a :class:`StepCounters` while a step runs; at the step's end the
:class:`MetricsReporter` turns it into a :class:`StepMetrics` record, appends it as one JSON line to
the configured file every N steps, and logs a one-line summary. Plain Python: no DeepSpeed import.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

logger = logging.getLogger("ds_tencache")


@dataclass
class StepCounters:
    """Mutable tallies of one step, filled by the adapter as events happen."""

    uses: int = 0  # parameter uses (a parameter needed by a fetch group)
    hits: int = 0  # uses whose parameter was already available, with no wait
    fetch_wait_s: float = 0.0  # time the step blocked waiting for parameters
    all_gathers: int = 0  # collective calls issued (one may gather many parameters)
    bytes_moved: dict[str, int] = field(default_factory=dict)  # direction -> bytes

    def use(self, hit: bool) -> None:
        self.uses += 1
        self.hits += int(hit)

    def moved(self, direction: str, nbytes: int) -> None:
        """Count bytes per direction, e.g. "cpu_to_device", "nvme_to_cpu", "cpu_to_nvme"."""
        self.bytes_moved[direction] = self.bytes_moved.get(direction, 0) + nbytes


@dataclass(frozen=True)
class StepMetrics:
    step: int
    phase: str  # "profiling" during warm-up, "planned" once the plan drives the fetches
    step_time_s: float
    hit_rate: float
    uses: int
    fetch_wait_s: float
    all_gathers: int
    bytes_moved: dict[str, int]

    @classmethod
    def from_counters(cls, step: int, phase: str, step_time_s: float,
                      counters: StepCounters) -> StepMetrics:
        hit_rate = counters.hits / counters.uses if counters.uses else 1.0
        return cls(step, phase, step_time_s, hit_rate, counters.uses, counters.fetch_wait_s,
                   counters.all_gathers, dict(counters.bytes_moved))

    def summary(self) -> str:
        moved = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(self.bytes_moved.items()))
        return (f"tencache step {self.step} [{self.phase}]: {self.step_time_s * 1e3:.0f} ms, "
                f"hit rate {self.hit_rate:.3f} of {self.uses} uses, waited "
                f"{self.fetch_wait_s * 1e3:.1f} ms, {self.all_gathers} all-gathers"
                + (f", moved {moved}" if moved else ""))


class MetricsReporter:
    """Writes every N-th step's record to a JSON-lines file and the log; keeps all in memory."""

    def __init__(self, path: str | Path | None, every_n_steps: int = 1, log: bool = True) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.path = Path(path) if path is not None else None
        self.every_n_steps = every_n_steps
        self.log = log  # one rank logs; the others would repeat the same line
        self.history: list[StepMetrics] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")  # one run per file: a rerun does not append to stale records

    def report(self, metrics: StepMetrics) -> None:
        self.history.append(metrics)
        if metrics.step % self.every_n_steps:
            return
        if self.log:
            logger.info(metrics.summary())
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(json.dumps(asdict(metrics), sort_keys=True) + "\n")
