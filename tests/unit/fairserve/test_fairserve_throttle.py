"""Throttle: acts only under overload, never mid-interaction, holds and ends requests explicitly."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_fairserve.config import load_config
from vllm_fairserve.identity import RequestIdentity
from vllm_fairserve.throttle import Decision, RunningRequest, Throttle

pytestmark = pytest.mark.unit

# chat: 100 in + 2 * 50 out = 200 weighted tokens per call, 3 interactions/min.
# With window 60 s and allowance 2: 2 * 3 * 1 * 1 * 200 = 1200 weighted tokens per window.
CHAT = {
    "id": "chat",
    "expected_input_tokens": 100,
    "expected_system_tokens": 0,
    "expected_output_tokens": 50,
    "interactions_per_minute": 3,
}
# agent: (300 + 2 * 100) = 500 per call, 4 calls, 1 interaction/min: 2 * 1 * 4 * 500 = 4000.
AGENT = {
    "id": "agent",
    "expected_input_tokens": 300,
    "expected_system_tokens": 0,
    "expected_output_tokens": 100,
    "calls_per_interaction": 4,
    "interactions_per_minute": 1,
}
THROTTLE = {
    "window_s": 60,
    "usage_allowance": 2,
    "max_hold_s": 30,
    "kv_usage_threshold": 0.9,
    "waiting_queue_threshold": 10,
    "interaction_idle_s": 120,
    "poisson_slack_sigmas": 0,  # the bare multiple keeps the arithmetic below readable
}
CONFIG = load_config({"applications": [CHAT, AGENT], "throttle": THROTTLE})
CHAT_ALLOWANCE = 1200.0
AGENT_ALLOWANCE = 4000.0


def chat(tenant="alice", interaction=None, call_index=None):
    return RequestIdentity(tenant, "chat", interaction, call_index)


def overloaded_throttle():
    throttle = Throttle(CONFIG)
    assert throttle.observe_load(kv_usage=0.95, waiting=0)
    return throttle


def test_allowance_is_the_characteristic_times_the_allowance():
    throttle = Throttle(CONFIG)
    assert throttle.allowance("chat") == pytest.approx(CHAT_ALLOWANCE)
    assert throttle.allowance("agent") == pytest.approx(AGENT_ALLOWANCE)
    # The allowance scales with the window: half the window, half the tokens.
    half = Throttle(load_config({"applications": [CHAT],
                                 "throttle": {"window_s": 30, "poisson_slack_sigmas": 0}}))
    assert half.allowance("chat") == pytest.approx(CHAT_ALLOWANCE / 2)


def test_poisson_slack_grows_with_the_square_root_of_the_expected_count():
    # chat expects 3 interactions a minute: 2 * 3 + 3 * sqrt(3) interactions of 200 tokens.
    slack = Throttle(load_config({"applications": [CHAT],
                                  "throttle": {**THROTTLE, "poisson_slack_sigmas": 3}}))
    assert slack.allowance("chat") == pytest.approx((2 * 3 + 3 * 3 ** 0.5) * 200)
    # A user expected to call once in ten windows may still call once in any window.
    rare = {**CHAT, "id": "rare", "interactions_per_minute": 0.1}
    rare_throttle = Throttle(load_config({"applications": [rare], "throttle": {"window_s": 60}}))
    assert rare_throttle.allowance("rare") >= 200


@pytest.mark.parametrize(
    ("kv_usage", "waiting", "overloaded"),
    [(0.5, 0, False), (0.9, 0, True), (0.89, 9, False), (0.1, 10, True)],
)
def test_overload_is_kv_usage_or_waiting_queue(kv_usage, waiting, overloaded):
    assert Throttle(CONFIG).observe_load(kv_usage, waiting) is overloaded


def test_bad_load_reports_are_rejected():
    with pytest.raises(ValueError, match="kv_usage = 1.5"):
        Throttle(CONFIG).observe_load(1.5, 0)
    with pytest.raises(ValueError, match="waiting = -1"):
        Throttle(CONFIG).observe_load(0.5, -1)


def test_without_overload_even_heavy_usage_is_admitted():
    throttle = Throttle(CONFIG)
    throttle.observe_load(0.1, 0)
    for i in range(50):
        assert throttle.submit(f"r{i}", chat(), prompt_tokens=1000, now=float(i)) is Decision.ADMIT
    assert throttle.usage(chat(), now=49.0) > CHAT_ALLOWANCE


def test_over_allowance_under_overload_is_held_then_released_when_load_drops():
    throttle = overloaded_throttle()
    assert throttle.submit("r1", chat(), prompt_tokens=1100, now=0.0) is Decision.ADMIT
    assert throttle.submit("r2", chat(), prompt_tokens=200, now=1.0) is Decision.HOLD  # 1100 + 200 > 1200
    assert throttle.submit("r3", chat(), prompt_tokens=10, now=2.0) is Decision.HOLD  # behind r2, no overtaking
    assert throttle.release(now=3.0) == []
    throttle.observe_load(0.2, 0)
    assert throttle.release(now=4.0) == ["r2", "r3"]
    stats = throttle.stats()["alice"]
    assert (stats.submitted, stats.admitted, stats.held, stats.released, stats.holding) == (3, 1, 2, 2, 0)


def test_held_request_is_released_once_usage_leaves_the_window():
    throttle = overloaded_throttle()
    throttle.submit("r1", chat(), prompt_tokens=1100, now=0.0)
    assert throttle.submit("r2", chat(), prompt_tokens=500, now=10.0) is Decision.HOLD
    assert throttle.release(now=59.0) == []  # r1's tokens are still in the window
    assert throttle.release(now=60.0) == ["r2"]  # ...and now they are not


def test_generated_tokens_count_toward_usage():
    throttle = overloaded_throttle()
    throttle.submit("r1", chat(), prompt_tokens=100, now=0.0)
    throttle.record_usage(chat(), output_tokens=500, now=1.0)  # 1000 weighted
    assert throttle.usage(chat(), now=1.0) == pytest.approx(1100)
    assert throttle.submit("r2", chat(), prompt_tokens=150, now=2.0) is Decision.HOLD


def test_token_length_aware_a_long_prompt_is_held_where_a_short_one_passes():
    throttle = overloaded_throttle()
    throttle.submit("r1", chat("alice"), prompt_tokens=1000, now=0.0)
    throttle.submit("r2", chat("bob"), prompt_tokens=1000, now=0.0)
    assert throttle.submit("short", chat("alice"), prompt_tokens=150, now=1.0) is Decision.ADMIT
    assert throttle.submit("long", chat("bob"), prompt_tokens=250, now=1.0) is Decision.HOLD


def test_one_pairs_backlog_does_not_block_another_pair():
    throttle = overloaded_throttle()
    throttle.submit("a1", chat("alice"), prompt_tokens=1200, now=0.0)
    assert throttle.submit("a2", chat("alice"), prompt_tokens=10, now=1.0) is Decision.HOLD
    assert throttle.submit("b1", chat("bob"), prompt_tokens=10, now=1.0) is Decision.ADMIT
    # Same tenant, other application: its own window.
    agent = RequestIdentity("alice", "agent")
    assert throttle.submit("a3", agent, prompt_tokens=10, now=1.0) is Decision.ADMIT


def test_legitimate_heavy_agent_is_not_throttled_while_a_chat_flooder_is():
    throttle = overloaded_throttle()
    decisions = {"agent": [], "flood": []}
    for minute in range(5):
        start = minute * 60.0
        for call in range(4):  # one agent task per minute, 4 calls of its characteristic shape
            identity = RequestIdentity("carol", "agent", f"task-{minute}", call)
            decisions["agent"].append(throttle.submit(f"c{minute}-{call}", identity, 300, start + call))
            throttle.record_usage(identity, output_tokens=100, now=start + call + 0.5)
        for i in range(20):  # 20 chat calls per minute where 3 are characteristic
            decisions["flood"].append(throttle.submit(f"m{minute}-{i}", chat("mallory"), 100, start + i))
    assert all(decision is Decision.ADMIT for decision in decisions["agent"])
    assert decisions["flood"].count(Decision.HOLD) > len(decisions["flood"]) // 2


def test_follow_up_calls_are_never_held():
    throttle = overloaded_throttle()
    throttle.submit("first", chat(interaction="conv"), prompt_tokens=1200, now=0.0)
    # Same interaction, no call index: in progress, so admitted although far over allowance.
    assert throttle.submit("second", chat(interaction="conv"), prompt_tokens=900, now=1.0) is Decision.ADMIT
    # An explicit call index > 0 is a follow-up even for an interaction we have not seen.
    assert throttle.submit("third", chat(interaction="other", call_index=2), 900, now=2.0) is Decision.ADMIT
    # A new interaction is a first call, and is held.
    assert throttle.submit("new", chat(interaction="fresh"), prompt_tokens=10, now=3.0) is Decision.HOLD


def test_a_released_first_call_starts_its_interaction_and_counts_its_prompt():
    throttle = overloaded_throttle()
    throttle.submit("r1", chat(), prompt_tokens=1100, now=0.0)
    assert throttle.submit("first", chat(interaction="conv"), prompt_tokens=300, now=1.0) is Decision.HOLD
    throttle.observe_load(0.1, 0)
    assert throttle.release(now=2.0) == ["first"]
    assert throttle.usage(chat(), now=2.0) == pytest.approx(1400)
    throttle.observe_load(0.95, 0)
    assert throttle.submit("second", chat(interaction="conv"), prompt_tokens=300, now=3.0) is Decision.ADMIT


def test_an_interaction_idle_too_long_is_no_longer_in_progress():
    throttle = overloaded_throttle()
    throttle.submit("first", chat(interaction="conv"), prompt_tokens=100, now=0.0)
    throttle.record_usage(chat(), output_tokens=600, now=100.0)  # 1200: over the allowance at t=121
    assert throttle.is_follow_up(chat(interaction="conv"), now=120.0)
    assert not throttle.is_follow_up(chat(interaction="conv"), now=121.0)
    assert throttle.submit("late", chat(interaction="conv"), prompt_tokens=100, now=121.0) is Decision.HOLD


def test_interactions_belong_to_their_tenant():
    throttle = overloaded_throttle()
    throttle.submit("a", chat("alice", interaction="shared-id"), prompt_tokens=10, now=0.0)
    throttle.submit("b0", chat("bob"), prompt_tokens=1200, now=0.0)
    assert throttle.submit("b1", chat("bob", interaction="shared-id"), prompt_tokens=10, now=1.0) is Decision.HOLD


def test_expired_request_gets_a_reason_naming_tenant_application_usage_and_allowance():
    throttle = overloaded_throttle()
    throttle.submit("r1", chat(), prompt_tokens=1100, now=0.0)
    throttle.submit("r2", chat(), prompt_tokens=300, now=5.0)
    assert throttle.expire(now=34.9) == []
    [(request_id, reason)] = throttle.expire(now=35.0)
    assert request_id == "r2"
    for fragment in ("'alice'", "'chat'", "1100", "300", "1200", "max_hold_s", "30 s", "2x"):
        assert fragment in reason
    assert throttle.stats()["alice"].expired == 1 and not throttle.is_held("r2")


def test_cancel_forgets_a_held_request_only():
    throttle = overloaded_throttle()
    throttle.submit("r1", chat(), prompt_tokens=1200, now=0.0)
    throttle.submit("r2", chat(), prompt_tokens=10, now=1.0)
    assert throttle.cancel("r2") is True
    assert throttle.cancel("r2") is False
    assert throttle.cancel("r1") is False  # admitted, not held
    throttle.observe_load(0.1, 0)
    assert throttle.release(now=2.0) == []
    assert throttle.stats()["alice"].cancelled == 1


def test_disabled_throttle_admits_everything():
    throttle = Throttle(load_config({"throttle": {"enabled": False}}))
    throttle.observe_load(1.0, 1000)
    assert all(throttle.submit(f"r{i}", chat(), 10_000, float(i)) is Decision.ADMIT for i in range(20))


def test_a_held_request_id_cannot_be_submitted_twice():
    throttle = overloaded_throttle()
    throttle.submit("r1", chat(), prompt_tokens=1200, now=0.0)
    throttle.submit("r2", chat(), prompt_tokens=10, now=1.0)
    with pytest.raises(ValueError, match="'r2' is already held"):
        throttle.submit("r2", chat(), prompt_tokens=10, now=2.0)


# --------------------------------------------------------------------------- properties

IDENTITIES = st.builds(
    RequestIdentity,
    tenant=st.sampled_from(["alice", "bob"]),
    application=st.sampled_from(["chat", "agent"]),
    interaction=st.sampled_from([None, "i1", "i2", "i3"]),
    call_index=st.sampled_from([None, None, 0, 1, 3]),
)
# Prompt sizes from well under to over the chat allowance (1200), so that pairs go over it.
SUBMIT = st.tuples(st.just("submit"), IDENTITIES, st.sampled_from([10, 300, 800, 1500]))
OTHER_STEPS = {
    "load": st.tuples(st.just("load"), st.sampled_from([0.95, 0.5, 0.1]), st.sampled_from([0, 5, 15])),
    "usage": st.tuples(st.just("usage"), IDENTITIES, st.sampled_from([0, 100, 400])),
    "release": st.tuples(st.just("release")),
    "expire": st.tuples(st.just("expire")),
    "cancel": st.tuples(st.just("cancel"), st.integers(0, 40)),
    "tick": st.tuples(st.just("tick"), st.sampled_from([1, 5, 20, 40])),
}
# Half the steps submit, so that pairs go over their allowance and requests get held.
STEP_KINDS = ["submit"] * len(OTHER_STEPS) + list(OTHER_STEPS)
STEPS = st.lists(
    st.sampled_from(STEP_KINDS).flatmap(lambda kind: SUBMIT if kind == "submit" else OTHER_STEPS[kind]),
    min_size=10,
    max_size=60,
)


# As CONFIG, with a short hold so that random walks reach expiry often.
PROPERTY_CONFIG = load_config({"applications": [CHAT, AGENT], "throttle": {**THROTTLE, "max_hold_s": 10}})


def started_overloaded():
    throttle = Throttle(PROPERTY_CONFIG)
    throttle.observe_load(0.95, 0)
    return throttle


def replay(throttle, steps, on_submit, on_end, after_step=lambda: None) -> int:
    """Drive ``throttle`` through generated ``steps``; returns the final clock (seconds).

    ``on_submit(request_id, identity, decision, now)`` follows every submission and
    ``on_end(request_id, state, now)`` every release, expiry or cancellation.
    """
    now, ids = 0, itertools.count()
    for step in steps:
        kind = step[0]
        if kind == "submit":
            request_id = f"r{next(ids)}"
            on_submit(request_id, step[1], throttle.submit(request_id, step[1], step[2], float(now)), now)
        elif kind == "load":
            throttle.observe_load(step[1], step[2])
        elif kind == "usage":
            throttle.record_usage(step[1], step[2], float(now))
        elif kind == "release":
            for request_id in throttle.release(float(now)):
                on_end(request_id, "released", now)
        elif kind == "expire":
            for request_id, reason in throttle.expire(float(now)):
                assert "throttled" in reason
                on_end(request_id, "expired", now)
        elif kind == "cancel":
            request_id = f"r{step[1]}"
            if throttle.cancel(request_id):
                on_end(request_id, "cancelled", now)
        else:
            now += step[1]
        after_step()
    return now


@settings(max_examples=200, deadline=None)
@given(STEPS)
def test_follow_up_of_an_interaction_in_progress_is_never_held(steps):
    """(d) A call with call_index > 0, or whose interaction had a call admitted or released
    within interaction_idle_s, is admitted whatever the load and usage."""
    idle = PROPERTY_CONFIG.throttle.interaction_idle_s
    last_admitted: dict[tuple[str, str], int] = {}  # the model of interactions in progress
    held: dict[str, RequestIdentity] = {}

    def admitted(identity, now):
        if identity.interaction is not None:
            last_admitted[(identity.tenant, identity.interaction)] = now

    def on_submit(request_id, identity, decision, now):
        key = (identity.tenant, identity.interaction)
        follow_up = (identity.call_index or 0) > 0 or (
            identity.interaction is not None and key in last_admitted and now - last_admitted[key] <= idle
        )
        if follow_up:
            assert decision is Decision.ADMIT, (identity, now)
        if decision is Decision.ADMIT:
            admitted(identity, now)
        else:
            held[request_id] = identity

    def on_end(request_id, state, now):
        identity = held.pop(request_id)
        if state == "released":
            admitted(identity, now)

    replay(started_overloaded(), steps, on_submit, on_end)


@settings(max_examples=200, deadline=None)
@given(STEPS)
def test_every_submitted_request_ends_in_exactly_one_terminal_state(steps):
    """(e) admitted, released, expired or cancelled: once, and never silently dropped."""
    throttle = started_overloaded()
    outcome: dict[str, str] = {}
    submitted: list[str] = []

    def end(request_id, state, now=None):
        assert request_id in submitted and request_id not in outcome, (request_id, state)
        outcome[request_id] = state

    def on_submit(request_id, identity, decision, now):
        submitted.append(request_id)
        if decision is Decision.ADMIT:
            end(request_id, "admitted")

    def invariants():
        for stats in throttle.stats().values():
            assert stats.submitted == stats.admitted + stats.released + stats.expired + stats.cancelled + stats.holding
            assert stats.held == stats.released + stats.expired + stats.cancelled + stats.holding
        assert throttle.num_held() == len(submitted) - len(outcome)

    now = replay(throttle, steps, on_submit, end, invariants)
    # Whatever is still held leaves once the load drops: nothing waits forever.
    throttle.observe_load(0.0, 0)
    for request_id in throttle.release(float(now)):
        end(request_id, "released")
    assert sorted(outcome) == sorted(submitted)
    totals = {state: sum(1 for s in outcome.values() if s == state) for state in set(outcome.values())}
    stats = throttle.stats().values()
    assert sum(s.admitted for s in stats) == totals.get("admitted", 0)
    assert sum(s.released for s in stats) == totals.get("released", 0)
    assert sum(s.expired for s in stats) == totals.get("expired", 0)
    assert sum(s.cancelled for s in stats) == totals.get("cancelled", 0)


# ------------------------------------------------------------- joining the running batch
#
# CONFIG's longest expected prompt is the agent's 300 tokens: the headroom kept free of
# over-allowance traffic. A 10,000-token cache puts the 0.9 usage line at 1,000 free tokens.
CAPACITY = 10_000


def over_allowance_chat(throttle, tenant="alice", now=0.0):
    """Make ``tenant``'s chat pair use more than its 1,200-token allowance."""
    throttle.record_usage(chat(tenant), 700, now)  # 1,400 weighted output tokens
    assert throttle.over_allowance(chat(tenant), now)
    return chat(tenant)


