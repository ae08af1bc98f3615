"""Reading tenant / application / interaction from vllm_xargs: defaults, fallbacks, one warning."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vllm_fairserve.identity as identity_module
from vllm_fairserve.config import load_config
from vllm_fairserve.identity import MAX_ID_LENGTH, RequestIdentity, identity_from_extra_args

pytestmark = pytest.mark.unit

LOGGER = "vllm_fairserve.identity"

CONFIG = load_config(
    {
        "applications": [
            {
                "id": "agent",
                "expected_input_tokens": 1500,
                "expected_system_tokens": 800,
                "expected_output_tokens": 400,
                "calls_per_interaction": 4,
                "interactions_per_minute": 1,
            }
        ],
        "default_tenant": "anonymous",
    }
)
DEFAULT = RequestIdentity(tenant="anonymous", application="default")


def read(extra_args, warned=None):
    return identity_from_extra_args(extra_args, CONFIG, warned=set() if warned is None else warned)


def test_full_tags_are_read():
    identity = read({"tenant": "acme", "application": "agent", "interaction": "run-1", "call_index": 2})
    assert identity == RequestIdentity("acme", "agent", "run-1", 2)


@pytest.mark.parametrize("extra_args", [None, {}, {"unrelated": 1}, {"tenant": None}])
def test_missing_tags_mean_defaults_without_a_warning(extra_args, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert read(extra_args) == DEFAULT
    assert caplog.records == []


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("tenant", 42, "not a string"),
        ("tenant", "", "is empty"),
        ("tenant", "   ", "is empty"),
        ("tenant", "x" * (MAX_ID_LENGTH + 1), f"longer than {MAX_ID_LENGTH}"),
        ("tenant", "evil\nname", "control characters"),
        ("application", ["agent"], "not a string"),
        ("application", "made-up", "names no configured application"),
        ("interaction", {"id": 1}, "not a string"),
        ("interaction", "a\x00b", "control characters"),
        ("call_index", "1", "not an integer"),
        ("call_index", True, "not an integer"),
        ("call_index", 1.0, "not an integer"),
        ("call_index", -1, "is negative"),
    ],
)
def test_malformed_value_falls_back_for_that_field_only_and_warns(field, value, problem, caplog):
    good = {"tenant": "acme", "application": "agent", "interaction": "run-1", "call_index": 1}
    fallback = {"tenant": "anonymous", "application": "default", "interaction": None, "call_index": None}
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        identity = read({**good, field: value})
    expected = {**good, field: fallback[field]}
    assert identity == RequestIdentity(**expected)
    assert len(caplog.records) == 1
    assert field in caplog.records[0].getMessage() and problem in caplog.records[0].getMessage()


def test_an_id_of_exactly_the_maximum_length_is_kept():
    assert read({"tenant": "t" * MAX_ID_LENGTH}).tenant == "t" * MAX_ID_LENGTH


def test_same_problem_is_logged_once_distinct_problems_each_once(caplog):
    warned: set[tuple[str, str]] = set()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for tenant in ["", "", 7, 8, ""]:
            read({"tenant": tenant}, warned)
        read({"application": 3}, warned)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3
    assert sum("is empty" in m for m in messages) == 1
    assert sum("'tenant'" in m and "not a string" in m for m in messages) == 1
    assert sum("'application'" in m for m in messages) == 1


def test_process_wide_dedup_applies_without_an_explicit_set(caplog, monkeypatch):
    monkeypatch.setattr(identity_module, "_PROCESS_WARNED", set())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        identity_from_extra_args({"call_index": -3}, CONFIG)
        identity_from_extra_args({"call_index": -4}, CONFIG)
    assert len(caplog.records) == 1 and "negative" in caplog.records[0].getMessage()


def test_extra_args_that_is_not_a_mapping_gives_defaults(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert read(["tenant", "acme"]) == DEFAULT
    assert len(caplog.records) == 1


JSON_LIKE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=200),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=5,
)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["tenant", "application", "interaction", "call_index", "other"]), JSON_LIKE, max_size=5
    )
)
def test_never_raises_and_always_yields_usable_ids(extra_args):
    identity = read(extra_args)
    assert isinstance(identity.tenant, str) and 0 < len(identity.tenant) <= MAX_ID_LENGTH
    assert identity.application in CONFIG.application_ids()
    assert identity.interaction is None or (0 < len(identity.interaction) <= MAX_ID_LENGTH)
    assert identity.call_index is None or (isinstance(identity.call_index, int) and identity.call_index >= 0)
