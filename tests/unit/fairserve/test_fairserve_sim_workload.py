"""Workload generator: seeded, shapes as declared, arrival processes, the three abuses."""

from __future__ import annotations

import pytest

from vllm_fairserve.config import load_config
from vllm_fairserve.workload import (
    AGENT,
    CHAT,
    FLOOD_RATE_MULTIPLIER,
    LONG_PROMPT_TOKENS,
    SPLIT_PIECES,
    STANDARD_APPLICATIONS,
    SUMMARISATION,
    Abuse,
    OnOff,
    TokenRange,
    UserClass,
    UserSpec,
    generate_workload,
)

pytestmark = pytest.mark.unit

LONG_S = 6000.0  # long enough for rates to be measured within a few percent


def starts(workload, tenant):
    return [i.start_s for i in workload.interactions if i.tenant == tenant]


def test_same_seed_same_workload_and_users_are_independent():
    users = [UserSpec("a", "chat"), UserSpec("b", "agent")]
    first = generate_workload(users, 600.0, seed=9)
    assert first == generate_workload(users, 600.0, seed=9)
    assert first != generate_workload(users, 600.0, seed=10)
    more = generate_workload([*users, UserSpec("c", "code")], 600.0, seed=9)
    assert [i for i in more.interactions if i.tenant != "c"] == list(first.interactions)


def test_calls_follow_the_application_shape_and_the_config_declares_its_mean():
    workload = generate_workload([UserSpec(f"u{s.id}", s.id) for s in STANDARD_APPLICATIONS], LONG_S, seed=1)
    for shape in STANDARD_APPLICATIONS:
        interactions = [i for i in workload.interactions if i.application == shape.id]
        assert interactions and all(len(i.calls) == shape.calls_per_interaction for i in interactions)
        calls = [c for i in interactions for c in i.calls]
        assert all(shape.input_tokens.low <= c.input_tokens <= shape.input_tokens.high for c in calls)
        assert all(c.system_tokens == shape.system_tokens for c in calls)
        mean_output = sum(c.output_tokens for c in calls) / len(calls)
        assert mean_output == pytest.approx(shape.output_tokens.mean, rel=0.1)
        rate = len(interactions) / (LONG_S / 60.0)
        assert rate == pytest.approx(shape.interactions_per_minute, rel=0.1)
    config = load_config(workload.fairserve_config({"max_hold_s": 5.0}))
    assert config.application("agent").calls_per_interaction == AGENT.calls_per_interaction
    assert config.application("chat").expected_output_tokens == CHAT.output_tokens.mean
    assert config.throttle.max_hold_s == 5.0


def test_bursty_user_keeps_the_mean_rate_but_clusters_arrivals():
    bursts = OnOff(mean_on_s=20.0, mean_off_s=60.0)
    workload = generate_workload([UserSpec("p", "code"), UserSpec("b", "code", bursts=bursts)], LONG_S, seed=2)
    poisson, bursty = starts(workload, "p"), starts(workload, "b")
    assert len(bursty) == pytest.approx(len(poisson), rel=0.15)

    def busiest_minute(times):
        return max(sum(1 for t in times if m * 60 <= t < (m + 1) * 60) for m in range(int(LONG_S // 60)))

    assert busiest_minute(bursty) > 1.5 * busiest_minute(poisson)


def test_abuses():
    users = [UserSpec("normal", "chat"), UserSpec("flood", "chat", abuse=Abuse.FLOOD),
             UserSpec("split", "summarise", abuse=Abuse.SPLIT),
             UserSpec("long", "chat", abuse=Abuse.LONG_PROMPT)]
    workload = generate_workload(users, LONG_S, seed=3)
    assert workload.tenant_classes == {"normal": UserClass.WELL_BEHAVED, "flood": UserClass.ABUSIVE,
                                       "split": UserClass.ABUSIVE, "long": UserClass.ABUSIVE}
    ratio = len(starts(workload, "flood")) / len(starts(workload, "normal"))
    assert ratio == pytest.approx(FLOOD_RATE_MULTIPLIER, rel=0.15)
    split = [i for i in workload.interactions if i.tenant == "split"]
    assert len(split) == SPLIT_PIECES * len(set(i.start_s for i in split))
    assert all(len(i.calls) == 1 and SUMMARISATION.input_tokens.low <= i.calls[0].input_tokens for i in split)
    long_calls = [i.calls[0] for i in workload.interactions if i.tenant == "long"]
    assert all(LONG_PROMPT_TOKENS.low <= c.input_tokens <= LONG_PROMPT_TOKENS.high for c in long_calls)


def test_errors_name_the_key():
    with pytest.raises(ValueError, match=r"users\[1\].application = 'mail': unknown"):
        generate_workload([UserSpec("a", "chat"), UserSpec("b", "mail")], 60.0, seed=0)
    with pytest.raises(ValueError, match=r"users\[1\].tenant = 'a'"):
        generate_workload([UserSpec("a", "chat"), UserSpec("a", "chat", weight=2.0)], 60.0, seed=0)
    with pytest.raises(ValueError, match="low=5, high=1"):
        TokenRange(5, 1)
