"""The engine simulator: VTC's bound, work conservation, nothing lost, determinism, follow-ups
never held, fast-forward equal to stepping, and its speed."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vllm_fairserve.sim import simulate
from vllm_fairserve.sim_model import EndReason, EngineConfig, SimResult
from vllm_fairserve.sim_policies import POLICY_NAMES, FairServePolicy, VtcPolicy
from vllm_fairserve.sim_metrics import lost_requests, max_service_difference, ttft_percentiles, vtc_bound_of
from vllm_fairserve.workload import (
    STANDARD_APPLICATIONS,
    Abuse,
    Call,
    Interaction,
    UserClass,
    UserSpec,
    Workload,
    generate_workload,
)

pytestmark = pytest.mark.unit

# A tiny engine, so that a few dozen requests fill it: 8 seats, a 64-token step budget, a KV
# cache of 32 blocks of 4 tokens (VTC's M = 128 tokens), steps of 22 ms + 0.2 ms per token.
SMALL = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, block_size=4, num_kv_blocks=32,
                     max_model_len=128, sample_interval_s=0.01)
MAX_PROMPT = 64
MAX_OUTPUT = 32
SHAPES = {shape.id: shape for shape in STANDARD_APPLICATIONS}

CALLS = st.lists(st.tuples(st.integers(1, MAX_PROMPT), st.integers(1, MAX_OUTPUT)), min_size=1, max_size=25)


def workload_of(calls: dict[str, list[tuple[float, int, int]]], application: str = "chat",
                abusive: frozenset[str] = frozenset()) -> Workload:
    """Single-call interactions: tenant -> [(start s, prompt tokens, output tokens)]."""
    interactions = [
        Interaction(f"{tenant}/i{index}", tenant, application,
                    UserClass.ABUSIVE if tenant in abusive else UserClass.WELL_BEHAVED,
                    start, (Call(0, prompt, output),), 0.0)
        for tenant, tenant_calls in calls.items()
        for index, (start, prompt, output) in enumerate(tenant_calls)
    ]
    interactions.sort(key=lambda interaction: (interaction.start_s, interaction.id))
    duration = max((interaction.start_s for interaction in interactions), default=0.0) + 1.0
    classes = {t: UserClass.ABUSIVE if t in abusive else UserClass.WELL_BEHAVED for t in calls}
    return Workload(tuple(interactions), SHAPES, classes, dict.fromkeys(calls, 1.0), duration, seed=0)


def fingerprint(result: SimResult) -> list[tuple]:
    """Everything observable about each request."""
    return [
        (r.id, r.tenant, r.arrival_time, r.queued_time, r.first_token_time, r.end_time, r.end_reason,
         r.end_message, r.generated, r.preemptions, r.held)
        for r in result.requests
    ]


# ------------------------------------------------------------------------------- VTC's bound


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(a=CALLS, b=CALLS, policy=st.sampled_from(["vtc", "fairserve"]))
def test_two_backlogged_tenants_stay_within_vtc_bound(a, b, policy):
    """Both tenants send everything at t=0, so both are backlogged until one runs dry; at
    every step (sampled each step) the service gap of any interval over which both were
    backlogged stays within 2 * max(1 * L_input, 2 * M), M the KV cache's 128 tokens."""
    workload = workload_of({"a": [(0.0, p, o) for p, o in a], "b": [(0.0, p, o) for p, o in b]})
    result = simulate(workload, policy, SMALL)
    difference = max_service_difference(result)
    if difference is not None:
        assert difference <= vtc_bound_of(result)


def test_fcfs_breaks_the_bound_that_vtc_and_fairserve_keep():
    """The property above is not vacuous: FCFS serves all of a's backlog before any of b's."""
    calls = [(0.0, MAX_PROMPT, MAX_OUTPUT)] * 25
    workload = workload_of({"a": calls, "b": calls})
    fcfs = simulate(workload, "fcfs", SMALL)
    assert max_service_difference(fcfs) > vtc_bound_of(fcfs)
    for policy in ("vtc", "fairserve"):
        result = simulate(workload, policy, SMALL)
        assert max_service_difference(result) <= vtc_bound_of(result)


# ---------------------------------------------------------------------- work conservation