def test_over_allowance_is_window_usage_above_the_allowance():
    throttle = Throttle(CONFIG)
    throttle.record_usage(chat(), CHAT_ALLOWANCE // 2 // 2, now=0.0)  # half the allowance
    assert not throttle.over_allowance(chat(), 0.0)
    over_allowance_chat(throttle, now=1.0)
    assert not throttle.over_allowance(chat("bob"), 1.0)  # per (tenant, application)
    assert not throttle.over_allowance(RequestIdentity("alice", "agent"), 1.0)
    assert not throttle.over_allowance(chat(), 1.0 + THROTTLE["window_s"])  # the window slid past


def test_over_allowance_again_after_the_window_slid_and_usage_grew():
    """A pair found under its allowance is not looked at again until it records usage (the
    scheduler asks for every running pair at every step); new usage must bring it back."""
    throttle = Throttle(CONFIG)
    over_allowance_chat(throttle, now=0.0)
    later = THROTTLE["window_s"] + 1.0
    assert not throttle.over_allowance(chat(), later)  # slid past: no longer over
    throttle.record_usage(chat(), CHAT_ALLOWANCE // 2 // 2, now=later)  # half the allowance
    assert not throttle.over_allowance(chat(), later)
    throttle.record_usage(chat(), CHAT_ALLOWANCE // 2, now=later + 1.0)  # now 1.5x
    assert throttle.over_allowance(chat(), later + 1.0)


def test_prompt_headroom_is_the_longest_expected_prompt():
    assert Throttle(CONFIG).prompt_headroom_tokens == AGENT["expected_input_tokens"]
    summarise = {"id": "summarise", "expected_input_tokens": 2048, "expected_system_tokens": 64,
                 "expected_output_tokens": 160, "interactions_per_minute": 1}
    assert Throttle(load_config({"applications": [CHAT, summarise]})).prompt_headroom_tokens == 2048 + 64
    assert Throttle().prompt_headroom_tokens == 256  # the implicit default application


@pytest.mark.parametrize(("free_after", "joins"), [
    (5_000, True),  # plenty of room
    (1_001, True),  # usage just under the 0.9 line, more than the 300-token headroom free
    (1_000, False),  # at the overload line
    (50, False),
])
def test_over_allowance_request_joins_only_below_the_overload_line(free_after, joins):
    throttle = Throttle(CONFIG)
    alice = over_allowance_chat(throttle)
    assert throttle.may_join_batch(alice, free_after, CAPACITY, batch_empty=False, now=0.0) is joins


def test_over_allowance_request_keeps_the_longest_expected_prompt_free():
    """On a small cache the 10 % above the overload line is less than one expected prompt."""
    throttle = Throttle(CONFIG)
    alice = over_allowance_chat(throttle)
    small = 2_000  # 0.9 line at 200 free tokens, below the 300-token headroom
    assert throttle.may_join_batch(alice, 300, small, batch_empty=False, now=0.0)
    assert not throttle.may_join_batch(alice, 299, small, batch_empty=False, now=0.0)


def test_in_allowance_requests_and_an_empty_batch_are_never_held_back():
    throttle = Throttle(CONFIG)
    alice = over_allowance_chat(throttle)
    assert throttle.may_join_batch(chat("bob"), 0, CAPACITY, batch_empty=False, now=0.0)
    assert throttle.may_join_batch(RequestIdentity("alice", "agent"), 0, CAPACITY, batch_empty=False, now=0.0)
    # Nothing runs: holding it back would idle the engine with work waiting.
    assert throttle.may_join_batch(alice, 0, CAPACITY, batch_empty=True, now=0.0)
    disabled = Throttle(load_config({"applications": [CHAT], "throttle": {**THROTTLE, "enabled": False}}))
    disabled.record_usage(chat(), 10_000, 0.0)
    assert disabled.may_join_batch(chat(), 0, CAPACITY, batch_empty=False, now=0.0)


def test_may_join_batch_rejects_an_empty_cache():
    with pytest.raises(ValueError, match="kv_capacity_tokens = 0"):
        Throttle(CONFIG).may_join_batch(chat(), 0, 0, batch_empty=False, now=0.0)


def running(name, identity, counter, blocks, computed):
    return RunningRequest(name, identity, counter, blocks, computed)


def test_eviction_takes_over_allowance_requests_least_computed_then_highest_counter():
    throttle = Throttle(CONFIG)
    flood, other = over_allowance_chat(throttle, "flood"), over_allowance_chat(throttle, "other")
    batch = [
        running("honest", chat("bob"), counter=900.0, blocks=50, computed=8),  # in allowance: never
        running("flood-old", flood, counter=500.0, blocks=10, computed=160),
        running("flood-new", flood, counter=500.0, blocks=4, computed=64),
        running("other", other, counter=300.0, blocks=20, computed=300),
        running("other-fresh", other, counter=300.0, blocks=2, computed=16),
        running("behind", over_allowance_chat(throttle, "behind"), counter=90.0, blocks=99, computed=1),
    ]
    evict = throttle.admission_victims
    # The waiting tenant's counter is 100: "behind" (90) is not ahead of it, so never a victim.
    # The cheapest recomputation goes first, though its tenant's counter is the lower one.
    assert evict(chat("carol"), 100.0, 2, batch, 0.0) == ["other-fresh"]
    assert evict(chat("carol"), 100.0, 3, batch, 0.0) == ["other-fresh", "flood-new"]
    assert evict(chat("carol"), 100.0, 16, batch, 0.0) == ["other-fresh", "flood-new", "flood-old"]
    assert evict(chat("carol"), 100.0, 17, batch, 0.0) == ["other-fresh", "flood-new", "flood-old", "other"]
    # All candidates free 36 blocks: not enough for 37, so nobody's work is thrown away.
    assert evict(chat("carol"), 100.0, 37, batch, 0.0) == []
    assert evict(chat("carol"), 100.0, 0, batch, 0.0) == []  # nothing short
    assert evict(chat("carol"), 400.0, 4, batch, 0.0) == ["flood-new"]  # "other" is behind 400
    # An over-allowance request never evicts anyone.
    assert evict(flood, 100.0, 3, batch, 0.0) == []


def test_eviction_breaks_equal_costs_by_the_highest_counter():
    throttle = Throttle(CONFIG)
    batch = [running("low", over_allowance_chat(throttle, "low"), counter=200.0, blocks=4, computed=64),
             running("high", over_allowance_chat(throttle, "high"), counter=700.0, blocks=4, computed=64)]
    assert throttle.admission_victims(chat("carol"), 100.0, 4, batch, 0.0) == ["high"]


REQUESTS = st.lists(
    st.tuples(st.sampled_from(["alice", "bob", "carol"]), st.floats(0, 1000), st.integers(1, 40),
              st.integers(1, 600)),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(requests=REQUESTS, over=st.sets(st.sampled_from(["alice", "bob", "carol", "dave"])),
       waiting=st.sampled_from(["alice", "bob", "carol", "dave"]), waiting_counter=st.floats(0, 1000),
       short=st.integers(-5, 200))
def test_eviction_frees_enough_by_evicting_only_over_allowance_tenants_ahead(requests, over, waiting,
                                                                            waiting_counter, short):
    throttle = Throttle(CONFIG)
    for tenant in over:
        over_allowance_chat(throttle, tenant)
    batch = [running(index, chat(tenant), counter, blocks, computed)
             for index, (tenant, counter, blocks, computed) in enumerate(requests)]
    victims = throttle.admission_victims(chat(waiting), waiting_counter, short, batch, 0.0)
    eligible = [r for r in batch if r.identity.tenant in over and r.counter > waiting_counter]
    if short <= 0 or waiting in over or sum(r.kv_blocks for r in eligible) < short:
        assert victims == []
        return
    chosen = [batch[index] for index in victims]
    assert len(set(victims)) == len(victims)
    assert all(r in eligible for r in chosen)
    freed = sum(r.kv_blocks for r in chosen)
    assert freed >= short
    assert freed - chosen[-1].kv_blocks < short  # the shortest prefix: no victim too many
    # Least computed first, then highest counter, then last admitted; every eligible request
    # left out ranks after the last victim.
    rank = [(r.computed_tokens, -r.counter, -r.ref) for r in chosen]
    assert rank == sorted(rank)
    assert all((r.computed_tokens, -r.counter, -r.ref) > rank[-1] for r in eligible if r.ref not in victims)
