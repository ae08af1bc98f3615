"""Weighted service counters: prices, tenant weights, application normalisation, the lift."""

from __future__ import annotations

from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vllm_fairserve.counters as counters_module
from vllm_fairserve.config import load_config
from vllm_fairserve.counters import WeightedServiceCounters, preemption_order

pytestmark = pytest.mark.unit

SUMMARISE = {
    "id": "summarise",
    "expected_input_tokens": 4000,
    "expected_system_tokens": 100,
    "expected_output_tokens": 300,
    "interactions_per_minute": 1,
}
COMPLETE = {
    "id": "complete",
    "expected_input_tokens": 256,
    "expected_system_tokens": 64,
    "expected_output_tokens": 32,
    "interactions_per_minute": 30,
}


def test_without_config_charges_are_plain_vtc():
    counters = WeightedServiceCounters()
    counters.charge_prefill("a", "default", input_tokens=100, system_tokens=10)
    counters.charge_decode("a", "default", tokens=7)
    # VTC's linear cost: 1 per input token, 2 per output token; system tokens priced as input.
    assert counters.counter("a") == pytest.approx(100 + 10 + 2 * 7)
    service = counters.service("a")
    assert (service.input_tokens, service.system_tokens, service.output_tokens) == (100, 10, 7)
    assert service.weighted_tokens == pytest.approx(124)


def test_token_weights_price_each_kind():
    config = load_config({"token_weights": {"input": 0.5, "system": 0.25, "output": 3}})
    counters = WeightedServiceCounters(config)
    reference = config.default_application_config.expected_cost_per_call(config.token_weights)
    assert reference == pytest.approx(0.5 * 256 + 3 * 256)
    counters.charge_prefill("a", "default", input_tokens=8, system_tokens=4)
    counters.charge_decode("a", "default", tokens=2)
    assert counters.counter("a") == pytest.approx(0.5 * 8 + 0.25 * 4 + 3 * 2)


def test_tenant_weight_divides_the_charge():
    counters = WeightedServiceCounters(load_config({"tenants": [{"id": "gold", "weight": 4}]}))
    counters.charge_prefill("gold", "default", 400)
    counters.charge_prefill("plain", "default", 400)
    assert counters.counter("gold") == pytest.approx(100)
    assert counters.counter("plain") == pytest.approx(400)
    # The raw service is what was served, whatever the weight.
    assert counters.service("gold").weighted_tokens == counters.service("plain").weighted_tokens == 400


def test_a_characteristic_minute_of_any_application_costs_the_reference():
    """Normalisation: one minute of an application used as characterised is worth one default minute."""
    config = load_config({"applications": [SUMMARISE, COMPLETE]})
    counters = WeightedServiceCounters(config)
    reference = config.default_application_config.expected_cost_per_minute(config.token_weights)
    for app in (SUMMARISE, COMPLETE):
        tenant = f"user-of-{app['id']}"
        calls = app.get("calls_per_interaction", 1) * app["interactions_per_minute"]
        for _ in range(int(calls)):
            counters.charge_prefill(tenant, app["id"], app["expected_input_tokens"],
                                    app["expected_system_tokens"])
            counters.charge_decode(tenant, app["id"], app["expected_output_tokens"])
        assert counters.counter(tenant) == pytest.approx(reference * int(calls) / calls)
    # ...while the raw service differs by the shapes and rates.
    long_raw = counters.service("user-of-summarise").weighted_tokens
    short_raw = counters.service("user-of-complete").weighted_tokens
    assert long_raw == pytest.approx((4000 + 100 + 2 * 300) * int(SUMMARISE["interactions_per_minute"]))
    assert short_raw == pytest.approx((256 + 64 + 2 * 32) * int(COMPLETE["interactions_per_minute"]))


def test_unknown_application_is_charged_as_the_default():
    config = load_config({"applications": [SUMMARISE]})
    counters = WeightedServiceCounters(config)
    assert counters.normalisation("nobody-configured-this") == 1.0
    default_rate = (256 + 2 * 256) * config.default_application_config.interactions_per_minute
    summarise_rate = (4000 + 100 + 600) * SUMMARISE["interactions_per_minute"]
    assert counters.normalisation("summarise") == pytest.approx(default_rate / summarise_rate)


def test_negative_token_counts_are_rejected():
    counters = WeightedServiceCounters()
    with pytest.raises(ValueError, match="input_tokens = -1"):
        counters.charge_prefill("a", "default", -1)
    with pytest.raises(ValueError, match="tokens = -2"):
        counters.charge_decode("a", "default", -2)


# ---------------------------------------------------------------------------------- the lift