ARRIVALS = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.floats(0.0, 5.0), st.integers(1, MAX_PROMPT),
              st.integers(1, MAX_OUTPUT)),
    min_size=1, max_size=40,
)


def _by_tenant(arrivals) -> dict[str, list[tuple[float, int, int]]]:
    calls: dict[str, list[tuple[float, int, int]]] = {}
    for tenant, start, prompt, output in arrivals:
        calls.setdefault(tenant, []).append((start, prompt, output))
    return calls


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrivals=ARRIVALS, policy=st.sampled_from(POLICY_NAMES))
def test_engine_is_work_conserving(arrivals, policy):
    """The engine computes exactly while some request is queued or running: it never idles
    with runnable work (and never runs without)."""
    result = simulate(workload_of(_by_tenant(arrivals)), policy, SMALL)
    in_system = [(r.queued_time, r.end_time) for r in result.requests if r.queued_time is not None]
    assert result.busy_s == pytest.approx(_union_length(in_system), abs=1e-6 * (1 + len(in_system)))


# ------------------------------------------------------------------------- nothing lost


USERS = st.lists(
    st.tuples(st.sampled_from([shape.id for shape in STANDARD_APPLICATIONS]), st.sampled_from(list(Abuse)),
              st.floats(0.5, 4.0)),
    min_size=1, max_size=6,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(users=USERS, seed=st.integers(0, 2**16), policy=st.sampled_from(POLICY_NAMES))
def test_no_request_is_lost(users, seed, policy):
    """Every request ends with a reason (finished, refused, expired, too long), finished ones
    generated all their tokens, and every call of every interaction was either sent or its
    interaction was abandoned after an earlier call ended unfinished."""
    specs = [UserSpec(f"u{i}", app, rate_multiplier=rate, abuse=abuse) for i, (app, abuse, rate) in enumerate(users)]
    workload = generate_workload(specs, duration_s=60.0, seed=seed)
    # A short hold limit so that holds also end by expiry within the run.
    result = simulate(workload, policy, throttle={"max_hold_s": 2.0, "waiting_queue_threshold": 2}) \
        if policy == "fairserve" else simulate(workload, policy)
    assert lost_requests(result) == 0
    for request in result.requests:
        assert request.end_reason is not None and request.end_time is not None
        if request.end_reason is EndReason.FINISHED:
            assert request.generated == request.output_tokens and request.first_token_time is not None
            assert request.blocks == 0
        else:
            assert request.end_message
    sent_calls: dict[str, int] = {}
    for request in result.requests:
        sent_calls[request.interaction.id] = max(sent_calls.get(request.interaction.id, 0),
                                                 request.identity.call_index + 1)
    unsent = sum(len(i.calls) - sent_calls[i.id] for i in workload.interactions)
    assert len(result.requests) + unsent == workload.num_calls
    assert (unsent > 0) <= (result.abandoned_interactions > 0)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_results_and_another_seed_differs():
    users = [UserSpec("chat", "chat"), UserSpec("agent", "agent"), UserSpec("flood", "chat", abuse=Abuse.FLOOD)]
    for policy in POLICY_NAMES:
        first = simulate(generate_workload(users, 120.0, seed=3), policy)
        again = simulate(generate_workload(users, 120.0, seed=3), policy)
        other = simulate(generate_workload(users, 120.0, seed=4), policy)
        assert fingerprint(first) == fingerprint(again)
        assert first.samples == again.samples
        assert fingerprint(first) != fingerprint(other)


#: Found by hypothesis: a flood overloads the KV cache during a fast-forward, and the next
#: arrival was decided on the load of the stretch's first step instead of its last. (Found at
#: 2x the flood rate; since the throttle keeps over-allowance traffic below the KV headroom, a
#: lone flooder needs 3x for the throttle to hold at all.)
KV_OVERLOAD_IN_A_STRETCH = dict(users=[("chat", Abuse.FLOOD, 3.0)], seed=1, policy="fairserve")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(users=USERS, seed=st.integers(0, 2**16), policy=st.sampled_from(POLICY_NAMES))
@example(**KV_OVERLOAD_IN_A_STRETCH)
def test_fast_forward_is_exactly_stepping_one_by_one(users, seed, policy):
    specs = [UserSpec(f"u{i}", app, rate_multiplier=rate, abuse=abuse) for i, (app, abuse, rate) in enumerate(users)]
    workload = generate_workload(specs, duration_s=60.0, seed=seed)
    fast = simulate(workload, policy, EngineConfig())
    slow = simulate(workload, policy, EngineConfig(fast_forward=False))
    assert fingerprint(fast) == fingerprint(slow)
    assert fast.samples == slow.samples and fast.steps == slow.steps


class _CallLog(FairServePolicy):
    """FairServe that logs every per-step call the engine makes and every throttle decision."""

    def __init__(self, config):
        super().__init__(config)
        self.log: list[tuple] = []

    def submit(self, request, now):
        admission = super().submit(request, now)
        self.log.append(("submit", request.id, now, admission[0], self.throttle.overloaded))
        return admission

    def step_start(self, now, kv_usage, waiting):
        self.log.append(("step_start", now, kv_usage, waiting))
        return super().step_start(now, kv_usage, waiting)

    def on_output_tokens(self, identity, tokens, now):
        self.log.append(("output", identity.tenant, identity.application, tokens, now))
        super().on_output_tokens(identity, tokens, now)


def test_fast_forward_tells_the_throttle_the_load_of_every_skipped_step():
    """Regression: the throttle decides an arrival on the load it was told last. A fast-forward
    used to tell it only the load before its first step, while the KV cache filled up during
    the stretch, so an arrival right after one was admitted instead of held. Every per-step
    call (``step_start`` with that step's KV usage and waiting count, ``on_output_tokens``)
    must reach the policy exactly as stepping one by one makes it."""
    users = KV_OVERLOAD_IN_A_STRETCH["users"]
    specs = [UserSpec(f"u{i}", app, rate_multiplier=rate, abuse=abuse) for i, (app, abuse, rate) in enumerate(users)]
    workload = generate_workload(specs, duration_s=60.0, seed=KV_OVERLOAD_IN_A_STRETCH["seed"])
    fast_policy, slow_policy = _CallLog(workload.fairserve_config()), _CallLog(workload.fairserve_config())
    fast = simulate(workload, fast_policy, EngineConfig())
    slow = simulate(workload, slow_policy, EngineConfig(fast_forward=False))
    assert fast.steps == slow.steps and fast.steps > 0
    assert any(r.held for r in slow.requests), "the scenario must make the throttle hold, or it proves nothing"
    assert fast_policy.log == slow_policy.log
    assert fingerprint(fast) == fingerprint(slow)
    assert fast.samples == slow.samples


# ------------------------------------------------------------------------------ throttling


class _WithoutBatchRules(FairServePolicy):
    """FairServe whose throttle only holds at arrival: no headroom, no eviction."""

    def may_join(self, request, free_kv_tokens_after, kv_capacity_tokens, batch_empty):
        return True

    def make_room(self, request, blocks_short, running):
        return []


def test_headroom_and_eviction_keep_a_flood_from_delaying_honest_users():
    """Eight chat and three RAG users, then the same plus a 10x chat flooder (seed 0 of this
    mix, 3 minutes, the default A10G engine). Holding at arrival alone lets the flood's admitted
    requests take the KV cache, and honest p99 TTFT more than doubles; with the batch rules it
    stays within the issue's 1.5x of the no-flood figure."""
    honest = [UserSpec(f"chat{i}", "chat") for i in range(8)] + [UserSpec(f"rag{i}", "rag") for i in range(3)]
    flood = [*honest, UserSpec("flooder", "chat", abuse=Abuse.FLOOD)]
    alone = simulate(generate_workload(honest, 180.0, seed=0), "fairserve")
    workload = generate_workload(flood, 180.0, seed=0)
    with_rules = simulate(workload, FairServePolicy(workload.fairserve_config()))
    without = simulate(workload, _WithoutBatchRules(workload.fairserve_config()))
    p99 = {name: ttft_percentiles(result, 99)["well_behaved"]
           for name, result in (("alone", alone), ("with", with_rules), ("without", without))}
    assert p99["with"] <= 1.5 * p99["alone"], p99
    assert p99["without"] > 2 * p99["alone"], p99  # the scenario does need the rules
    assert lost_requests(with_rules) == 0


class _RefusesTheFlooder(FairServePolicy):
    """FairServe whose headroom rule refuses the flooder's requests while anything runs, as it
    refuses an over-allowance pair's when the KV headroom is short."""

    def may_join(self, request, free_kv_tokens_after, kv_capacity_tokens, batch_empty):
        return batch_empty or request.tenant != "flooder"


def test_a_request_refused_headroom_does_not_stop_the_ones_behind_it():
    """Regression: the flooder's request is first in fair order (queued in the same step as
    x's, equal counters, the smaller tenant id) and refused; x's request behind it must join
    at once, not wait with it for the batch to empty (the headroom the flooder is refused is
    kept for requests like x's)."""
    workload = workload_of({"a": [(0.0, 8, 30)], "flooder": [(0.05, 8, 4)], "x": [(0.06, 8, 4)]})
    result = simulate(workload, _RefusesTheFlooder(workload.fairserve_config()), replace(SMALL, fast_forward=False))
    a, flooder, x = sorted(result.requests, key=lambda r: r.tenant)
    assert flooder.queued_time == x.queued_time
    assert x.first_token_time < a.end_time
    assert flooder.first_token_time > a.end_time  # it joins once nothing else runs
    assert lost_requests(result) == 0


def test_throttling_never_holds_a_follow_up_call():
    """Agents and a flooder overload the engine; FairServe holds first calls (the flood's and,
    when over allowance, the agents'), but never a call of an interaction in progress."""
    users = [UserSpec(f"agent{i}", "agent", rate_multiplier=3.0) for i in range(4)]
    users += [UserSpec("flooder", "chat", abuse=Abuse.FLOOD), UserSpec("splitter", "summarise", abuse=Abuse.SPLIT)]
    workload = generate_workload(users, duration_s=180.0, seed=11)
    result = simulate(workload, FairServePolicy(workload.fairserve_config()))
    held = [r for r in result.requests if r.held]
    assert held, "the scenario must overload the engine, or the property is vacuous"
    assert all(r.identity.call_index == 0 for r in held)
    follow_ups = [r for r in result.requests if r.identity.call_index]
    assert follow_ups and not any(r.held for r in follow_ups)


def test_fairserve_holds_and_expires_with_a_reason_and_vtc_never_holds():
    users = [UserSpec("chat", "chat"), UserSpec("flooder", "chat", abuse=Abuse.FLOOD, rate_multiplier=4.0)]
    workload = generate_workload(users, duration_s=120.0, seed=5)
    fair = simulate(workload, "fairserve", throttle={"max_hold_s": 1.0})
    expired = [r for r in fair.requests if r.end_reason is EndReason.HOLD_EXPIRED]
    assert expired and all("throttled" in r.end_message for r in expired)
    assert all(r.tenant == "flooder" for r in expired)
    vtc = simulate(workload, VtcPolicy())
    assert not any(r.held for r in vtc.requests)


def test_rpm_refuses_over_the_limit_with_a_reason():
    workload = workload_of({"a": [(0.1 * i, 8, 4) for i in range(20)]})
    result = simulate(workload, "rpm", SMALL, rpm_limit=5)
    refused = [r for r in result.requests if r.end_reason is EndReason.RATE_LIMITED]
    assert len(refused) == 15 and "limit is 5 per minute" in refused[0].end_message


def test_too_long_request_is_refused_not_lost():
    workload = workload_of({"a": [(0.0, 120, 20), (0.0, 8, 4)]})
    result = simulate(workload, "fcfs", SMALL)
    assert [r.end_reason for r in result.requests] == [EndReason.TOO_LONG, EndReason.FINISHED]
    assert "max_model_len = 128" in result.requests[0].end_message


# -------------------------------------------------------------------------- the engine


def test_preemption_recomputes_and_charges_the_prompt_once():
    """Eight long requests outgrow a 128-token cache: some are preempted and recomputed, yet
    each tenant's service counts every prompt token once and every output token once."""
    workload = workload_of({"a": [(0.0, 40, 30)] * 4, "b": [(0.0, 40, 30)] * 4})
    for policy in POLICY_NAMES:
        result = simulate(workload, policy, SMALL)
        assert sum(r.preemptions for r in result.requests) > 0
        assert result.samples[-1].service == (4 * (40 + 2 * 30),) * 2
        assert result.samples[-1].tokens_served == 8 * (40 + 30)


@pytest.mark.parametrize("reserve_full_isl", [True, False])
def test_a_long_prompt_joins_only_when_all_of_it_fits(reserve_full_isl):
    """vLLM 0.32's admission gate (scheduler_reserve_full_isl): a 100-token prompt (25 blocks)
    next to a running request holding 12 blocks waits for the whole prompt's room instead of
    starting its first 64-token chunk (16 blocks) and being preempted for its second."""
    workload = workload_of({"a": [(0.0, 40, 10)], "b": [(0.01, 100, 4)]})
    config = replace(SMALL, max_num_seqs=2, scheduler_reserve_full_isl=reserve_full_isl, fast_forward=False)
    result = simulate(workload, "fcfs", config)
    a, b = result.requests
    assert [r.end_reason for r in result.requests] == [EndReason.FINISHED, EndReason.FINISHED]
    if reserve_full_isl:
        assert b.preemptions == 0 and b.first_token_time > a.end_time - 1e-9
    else:
        assert b.preemptions > 0  # the thrashing the gate prevents


@pytest.mark.parametrize(("policy_type", "after_first_step"), [(VtcPolicy, 100.0), (FairServePolicy, 64.0)])
def test_vtc_charges_the_prompt_at_admission_and_fairserve_as_computed(policy_type, after_first_step):
    """VTC (as its artifact) charges a request's whole prompt when it joins the batch; FairServe
    charges prompt chunks as they are computed: 64 of 100 tokens after the first step."""

    class CounterSpy(policy_type):
        def step_start(self, now, kv_usage, waiting):
            self.seen.append(self.counters.counter("a"))
            return super().step_start(now, kv_usage, waiting)

    policy = CounterSpy()
    policy.seen = []
    simulate(workload_of({"a": [(0.0, 100, 2)]}), policy, replace(SMALL, fast_forward=False))
    assert policy.seen[:3] == [0.0, after_first_step, 100.0 + 2]  # the second step also samples a token
    assert policy.counters.counter("a") == 100 + 2 * 2


def test_engine_config_errors_name_the_field():
    with pytest.raises(ValueError, match="max_num_batched_tokens = 8: must be >= max_num_seqs = 16"):
        EngineConfig(max_num_seqs=16, max_num_batched_tokens=8)
    with pytest.raises(ValueError, match="max_model_len = 4096: exceeds the KV cache"):
        EngineConfig(num_kv_blocks=10)
    with pytest.raises(ValueError, match="policy = 'lifo'"):
        simulate(workload_of({"a": [(0.0, 8, 4)]}), "lifo")


def test_simulator_modules_import_neither_vllm_nor_torch():
    imports = ("import vllm_fairserve.sim, vllm_fairserve.sim_model, vllm_fairserve.sim_policies, "
               "vllm_fairserve.sim_metrics, vllm_fairserve.workload")
    check = "import sys; assert not {'vllm', 'torch'} & set(sys.modules), sorted(sys.modules)"
    result = subprocess.run([sys.executable, "-c", f"{imports}; {check}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------- speed

#: 5,000 requests of a mixed workload must simulate under FairServe in this many seconds: the
#: issue asks 100,000 in under 60 s (0.6 ms each); 5,000 take ~1.5 s on this 2-core machine,
#: and the bound leaves 2x room for a slow CI host.
SPEED_REQUESTS = 5_000
SPEED_BOUND_S = 6.0


def test_simulates_thousands_of_requests_quickly():
    mix = {"chat": 8, "code": 6, "summarise": 2, "rag": 2, "writing": 1, "agent": 2}
    users = [UserSpec(f"{app}{i}", app) for app, n in mix.items() for i in range(n)]
    workload = generate_workload(users, duration_s=SPEED_REQUESTS / 3.3, seed=1)  # ~3.3 calls/s
    start = time.perf_counter()
    result = simulate(workload, "fairserve")
    elapsed = time.perf_counter() - start
    assert len(result.requests) >= 0.8 * SPEED_REQUESTS
    assert elapsed < SPEED_BOUND_S * len(result.requests) / SPEED_REQUESTS
