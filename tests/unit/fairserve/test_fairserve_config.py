"""The fairserve block: defaults, loading from every source, and errors that name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vllm_fairserve.config import (
    DEFAULT_EXPECTED_INPUT_TOKENS,
    DEFAULT_EXPECTED_OUTPUT_TOKENS,
    FairServeConfig,
    FairServeConfigError,
    TenantConfig,
    load_config,
)

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]

CHAT = {
    "id": "chat",
    "expected_input_tokens": 512,
    "expected_system_tokens": 200,
    "expected_output_tokens": 256,
    "interactions_per_minute": 4,
}


def test_no_config_gives_working_defaults():
    config = load_config(None)
    assert config.tenant_weight("anyone") == 1.0
    default_app = config.application("never-configured")
    assert default_app.id == "default"
    assert default_app.expected_input_tokens == DEFAULT_EXPECTED_INPUT_TOKENS
    assert default_app.expected_output_tokens == DEFAULT_EXPECTED_OUTPUT_TOKENS
    assert config.token_weights.output == 2.0
    assert config.throttle.enabled


def test_tenant_weights_and_applications_resolve():
    config = load_config({"tenants": [{"id": "acme", "weight": 3}], "applications": [CHAT]})
    assert config.tenant_weight("acme") == 3.0
    assert config.tenant_weight("other") == 1.0
    assert config.application("chat").expected_system_tokens == 200
    assert config.application("unknown").id == "default"  # implicit default stays available
    assert set(config.application_ids()) == {"chat", "default"}


def test_a_listed_default_application_replaces_the_built_in_one():
    config = load_config({"applications": [CHAT], "default_application": "chat"})
    assert config.application("unknown").id == "chat"
    assert config.default_application_config.expected_input_tokens == 512


def test_wrapper_key_as_from_vllm_additional_config_and_other_plugins_keys_are_ignored():
    config = load_config({"fairserve": {"tenants": [{"id": "a", "weight": 2}]}, "other_plugin": {"x": 1}})
    assert config.tenant_weight("a") == 2.0


def test_a_built_config_passes_through():
    config = FairServeConfig(tenants=[TenantConfig(id="a", weight=2)])
    assert load_config(config) is config


def test_json_string_is_accepted():
    config = load_config(json.dumps({"fairserve": {"throttle": {"window_s": 10}}}))
    assert config.throttle.window_s == 10.0


def test_json_and_yaml_files_are_accepted(tmp_path):
    as_json = tmp_path / "f.json"
    as_json.write_text(json.dumps({"tenants": [{"id": "a", "weight": 4}]}))
    as_yaml = tmp_path / "f.yml"
    as_yaml.write_text("fairserve:\n  tenants:\n    - {id: a, weight: 5}\n")
    assert load_config(as_json).tenant_weight("a") == 4.0
    assert load_config(str(as_yaml)).tenant_weight("a") == 5.0


def test_empty_yaml_file_means_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == FairServeConfig()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        pytest.param(
            {"tenants": [{"id": "a", "wieght": 2}]},
            ["fairserve.tenants[0].wieght", "unknown key", "valid keys here: id, weight"],
            id="unknown-nested-key",
        ),
        pytest.param(
            {"fairserve": {"throttel": {}}},
            ["fairserve.throttel", "unknown key", "throttle"],
            id="unknown-top-level-key",
        ),
        pytest.param(
            {"tenants": [{"id": "a"}, {"id": "b", "weight": -1}]},
            ["fairserve.tenants[1].weight", "-1", "greater than 0"],
            id="negative-weight",
        ),
        pytest.param(
            {"tenants": [{"id": "a", "weight": "heavy"}]},
            ["fairserve.tenants[0].weight", "'heavy'", "valid number"],
            id="wrong-type-weight",
        ),
        pytest.param(
            {"throttle": {"waiting_queue_threshold": 2.5}},
            ["fairserve.throttle.waiting_queue_threshold", "2.5", "valid integer"],
            id="wrong-type-int",
        ),
        pytest.param(
            {"throttle": {"kv_usage_threshold": 1.5}},
            ["fairserve.throttle.kv_usage_threshold", "1.5", "less than or equal to 1"],
            id="out-of-range-fraction",
        ),
        pytest.param(
            {"token_weights": {"output": float("inf")}},
            ["fairserve.token_weights.output", "inf", "finite"],
            id="infinite-price",
        ),
        pytest.param(
            {"tenants": "acme"},
            ["fairserve.tenants", "'acme'", "valid list"],
            id="wrong-type-list",
        ),
        pytest.param(
            {"tenants": [{"id": "a"}, {"id": "b"}, {"id": "a", "weight": 2}]},
            ["fairserve.tenants", "duplicate tenant id 'a'", "tenants[0]", "tenants[2]"],
            id="duplicate-tenant",
        ),
        pytest.param(
            {"applications": [CHAT, dict(CHAT)]},
            ["fairserve.applications", "duplicate application id 'chat'"],
            id="duplicate-application",
        ),
        pytest.param(
            {"applications": [{"id": "x", "expected_input_tokens": 1}]},
            ["fairserve.applications[0].expected_output_tokens", "required key is missing"],
            id="missing-required",
        ),
        pytest.param(
            {"default_application": "chta", "applications": [CHAT]},
            ["fairserve.default_application", "'chta'", "'chat'"],
            id="default-application-typo",
        ),
        pytest.param(
            {"token_weights": {"input": 0, "system": 0, "output": 0}},
            ["fairserve.token_weights", "0 weighted tokens per call"],
            id="zero-cost-application",
        ),
        pytest.param({"fairserve": [1, 2]}, ["fairserve = [1, 2]", "mapping"], id="block-not-a-mapping"),
        pytest.param("{not json", ["not valid JSON"], id="bad-json-string"),
    ],
)
def test_bad_config_names_key_value_and_what_is_valid(source, expected):
    with pytest.raises(FairServeConfigError) as error:
        load_config(source)
    for fragment in expected:
        assert fragment in str(error.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(FairServeConfigError) as error:
        load_config({"tenants": [{"id": "a", "weight": 0}], "throttle": {"window_s": -1}})
    message = str(error.value)
    assert "2 problems" in message
    assert "fairserve.tenants[0].weight" in message and "fairserve.throttle.window_s" in message


def test_missing_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(FairServeConfigError, match="nope.yaml does not exist"):
        load_config(missing)


@pytest.mark.parametrize("name, text, complaint", [
    ("bad.yaml", "fairserve:\n  tenants: [\n", "not valid YAML"),
    ("bad.json", '{"tenants": [}', "not valid JSON"),
])
def test_unparsable_file_names_the_file(tmp_path, name, text, complaint):
    bad = tmp_path / name
    bad.write_text(text)
    with pytest.raises(FairServeConfigError) as error:
        load_config(bad)
    assert str(bad) in str(error.value) and complaint in str(error.value)


def test_validation_error_in_a_file_names_the_file_and_key(tmp_path):
    bad = tmp_path / "weights.yaml"
    bad.write_text("tenants:\n  - id: a\n    weight: -2\n")
    with pytest.raises(FairServeConfigError) as error:
        load_config(bad)
    assert str(bad) in str(error.value) and "fairserve.tenants[0].weight = -2" in str(error.value)


def test_unsupported_suffix_lists_the_valid_ones(tmp_path):
    odd = tmp_path / "f.toml"
    odd.write_text("")
    with pytest.raises(FairServeConfigError, match=r"\.json, \.yaml, \.yml"):
        load_config(odd)


def test_config_error_is_a_value_error():
    assert issubclass(FairServeConfigError, ValueError)


def test_every_field_is_documented():
    """The models are the reference a user reads: each field carries its description."""
    models = [FairServeConfig, TenantConfig]
    models += [FairServeConfig.model_fields[name].annotation for name in ("token_weights", "throttle")]
    from vllm_fairserve.config import ApplicationConfig

    models.append(ApplicationConfig)
    for model in models:
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no docstring"


def test_example_config_loads():
    config = load_config(ROOT / "configs" / "fairserve_example.yaml")
    assert [t.id for t in config.tenants] == ["acme", "globex"]
    assert config.tenant_weight("acme") == 2.0
    assert {app.id for app in config.applications} == {"chat", "code_completion", "summarisation", "rag", "agent"}
    assert config.application("agent").calls_per_interaction == 4
    assert config.default_application_config.id == "chat"
    # The summarisation shape is long in, the code-completion shape short in and out.
    chat = config.application("chat")
    assert config.application("summarisation").expected_input_tokens > chat.expected_input_tokens
    assert config.application("code_completion").expected_output_tokens < chat.expected_output_tokens
