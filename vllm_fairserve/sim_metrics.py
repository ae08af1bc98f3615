"""Figures of merit of one simulated run, as VTC (Sheng et al., OSDI'24) and the issue define them.

- Service of a tenant: VTC's W = 1 x prompt tokens + 2 x output tokens actually served
  (a prompt token counts once, even if a preemption made the engine compute it again),
  divided by the tenant's weight when weights differ.
- Backlogged: a tenant with requests in the engine's waiting queue. Requests held by a throttle
  are not in it: they are not asking the scheduler for service yet.
- Accumulated service difference (VTC's Theorem): the largest |W_f(t1, t2) - W_g(t1, t2)| over
  pairs of tenants and intervals during which both were backlogged throughout, at sampling
  resolution (``EngineConfig.sample_interval_s``).
- Windowed service difference: per window of FAIRNESS_WINDOW_S, the spread (max - min) of the
  service received by the tenants backlogged throughout it; the largest over windows.
- Jain's index over backlogged tenants: (sum x)^2 / (n sum x^2) of the service x of the tenants
  backlogged throughout a window, averaged over windows where at least two were.
- TTFT percentiles per user class, throughput (tokens served per second up to the end of the
  trace's arrivals), throttled requests (held or refused) per class, lost requests.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vllm_fairserve.sim_model import SERVICE_INPUT_PRICE, SERVICE_OUTPUT_PRICE, EndReason, Sample, SimResult
from vllm_fairserve.workload import UserClass

#: Window (s) of the windowed service difference and of Jain's index: many steps long (a step
#: is at most ~0.5 s at the default cost), so one big prefill chunk does not decide a window,
#: yet short enough that tenants stay backlogged through whole windows in bursty traffic.
FAIRNESS_WINDOW_S = 10.0
#: The accumulated service difference compares every pair of backlogged tenants, which costs
#: (tenants backlogged at a tick)^2 per tick; beyond this many distinct backlogged tenants it is
#: not computed (reported as None) rather than taking minutes.
MAX_PAIRWISE_TENANTS = 64
#: Keys of the per-class figures, as in the benchmark's JSON.
CLASS_KEYS = {UserClass.WELL_BEHAVED: "well_behaved", UserClass.ABUSIVE: "abusive"}
THROTTLED_KEYS = {UserClass.ABUSIVE: "abusive", UserClass.WELL_BEHAVED: "legit"}


@dataclass(frozen=True, slots=True)
class PolicyMetrics:
    """The figures of one run; ``to_json`` gives the benchmark's per-policy record."""

    max_service_diff: float | None
    vtc_bound: float | None
    max_windowed_service_diff: float | None
    jain_backlogged: float | None
    ttft_p50_s: dict[str, float | None]
    ttft_p99_s: dict[str, float | None]
    throughput_tok_s: float
    throttled: dict[str, int]
    lost: int

    def to_json(self) -> dict[str, Any]:
        return {
            "max_service_diff": self.max_service_diff,
            "vtc_bound": self.vtc_bound,
            "jain_backlogged": self.jain_backlogged,
            "ttft_p99_s": dict(self.ttft_p99_s),
            "ttft_p50_s": dict(self.ttft_p50_s),
            "throughput_tok_s": self.throughput_tok_s,
            "throttled": dict(self.throttled),
            "lost": self.lost,
        }


def compute_metrics(result: SimResult, window_s: float = FAIRNESS_WINDOW_S) -> PolicyMetrics:
    """Every figure of ``result``."""
    max_diff = max_service_difference(result)
    return PolicyMetrics(
        max_service_diff=max_diff,
        vtc_bound=None if max_diff is None else vtc_bound_of(result),
        max_windowed_service_diff=max_windowed_service_difference(result, window_s),
        jain_backlogged=jain_backlogged(result, window_s),
        ttft_p50_s=ttft_percentiles(result, 50),
        ttft_p99_s=ttft_percentiles(result, 99),
        throughput_tok_s=throughput_tok_s(result),
        throttled=throttled_counts(result),
        lost=lost_requests(result),
    )


# ------------------------------------------------------------------------------ VTC's bound


def vtc_bound(max_input_tokens: int, max_batch_tokens: int, input_price: float = SERVICE_INPUT_PRICE,
              output_price: float = SERVICE_OUTPUT_PRICE) -> float:
    """VTC's bound on the service difference of two backlogged clients: 2 * max(w_p * L_input,
    w_q * M), with L_input the longest input (prompt) and M the most tokens a running batch can
    hold (Sheng et al., OSDI'24, Section 4, theorem on backlogged clients).

    Verified in VTC's artifact (``slora/server/router/vtc_req_queue.py``): the prices w_p = 1
    and w_q = 2 (``input_price=1, output_price=2``), and that a batch is bounded by the token
    pool (``_can_add_new_req`` admits a request only while the batch's worst-case tokens stay
    under ``max_total_tokens``, the server's ``--max_total_token_num``): that pool is M.
    Verified in the paper's abstract: a "2x tight upper bound" for two backlogged clients.
    Not verified: the theorem's own text, which could not be retrieved here (only the
    abstract of arXiv 2401.00588 is reachable); the form of U is recalled from its Section 4.
    M is therefore the batch's token capacity, not one request's output; the simulator's M is
    its whole KV cache in tokens.
    """
    return 2.0 * max(input_price * max_input_tokens, output_price * max_batch_tokens)


