"""The plan: budget never exceeded, every use served, Belady no worse than LRU/FIFO, optimal when small."""

from __future__ import annotations

import functools
from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_tencache.plan import BudgetTooSmallError, belady_residency, build_plan

pytestmark = pytest.mark.unit


@st.composite
def traces(draw, max_params=8, max_groups=40, max_group_size=3, unit_sizes=False):
    """Random fetch sequences: each group a few distinct parameters, with sizes and compute times."""
    n_params = draw(st.integers(2, max_params))
    groups = draw(st.lists(
        st.lists(st.integers(0, n_params - 1), min_size=1, max_size=max_group_size, unique=True),
        min_size=1, max_size=max_groups))
    sizes = {p: 1 if unit_sizes else draw(st.integers(1, 64)) for p in range(n_params)}
    largest_group = max(sum(sizes[p] for p in g) for g in groups)
    budget = draw(st.integers(largest_group, max(largest_group, sum(sizes.values()))))
    compute = draw(st.lists(st.floats(0.0, 1.0), min_size=len(groups), max_size=len(groups)))
    return groups, sizes, budget, compute


def replay(plan, groups, sizes):
    """Apply the plan's fetches at their issue points; return the peak bytes and check every use."""
    resident: set[int] = set()
    used = peak = 0
    for g, params in enumerate(groups):
        for fetch in plan.issue_at.get(g, []):
            for victim in fetch.evict:
                assert victim in resident, f"evicting {victim}, which is not resident"
                resident.remove(victim)
                used -= sizes[victim]
            assert fetch.param_id not in resident
            resident.add(fetch.param_id)
            used += sizes[fetch.param_id]
            peak = max(peak, used)
        missing = set(params) - resident
        assert not missing, f"group {g} uses {missing}, neither resident nor fetched"
    return peak


def demand_fetches(groups, sizes, budget, choose_victim):
    """Fetch count of a demand-paged walk whose victim is picked by ``choose_victim``."""
    order: OrderedDict[int, None] = OrderedDict()  # insertion order = fetch order (FIFO)
    recency: OrderedDict[int, None] = OrderedDict()  # most recent use last (LRU)
    used = fetched = 0
    for params in groups:
        for p in params:
            if p not in order:
                while used + sizes[p] > budget:
                    victim = choose_victim(order, recency, set(params))
                    del order[victim]
                    recency.pop(victim, None)
                    used -= sizes[victim]
                order[p] = None
                used += sizes[p]
                fetched += 1
        for p in params:
            recency.pop(p, None)
            recency[p] = None
    return fetched


def fifo(order, recency, protected):
    return next(p for p in order if p not in protected)


def lru(order, recency, protected):
    return next(p for p in recency if p not in protected and p in order)


def optimal_fetches(groups, sizes, budget):
    """Brute force over every choice of victims: the true minimum number of fetches."""

    @functools.cache
    def best(g: int, resident: frozenset[int]) -> int:
        if g == len(groups):
            return 0
        needed = set(groups[g])
        new = needed - resident
        keep_required = resident & needed
        candidates = sorted(resident - needed)
        result = None
        # choose which non-needed residents to keep; the rest are evicted
        for mask in range(1 << len(candidates)):
            kept = {c for i, c in enumerate(candidates) if mask >> i & 1}
            state = frozenset(kept | keep_required | new)
            if sum(sizes[p] for p in state) > budget:
                continue
            cost = len(new) + best(g + 1, state)
            result = cost if result is None else min(result, cost)
        return result

    return best(0, frozenset())


@settings(max_examples=300, deadline=None)
@given(traces())
def test_budget_never_exceeded_and_every_use_served(trace):
    groups, sizes, budget, compute = trace
    plan = build_plan(groups, sizes, budget, compute, bandwidth_bytes_per_s=32.0, latency_s=0.01)
    peak = replay(plan, groups, sizes)
    assert peak <= budget
    assert peak == plan.peak_resident_bytes
    for fetch in plan.fetches:
        assert fetch.issue_group <= fetch.group


@settings(max_examples=300, deadline=None)
@given(traces(unit_sizes=True, max_group_size=2))
def test_belady_fetches_no_more_than_lru_or_fifo(trace):
    groups, sizes, budget, _ = trace
    belady = len(belady_residency(groups, sizes, budget))
    assert belady <= demand_fetches(groups, sizes, budget, lru)
    assert belady <= demand_fetches(groups, sizes, budget, fifo)


