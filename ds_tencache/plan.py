"""From a profile and a byte budget: what stays resident, what is evicted, when each fetch starts.

A training step is a fixed sequence of fetch groups (see :mod:`ds_tencache.profile`): group ``g``
needs the parameters ``groups[g]`` resident together, then computes for ``compute_s[g]`` seconds.
Knowing the whole sequence, the plan makes two decisions:

1. **Residency (Belady).** Walk the groups in order. A parameter that is not resident when its group
   comes is fetched; when the budget would overflow, the resident parameter whose next use is
   farthest in the future is evicted, never one the current group needs. With equal sizes this
   minimises the number of fetches (Belady's theorem); with mixed sizes it is the standard
   farthest-next-use rule. A step starts empty: ZeRO-3 re-partitions every parameter after the
   optimizer step, so nothing gathered survives into the next step.

2. **Timing.** Each fetch is issued early enough to hide its transfer behind the compute before its
   group, on one serial transfer channel: a backward pass gives every fetch the latest start that
   still finishes before its group and before the next fetch must start. A fetch can never be
   issued before its victims' last use (they must stay resident until then) nor before the fetch
   ahead of it, and ``lookahead_bytes`` optionally caps the bytes of fetches outstanding ahead of
   the current group when a fetch is issued.
   Because evictions move earlier together with their fetch and fetches keep their order, the
   resident bytes never exceed the budget at any moment.

Everything is O(n log n) in the number of uses: a heap with lazy invalidation for the farthest
next use, and a binary search over cumulative compute time for each issue point.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

NEVER = float("inf")  # next use of a parameter not used again this step


@dataclass(frozen=True)
class Fetch:
    """Bring ``param_id`` in for group ``group``; release ``evict`` first; start at ``issue_group``."""

    param_id: int
    group: int
    issue_group: int
    evict: tuple[int, ...]
    nbytes: int
    predicted_wait_s: float


@dataclass
class Plan:
    """The decisions for one step, plus the figures they predict."""

    fetches: list[Fetch]
    uses: int  # parameter uses in the step
    budget_bytes: int
    peak_resident_bytes: int
    # fetches issued at the start of each group, in issue order (what the coordinator follows)
    issue_at: dict[int, list[Fetch]] = field(default_factory=dict)
    predicted_step_s: float = 0.0

    @property
    def predicted_hit_rate(self) -> float:
        """Share of uses whose parameter is resident, with no wait, when its group starts."""
        if self.uses == 0:
            return 1.0
        late = sum(1 for f in self.fetches if f.predicted_wait_s > 0)
        return 1.0 - late / self.uses


class BudgetTooSmallError(ValueError):
    """One group needs more bytes at once than the whole budget."""


def belady_residency(groups: Sequence[Sequence[int]], sizes: Mapping[int, int],
                     budget_bytes: int) -> list[tuple[int, int, tuple[int, ...], int]]:
    """Fetches of a demand-paged walk with farthest-next-use eviction.

    Returns ``(param_id, group, victims, victims_last_use_group)`` per fetch, in order, where
    ``victims_last_use_group`` is the latest group in which any victim was used (-1 if none).
    """
    next_use = _next_use_table(groups)
    # param -> its heap key (-next use, last use); among equal next uses (often "never again")
    # the least recently used goes first, so its fetch can be issued as early as possible.
    resident: dict[int, tuple[float, int]] = {}
    heap: list[tuple[float, int, int]] = []  # (-next use, last use, param); stale ones skipped
    used = 0
    fetches = []
    for g, params in enumerate(groups):
        needed = sum(sizes[p] for p in set(params))
        if needed > budget_bytes:
            raise BudgetTooSmallError(
                f"group {g} needs {needed} bytes at once but the budget is {budget_bytes} bytes; "
                f"raise the device budget to at least {needed}")
        for p in params:
            if p in resident:
                continue
            victims = []
            while used + sizes[p] > budget_bytes:
                while True:
                    negative_next, last_use, victim = heapq.heappop(heap)
                    if resident.get(victim) == (negative_next, last_use):
                        break
                # The group fits the budget (checked above), so a victim is never needed by it.
                assert -negative_next > g
                del resident[victim]
                used -= sizes[victim]
                victims.append((victim, last_use))
            resident[p] = (0.0, g)  # not evictable until its key is set below
            used += sizes[p]
            fetches.append((p, g, tuple(v for v, _ in victims),
                            max((last for _, last in victims), default=-1)))
        for p in params:
            key = (-next_use[(g, p)], g)
            resident[p] = key
            heapq.heappush(heap, (*key, p))
    return fetches


def build_plan(groups: Sequence[Sequence[int]], sizes: Mapping[int, int], budget_bytes: int,
               compute_s: Sequence[float], bandwidth_bytes_per_s: float, latency_s: float = 0.0,
               lookahead_bytes: int | None = None) -> Plan:
    """Residency by :func:`belady_residency`, issue points by the serial-channel backward pass.

    ``compute_s[g]`` is the measured compute of group ``g``; a fetch of ``n`` bytes takes
    ``latency_s + n / bandwidth_bytes_per_s`` on the channel.
    """
    if len(compute_s) != len(groups):
        raise ValueError(f"{len(groups)} groups but {len(compute_s)} compute times")
    if bandwidth_bytes_per_s <= 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth_bytes_per_s}")
    raw = belady_residency(groups, sizes, budget_bytes)
    starts = [0.0, *itertools.accumulate(compute_s)]  # start of group g with no waiting
    transfer = [latency_s + sizes[p] / bandwidth_bytes_per_s for p, *_ in raw]

    # Latest start of each fetch that still hides it: before its group, and before the next fetch.
    latest = [0.0] * len(raw)
    deadline = NEVER
    for k in range(len(raw) - 1, -1, -1):
        finish_by = min(starts[raw[k][1]], deadline)
        latest[k] = finish_by - transfer[k]
        deadline = latest[k]

    # fetched_upto[k]: bytes of fetches 0..k-1, for the byte-bounded lookahead.
    fetched_upto = list(itertools.accumulate((sizes[p] for p, *_ in raw), initial=0))

    fetches: list[Fetch] = []
    issue_at: dict[int, list[Fetch]] = {}
    previous_issue = 0
    channel_free = 0.0
    delay = 0.0  # waiting so far shifts every later group
    for k, (param, group, victims, victims_last_use) in enumerate(raw):
        # The latest group starting no later than the hiding start (0 if even that is too late).
        hiding = max(0, bisect.bisect_right(starts, latest[k]) - 1)
        earliest = max(previous_issue, victims_last_use + 1)
        if lookahead_bytes is not None:
            # Fetches lo..k fit in the lookahead; starting after the group of fetch lo-1 keeps
            # every fetch outstanding at the issue point (groups >= issue) among them.
            lo = bisect.bisect_left(fetched_upto, fetched_upto[k + 1] - lookahead_bytes)
            earliest = max(earliest, raw[lo - 1][1] + 1 if lo > 0 else 0)
        issue = min(group, max(earliest, hiding))
        begin = max(starts[issue] + delay, channel_free)
        done = begin + transfer[k]
        wait = max(0.0, done - (starts[group] + delay))
        delay += wait
        channel_free = done
        fetch = Fetch(param, group, issue, victims, sizes[param], wait)
        fetches.append(fetch)
        issue_at.setdefault(issue, []).append(fetch)
        previous_issue = issue

    uses = sum(len(set(params)) for params in groups)
    return Plan(
        fetches=fetches, uses=uses, budget_bytes=budget_bytes,
        peak_resident_bytes=_peak_resident(fetches, sizes),
        issue_at=issue_at, predicted_step_s=starts[-1] + delay,
    )


def _next_use_table(groups: Sequence[Sequence[int]]) -> dict[tuple[int, int], float]:
    """(group, param) -> the next group that uses param after this one, or NEVER."""
    table: dict[tuple[int, int], float] = {}
    upcoming: dict[int, float] = {}
    for g in range(len(groups) - 1, -1, -1):
        for p in set(groups[g]):
            table[(g, p)] = upcoming.get(p, NEVER)
        for p in set(groups[g]):
            upcoming[p] = g
    return table


def _peak_resident(fetches: Sequence[Fetch], sizes: Mapping[int, int]) -> int:
    """Largest resident byte count when each fetch takes memory at its issue, after its evictions."""
    used = peak = 0
    for fetch in fetches:  # issue order is fetch order
        used -= sum(sizes[v] for v in fetch.evict)
        used += fetch.nbytes
        peak = max(peak, used)
    return peak