def vtc_bound_of(result: SimResult) -> float:
    """``vtc_bound`` for a run: its longest served prompt and its engine's KV capacity."""
    longest = max((r.prompt_tokens for r in result.requests if r.end_reason is EndReason.FINISHED), default=0)
    return vtc_bound(longest, result.engine.kv_capacity_tokens)


# ----------------------------------------------------------------------- service differences


def _weighted(sample: Sample, weights: Sequence[float]) -> list[float]:
    return [service / weight for service, weight in zip(sample.service, weights, strict=True)]


def max_service_difference(result: SimResult) -> float | None:
    """Largest |W_f(t1, t2) - W_g(t1, t2)| over pairs backlogged together through [t1, t2].

    Sample k's backlogged set holds the tenants backlogged throughout (t_{k-1}, t_k]. A pair
    present in samples a+1..b was backlogged through [t_a, t_b]; over such a run the largest
    difference is max D - min D of D = W_f - W_g at t_a..t_b. None when no two tenants were
    backlogged together over a sampling interval, or more than MAX_PAIRWISE_TENANTS were.
    """
    samples = result.samples
    if len({tenant for sample in samples for tenant in sample.backlogged}) > MAX_PAIRWISE_TENANTS:
        return None
    weights = result.tenant_weights
    best: float | None = None
    runs: dict[tuple[int, int], tuple[float, float]] = {}  # pair -> (min D, max D) of its current run
    previous = _weighted(samples[0], weights) if samples else []
    for sample in samples[1:]:
        current = _weighted(sample, weights)
        members = sorted(sample.backlogged)
        continuing: dict[tuple[int, int], tuple[float, float]] = {}
        for position, f in enumerate(members):
            for g in members[position + 1:]:
                now = current[f] - current[g]
                low, high = runs.get((f, g), (previous[f] - previous[g],) * 2)
                low, high = min(low, now), max(high, now)
                continuing[(f, g)] = (low, high)
                best = high - low if best is None else max(best, high - low)
        runs = continuing
        previous = current
    return best


def _windows(result: SimResult, window_s: float) -> Iterable[tuple[list[float], set[int]]]:
    """(service received per tenant, tenants backlogged throughout) for consecutive windows."""
    samples = result.samples
    if len(samples) < 2:
        return
    per_window = max(1, round(window_s / result.engine.sample_interval_s))
    weights = result.tenant_weights
    for start in range(0, len(samples) - per_window, per_window):
        end = start + per_window
        backlogged = set(samples[start + 1].backlogged)
        for sample in samples[start + 2:end + 1]:
            backlogged &= sample.backlogged
        before, after = _weighted(samples[start], weights), _weighted(samples[end], weights)
        yield [a - b for a, b in zip(after, before, strict=True)], backlogged


def max_windowed_service_difference(result: SimResult, window_s: float = FAIRNESS_WINDOW_S) -> float | None:
    """Largest spread of per-window service among tenants backlogged through the window."""
    spreads = [
        max(received[t] for t in backlogged) - min(received[t] for t in backlogged)
        for received, backlogged in _windows(result, window_s)
        if len(backlogged) >= 2
    ]
    return max(spreads, default=None)


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index: 1 when all values are equal, 1/n when one takes everything."""
    total = sum(values)
    squares = sum(value * value for value in values)
    return 1.0 if squares == 0 else total * total / (len(values) * squares)


def jain_backlogged(result: SimResult, window_s: float = FAIRNESS_WINDOW_S) -> float | None:
    """Mean over windows of Jain's index of the service of the tenants backlogged throughout."""
    indexes = [
        jain_index([received[t] for t in sorted(backlogged)])
        for received, backlogged in _windows(result, window_s)
        if len(backlogged) >= 2
    ]
    return sum(indexes) / len(indexes) if indexes else None


# ------------------------------------------------------------------ latency, volume, fate


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank q-th percentile (a value that occurred), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[rank - 1]


def ttft_percentiles(result: SimResult, q: float) -> dict[str, float | None]:
    """TTFT (first token time - submission, held time included) per user class."""
    by_class: dict[str, list[float]] = {key: [] for key in CLASS_KEYS.values()}
    for request in result.requests:
        if request.ttft_s is not None:
            by_class[CLASS_KEYS[request.user_class]].append(request.ttft_s)
    return {key: percentile(values, q) for key, values in by_class.items()}


def throughput_tok_s(result: SimResult) -> float:
    """Tokens served (prompt once + output) per second over [0, horizon], where the horizon is
    the end of the trace's arrivals: under overload this is the engine's useful capacity; the
    drain after it, whose length depends on what the policy left queued, is not counted."""
    samples = result.samples
    horizon = result.horizon_s
    for before, after in zip(samples, samples[1:], strict=False):
        if after.time_s >= horizon:
            span = after.time_s - before.time_s
            fraction = 0.0 if span == 0 else (horizon - before.time_s) / span
            served = before.tokens_served + fraction * (after.tokens_served - before.tokens_served)
            return served / horizon
    return (samples[-1].tokens_served if samples else 0) / horizon


def throttled_counts(result: SimResult) -> dict[str, int]:
    """Requests the policy held back or refused, per class ("legit" = well-behaved)."""
    counts = {key: 0 for key in THROTTLED_KEYS.values()}
    for request in result.requests:
        if request.held or request.end_reason is EndReason.RATE_LIMITED:
            counts[THROTTLED_KEYS[request.user_class]] += 1
    return counts


def lost_requests(result: SimResult) -> int:
    """Requests that neither finished nor ended with a reason (must be 0)."""
    return sum(1 for request in result.requests if request.end_reason is None)