@settings(max_examples=200, deadline=None)
@given(traces(max_params=5, max_groups=10, max_group_size=2, unit_sizes=True))
def test_belady_matches_brute_force_optimum_on_small_traces(trace):
    groups, sizes, budget, _ = trace
    assert len(belady_residency(groups, sizes, budget)) == optimal_fetches(groups, sizes, budget)


@settings(max_examples=200, deadline=None)
@given(traces(), st.integers(1, 200))
def test_lookahead_bound_holds_and_stays_valid(trace, lookahead):
    groups, sizes, budget, compute = trace
    plan = build_plan(groups, sizes, budget, compute, bandwidth_bytes_per_s=8.0,
                      lookahead_bytes=lookahead)
    assert replay(plan, groups, sizes) <= budget
    # A prefetch (issued before its own group) starts only while the fetches outstanding for
    # groups from the issue point on, itself included, fit in the lookahead.
    for k, fetch in enumerate(plan.fetches):
        if fetch.issue_group < fetch.group:
            outstanding = [f for f in plan.fetches[:k + 1] if f.group >= fetch.issue_group]
            assert sum(f.nbytes for f in outstanding) <= lookahead


def test_prefetch_hides_transfer_behind_compute():
    # Three layers used once each; every transfer (1 s) fits in the compute of the layer before.
    groups = [[0], [1], [2]]
    sizes = {0: 10, 1: 10, 2: 10}
    plan = build_plan(groups, sizes, budget_bytes=20, compute_s=[2.0, 2.0, 2.0],
                      bandwidth_bytes_per_s=10.0)
    assert [f.issue_group for f in plan.fetches] == [0, 0, 1]
    assert [f.predicted_wait_s for f in plan.fetches] == [1.0, 0.0, 0.0]  # only the first waits
    assert plan.predicted_step_s == pytest.approx(7.0)
    assert plan.fetches[2].evict == (0,)  # layer 0 is never used again: evict it, keep layer 1


def test_eviction_waits_for_the_victims_last_use():
    # Budget of two: fetching 2 for group 2 must evict 0, which group 1 still uses.
    groups = [[0], [0, 1], [2]]
    sizes = {0: 1, 1: 1, 2: 1}
    plan = build_plan(groups, sizes, 2, [1.0, 1.0, 1.0], bandwidth_bytes_per_s=0.5)
    fetch_2 = plan.fetches[-1]
    assert fetch_2.param_id == 2 and fetch_2.evict in ((0,), (1,))
    assert fetch_2.issue_group == 2  # not before group 1 finished with its victim
    assert fetch_2.predicted_wait_s == pytest.approx(2.0)


def test_farthest_next_use_is_evicted():
    groups = [[0], [1], [2], [1], [0]]
    plan = build_plan(groups, {0: 1, 1: 1, 2: 1}, 2, [1.0] * 5, bandwidth_bytes_per_s=100.0)
    fetch_2 = next(f for f in plan.fetches if f.param_id == 2)
    assert fetch_2.evict == (0,)  # 0 is next used at group 4, 1 already at group 3


def test_group_larger_than_budget_is_a_clear_error():
    with pytest.raises(BudgetTooSmallError, match=r"group 1 needs 30 bytes .* budget is 20"):
        build_plan([[0], [1, 2]], {0: 10, 1: 10, 2: 20}, 20, [1.0, 1.0], 1.0)


def test_mismatched_inputs_are_rejected():
    with pytest.raises(ValueError, match="2 groups but 1 compute"):
        build_plan([[0], [1]], {0: 1, 1: 1}, 2, [1.0], 1.0)
    with pytest.raises(ValueError, match="bandwidth must be positive"):
        build_plan([[0]], {0: 1}, 2, [1.0], 0.0)


def test_plan_scales_n_log_n():
    """A 13B-class trace (hundreds of thousands of uses) plans in seconds, not minutes."""
    import time

    layers, params_per_layer = 400, 9
    forward = [[layer * params_per_layer + i for i in range(params_per_layer)] for layer in range(layers)]
    groups = forward + forward[::-1]  # backward reuses the layers in reverse
    sizes = {p: 1 << 20 for p in range(layers * params_per_layer)}
    start = time.perf_counter()
    for _ in range(10):  # 10 steps' worth: 72,000 uses
        plan = build_plan(groups, sizes, budget_bytes=sum(sizes.values()) // 2,
                          compute_s=[1e-3] * len(groups), bandwidth_bytes_per_s=2e10)
    assert time.perf_counter() - start < 10
    assert plan.predicted_hit_rate > 0.99