def test_newly_active_tenant_is_lifted_to_the_minimum_active_counter():
    counters = WeightedServiceCounters()
    for tenant, tokens in (("a", 100), ("b", 300)):
        counters.activate(tenant)
        counters.charge_prefill(tenant, "default", tokens)
    assert counters.activate("newcomer") == 100.0
    assert counters.counter("newcomer") == 100.0


def test_lift_never_lowers_a_counter():
    counters = WeightedServiceCounters()
    counters.charge_prefill("rich", "default", 500)
    counters.activate("a")
    counters.charge_prefill("a", "default", 100)
    assert counters.activate("rich") == 500.0


def test_idle_tenants_do_not_set_the_floor():
    counters = WeightedServiceCounters()
    counters.activate("low")
    counters.activate("high")
    counters.charge_prefill("high", "default", 300)
    counters.deactivate("low")  # its 0 must not count any more
    assert counters.activate("back") == 300.0


def test_with_no_active_tenant_the_counter_is_kept():
    counters = WeightedServiceCounters()
    counters.activate("a")
    counters.charge_prefill("a", "default", 50)
    counters.deactivate("a")
    assert counters.activate("b") == 0.0  # as VTC's artifact: nobody to compete against
    assert counters.active_tenants() == frozenset({"b"})


def test_activating_an_active_tenant_does_nothing():
    counters = WeightedServiceCounters()
    counters.activate("a")
    counters.charge_prefill("a", "default", 500)
    counters.activate("b")
    assert counters.activate("b") == 500.0
    counters.charge_prefill("b", "default", 10)
    assert counters.activate("b") == 510.0  # not re-lifted, not reset


def test_pick_returns_lowest_counter_with_deterministic_ties():
    counters = WeightedServiceCounters()
    counters.charge_prefill("b", "default", 5)
    assert counters.pick(["b", "c", "a"]) == "a"
    assert counters.pick(["b"]) == "b"
    with pytest.raises(ValueError):
        counters.pick([])


OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["activate", "deactivate", "charge"]),
        st.sampled_from([f"t{i}" for i in range(6)]),
        st.integers(0, 50),
    ),
    max_size=150,
)


@settings(max_examples=150, deadline=None)
@given(OPERATIONS, st.booleans())
def test_min_active_equals_brute_force_under_random_operations(operations, rebuild_often):
    """The lazy heap's minimum is the true minimum, and the lift matches its definition.

    With ``rebuild_often`` the heap is compacted at almost every activation, so the rebuild
    path is checked as well as the lazy one.
    """
    slack = 0 if rebuild_often else counters_module.HEAP_REBUILD_SLACK
    with mock.patch.object(counters_module, "HEAP_REBUILD_SLACK", slack):
        _check_min_active(operations)


def _check_min_active(operations):
    counters = WeightedServiceCounters()
    for operation, tenant, tokens in operations:
        if operation == "activate":
            was_active = counters.is_active(tenant)
            others = [counters.counter(t) for t in counters.active_tenants()]
            before = counters.counter(tenant)
            counters.activate(tenant)
            expected = before if was_active or not others else max(before, min(others))
            assert counters.counter(tenant) == expected
        elif operation == "deactivate":
            counters.deactivate(tenant)
        else:
            counters.charge_decode(tenant, "default", tokens)
        active = counters.active_tenants()
        brute = min((counters.counter(t) for t in active), default=None)
        assert counters.min_active() == brute


def test_preemption_order_puts_the_least_computed_then_highest_counter_last():
    # (name, tenant counter, computed tokens) in admission order.
    running = [("a_long", 5.0, 300), ("b", 1.0, 20), ("a_short", 5.0, 20), ("a_short_later", 5.0, 20),
               ("c_fresh", 0.5, 4)]
    ordered = sorted(running, key=lambda item: preemption_order(item[1], item[2], False))  # stable, as vLLM's list
    # The victim (last) is the cheapest to recompute, whatever its tenant's counter; among equal
    # costs the highest counter, then the last admitted; the long request goes last of all.
    assert [name for name, *_ in ordered] == ["a_long", "b", "a_short", "a_short_later", "c_fresh"]
    without_fresh = sorted(running[:4], key=lambda item: preemption_order(item[1], item[2], False))
    assert without_fresh[-1][0] == "a_short_later"


def test_preemption_order_takes_over_allowance_requests_first():
    """Traffic the throttle would hold gives memory back before any in-allowance request, even
    when it has the most KV computed and its tenant the lowest counter."""
    # (name, tenant counter, computed tokens, over allowance) in admission order.
    running = [("flood_long", 0.5, 300, True), ("honest_fresh", 9.0, 4, False), ("flood_short", 0.5, 40, True),
               ("honest", 5.0, 20, False)]
    ordered = sorted(running, key=lambda item: preemption_order(*item[1:]))
    assert [name for name, *_ in ordered] == ["honest", "honest_fresh", "flood_long", "flood_short"]
