"""Simulator metrics: VTC's service differences and bound, Jain's index, percentiles,
throughput, throttled and lost counts, and the benchmark's JSON shape."""

from __future__ import annotations

import pytest

from vllm_fairserve.identity import RequestIdentity
from vllm_fairserve.sim_model import EndReason, EngineConfig, Sample, SimRequest, SimResult
from vllm_fairserve.sim_metrics import (
    compute_metrics,
    jain_backlogged,
    jain_index,
    lost_requests,
    max_service_difference,
    max_windowed_service_difference,
    percentile,
    throttled_counts,
    throughput_tok_s,
    ttft_percentiles,
    vtc_bound,
)
from vllm_fairserve.workload import Call, Interaction, UserClass

pytestmark = pytest.mark.unit

ENGINE = EngineConfig(sample_interval_s=1.0)
INTERACTION = Interaction("a/i0", "a", "chat", UserClass.WELL_BEHAVED, 0.0, (Call(0, 8, 4),), 0.0)


def result_of(services: list[tuple[float, ...]], backlogged: list[set[int]], requests=(), horizon_s=None,
              tokens: list[int] | None = None) -> SimResult:
    """A run with one sample per second: services[k] per tenant, backlogged[k] through (k-1, k]."""
    samples = tuple(
        Sample(float(k), tokens[k] if tokens else 0, service, frozenset(backlogged[k]))
        for k, service in enumerate(services)
    )
    count = len(services[0])
    return SimResult("test", tuple(requests), tuple(f"t{i}" for i in range(count)),
                     (UserClass.WELL_BEHAVED,) * count, (1.0,) * count, samples, ENGINE,
                     horizon_s if horizon_s is not None else float(len(services) - 1), float(len(services) - 1),
                     steps=0, busy_s=0.0, abandoned_interactions=0)


def request(user_class=UserClass.WELL_BEHAVED, ttft=None, held=False, end=EndReason.FINISHED) -> SimRequest:
    made = SimRequest(0, RequestIdentity("a", "chat"), user_class, 0, 0.0, 0, 8, 4, INTERACTION)
    made.first_token_time = ttft
    made.held = held
    made.end_reason = end
    return made


def test_vtc_bound_is_twice_the_larger_of_a_prompt_and_a_full_batch_of_output():
    assert vtc_bound(64, 128) == 2 * max(1 * 64, 2 * 128)
    assert vtc_bound(4000, 128) == 2 * 4000
    assert vtc_bound(10, 10, input_price=3.0, output_price=1.0) == 60.0


def test_service_difference_is_taken_only_over_intervals_both_were_backlogged():
    services = [(0.0, 0.0), (10.0, 0.0), (20.0, 0.0), (30.0, 0.0), (40.0, 0.0)]
    both = {0, 1}
    assert max_service_difference(result_of(services, [set(), both, both, both, both])) == 40.0
    # b is not backlogged through (2, 3]: the runs are [0, 2] (gap 20) and [3, 4] (gap 10).
    assert max_service_difference(result_of(services, [set(), both, both, {0}, both])) == 20.0
    assert max_service_difference(result_of(services, [set(), {0}, {0}, {1}, {1}])) is None


def test_service_difference_is_the_range_not_the_end_value():
    services = [(0.0, 0.0), (10.0, 0.0), (10.0, 10.0), (10.0, 30.0)]
    both = {0, 1}
    # D = a - b goes 0, 10, 0, -20: the worst interval is [1, 3], a gap of 30.
    assert max_service_difference(result_of(services, [set(), both, both, both])) == 30.0


def test_windowed_difference_and_jain_use_tenants_backlogged_through_each_window():
    services = [(0.0, 0.0, 0.0), (5.0, 5.0, 50.0), (10.0, 10.0, 100.0), (20.0, 10.0, 100.0), (30.0, 10.0, 100.0)]
    backlogged = [set(), {0, 1}, {0, 1, 2}, {0, 1}, {0, 1}]
    result = result_of(services, backlogged)
    # Windows of 2 s: [0, 2] with tenants 0 and 1 (2 dropped out at 1): service 10 and 10;
    # [2, 4] with 0 and 1: service 20 and 0.
    assert max_windowed_service_difference(result, window_s=2.0) == 20.0
    assert jain_backlogged(result, window_s=2.0) == pytest.approx((1.0 + 0.5) / 2)
    assert jain_backlogged(result_of(services, [set()] * 5), window_s=2.0) is None


def test_jain_index_bounds():
    assert jain_index([3.0, 3.0, 3.0]) == 1.0
    assert jain_index([9.0, 0.0, 0.0]) == pytest.approx(1 / 3)
    assert jain_index([0.0, 0.0]) == 1.0


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(100, 0, -1)]
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0 and percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0 and percentile([], 50) is None


def test_ttft_per_class_counts_only_requests_that_got_a_token():
    requests = [request(ttft=1.0), request(ttft=3.0), request(UserClass.ABUSIVE, ttft=None, end=EndReason.HOLD_EXPIRED)]
    result = result_of([(0.0,), (0.0,)], [set(), set()], requests)
    assert ttft_percentiles(result, 50) == {"well_behaved": 1.0, "abusive": None}


def test_throughput_counts_tokens_served_up_to_the_horizon():
    result = result_of([(0.0,), (0.0,), (0.0,)], [set()] * 3, horizon_s=1.5, tokens=[0, 100, 300])
    assert throughput_tok_s(result) == pytest.approx(200 / 1.5)


def test_throttled_splits_legit_and_abusive_and_lost_counts_unended():
    requests = [request(held=True), request(end=EndReason.RATE_LIMITED), request(UserClass.ABUSIVE, held=True),
                request(end=None)]
    result = result_of([(0.0,), (0.0,)], [set(), set()], requests)
    assert throttled_counts(result) == {"legit": 2, "abusive": 1}
    assert lost_requests(result) == 1


def test_json_record_has_exactly_the_issues_shape():
    requests = [request(ttft=1.0)]
    record = compute_metrics(result_of([(0.0,), (0.0,)], [set(), set()], requests)).to_json()
    assert list(record) == ["max_service_diff", "vtc_bound", "jain_backlogged", "ttft_p99_s", "ttft_p50_s",
                            "throughput_tok_s", "throttled", "lost"]
    assert set(record["ttft_p99_s"]) == set(record["ttft_p50_s"]) == {"well_behaved", "abusive"}
    assert set(record["throttled"]) == {"abusive", "legit"}
    assert record["max_service_diff"] is None and record["vtc_bound"] is None  # nobody was backlogged
