"""The ``"fairserve"`` block: tenants, applications, token prices and throttle limits.

It arrives either from vLLM's ``--additional-config '{"fairserve": {...}}'`` (as
``vllm_config.additional_config`` in the scheduler's constructor) or from a JSON/YAML file.
Every policy module reads its numbers from here, so a deployment changes behaviour by
editing one block and never by editing code.

With no block at all everything still works: every tenant weighs 1, and every request
belongs to the implicit default application, whose charge normalisation is exactly 1, so the
counters then reduce to plain VTC.
"""

from __future__ import annotations

import json
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

#: The key under which vLLM's ``additional_config`` (and our files, optionally) hold the block.
FAIRSERVE_KEY = "fairserve"

#: Id of the application requests fall back to when the block names none.
IMPLICIT_DEFAULT_APPLICATION_ID = "default"

# The implicit default application: a single-call chat turn. Its numbers matter twice: they are
# the reference cost every charge is normalised to (a uniform scale, so it does not change who
# is served first), and they set the throttle allowance of untagged traffic.
#: Tokens of a typical user turn with its conversation context (ShareGPT-like chat sits in the
#: low hundreds of tokens per turn).
DEFAULT_EXPECTED_INPUT_TOKENS = 256
#: Untagged traffic has no known system prompt; whatever it has is counted as input.
DEFAULT_EXPECTED_SYSTEM_TOKENS = 0
#: Tokens of a typical chat answer; same order as the input, as in ShareGPT-like traces.
DEFAULT_EXPECTED_OUTPUT_TOKENS = 256
#: A person reading each answer before typing the next turn: about one turn every 10 s.
DEFAULT_INTERACTIONS_PER_MINUTE = 6.0

# Throttle defaults.
#: KV-cache usage fraction at which the engine counts as overloaded: above ~90 % new admissions
#: start to preempt running requests, which is when abusive load starts to hurt everyone.
DEFAULT_KV_USAGE_THRESHOLD = 0.9
#: Waiting-queue length (requests) at which the engine counts as overloaded even with free KV
#: cache: a queue this long means arrivals outpace admissions.
DEFAULT_WAITING_QUEUE_THRESHOLD = 64
#: Sliding window (seconds) of token usage; one minute matches the per-minute rates
#: (interactions_per_minute) the applications are described in.
DEFAULT_WINDOW_S = 60.0
#: Longest (seconds) a held request waits before it is ended with a reason: long enough to ride
#: out a burst, short enough for a client's HTTP timeout (commonly 60-120 s) not to fire first.
DEFAULT_MAX_HOLD_S = 30.0
#: How many times its application's characteristic a (tenant, application) may use per window
#: before it counts as abusive: 2x leaves room for legitimately busy users.
DEFAULT_USAGE_ALLOWANCE = 2.0
#: How long (seconds) after its last admitted call an interaction still counts as in progress,
#: so its follow-up calls are never held: ten minutes covers agents with slow tools and people
#: reading answers between turns.
DEFAULT_INTERACTION_IDLE_S = 600.0

#: Seconds in a minute: ``interactions_per_minute`` is per minute, windows are in seconds.
SECONDS_PER_MINUTE = 60.0
DEFAULT_POISSON_SLACK_SIGMAS = 3.0


class FairServeConfigError(ValueError):
    """A ``fairserve`` block or file that cannot be used; the message names key, value and fix."""


class _Block(BaseModel):
    # strict: "2" is not a weight and 1.5 is not a token count; a typo must not pass as a value.
    # No inf/nan: an infinite weight or price would freeze or blow up the counters.
    model_config = ConfigDict(
        extra="forbid", strict=True, allow_inf_nan=False, use_attribute_docstrings=True, frozen=True
    )


class TenantConfig(_Block):
    """A tenant (customer, team, API key) that is served fairly against the others."""

    id: str = Field(min_length=1)
    """Tenant id as clients send it in ``vllm_xargs={"tenant": ...}``."""

    weight: float = Field(1.0, gt=0)
    """Share of the engine relative to other backlogged tenants: weight 2 gets twice the service
    of weight 1. Unlisted tenants weigh 1. Raise it for tenants that pay for more capacity."""


class ApplicationConfig(_Block):
    """The characteristic shape of one application's LLM calls.

    Charges are normalised by this shape, so a tenant is not punished for using an application
    that is long by nature (summarisation, agents); the throttle allows each (tenant,
    application) a multiple of this shape per window.
    """

    id: str = Field(min_length=1)
    """Application id as clients send it in ``vllm_xargs={"application": ...}``."""

    expected_input_tokens: int = Field(ge=0)
    """Typical user/context tokens of one call (excluding the system prompt)."""

    expected_system_tokens: int = Field(ge=0)
    """Typical system-prompt / instruction tokens of one call."""

    expected_output_tokens: int = Field(ge=1)
    """Typical generated tokens of one call; at least 1, since every call decodes."""

    calls_per_interaction: int = Field(1, ge=1)
    """LLM calls one user interaction makes (an agent plans, calls tools, answers: several).
    Only the first call of an interaction may ever be throttled."""

    interactions_per_minute: float = Field(gt=0)
    """Interaction rate one legitimate user of this application produces. The throttle's
    allowance scales with it; raise it for machine clients such as code completion."""

    def expected_cost_per_call(self, weights: TokenWeights) -> float:
        """Weighted tokens of one characteristic call (the throttle's per-call allowance unit)."""
        return weights.cost(self.expected_input_tokens, self.expected_system_tokens, self.expected_output_tokens)

    def expected_cost_per_minute(self, weights: TokenWeights) -> float:
        """Weighted tokens one legitimate user of this application consumes per minute.

        This is the counters' normalisation unit: both the shape of a call and how often the
        application calls are its characteristic, so a code-completion user (short calls, many
        of them) and a summarisation user (long calls, few) who each use their application as
        it is meant to be used accrue service at the same normalised rate.
        """
        return (self.expected_cost_per_call(weights) * self.calls_per_interaction
                * self.interactions_per_minute)


class TokenWeights(_Block):
    """Price of each kind of token in weighted tokens, the unit counters and windows use."""

    input: float = Field(1.0, ge=0)
    """Price of a prompt token (prefill)."""

    system: float = Field(1.0, ge=0)
    """Price of a system-prompt token. Lower it when system prompts are prefix-cached and thus
    cost the engine little."""

    output: float = Field(2.0, ge=0)
    """Price of a generated token. Defaults to 2 as VTC's output price (Sheng et al., OSDI'24):
    a decoded token costs a whole forward step shared by the batch, and API prices of output
    tokens are about twice those of input tokens."""

    def cost(self, input_tokens: float, system_tokens: float, output_tokens: float) -> float:
        """Weighted tokens of the given token counts."""
        return self.input * input_tokens + self.system * system_tokens + self.output * output_tokens


class ThrottleConfig(_Block):
    """When and how hard abusive (tenant, application) pairs are held back."""

    enabled: bool = True
    """Turn throttling off to get pure weighted fair scheduling."""

    kv_usage_threshold: float = Field(DEFAULT_KV_USAGE_THRESHOLD, ge=0.0, le=1.0)
    """The engine is overloaded when its KV-cache usage fraction is at least this. Requests of
    over-allowance pairs also join the running batch only while usage stays below it (and the
    longest expected prompt of any application stays free), so the cache above it is kept for
    in-allowance arrivals."""

    waiting_queue_threshold: int = Field(DEFAULT_WAITING_QUEUE_THRESHOLD, ge=0)
    """The engine is overloaded when at least this many requests wait."""

    window_s: float = Field(DEFAULT_WINDOW_S, gt=0)
    """Sliding window (seconds) over which token usage is compared with the allowance."""

    max_hold_s: float = Field(DEFAULT_MAX_HOLD_S, gt=0)
    """Longest a held request waits (seconds) before it is ended with a reason."""

    usage_allowance: float = Field(DEFAULT_USAGE_ALLOWANCE, ge=1.0)
    """How many times its application's characteristic usage a (tenant, application) may use in
    one window before it counts as abusive; 1 means exactly the characteristic."""

    interaction_idle_s: float = Field(DEFAULT_INTERACTION_IDLE_S, gt=0)
    """Seconds after its last admitted call during which an interaction counts as in progress
    (its further calls are never held)."""

    poisson_slack_sigmas: float = Field(DEFAULT_POISSON_SLACK_SIGMAS, ge=0)
    """Slack for honest randomness: the allowance adds this many standard deviations
    (``sqrt(n)`` for ``n`` expected interactions per window) to ``usage_allowance * n``. A
    legitimate user's interactions arrive roughly as a Poisson process, so at low rates twice
    the mean is exceeded in many windows; 3 sigmas keep honest users under the allowance in all
    but about 0.1% of windows while a 10x flood still exceeds it. 0 gives the bare multiple."""


def _implicit_default_application(app_id: str) -> ApplicationConfig:
    return ApplicationConfig(
        id=app_id,
        expected_input_tokens=DEFAULT_EXPECTED_INPUT_TOKENS,
        expected_system_tokens=DEFAULT_EXPECTED_SYSTEM_TOKENS,
        expected_output_tokens=DEFAULT_EXPECTED_OUTPUT_TOKENS,
        interactions_per_minute=DEFAULT_INTERACTIONS_PER_MINUTE,
    )


def _duplicate_ids(items: list[TenantConfig] | list[ApplicationConfig], field: str, kind: str) -> None:
    first_index: dict[str, int] = {}
    for index, item in enumerate(items):
        if item.id in first_index:
            raise ValueError(
                f"duplicate {kind} id {item.id!r} at {field}[{first_index[item.id]}] and {field}[{index}]; "
                f"each {kind} id must appear once"
            )
        first_index[item.id] = index


class FairServeConfig(_Block):
    """The whole ``fairserve`` block."""

    tenants: list[TenantConfig] = Field(default_factory=list)
    """Tenants with a non-default weight. Unlisted tenants are served with weight 1."""

    applications: list[ApplicationConfig] = Field(default_factory=list)
    """Known application shapes. Requests naming an unlisted application count as the default
    application."""

    token_weights: TokenWeights = Field(default_factory=TokenWeights)
    """Prices of input, system and output tokens."""

    throttle: ThrottleConfig = Field(default_factory=ThrottleConfig)
    """Overload detection and throttling limits."""

    default_tenant: str = Field("default", min_length=1)
    """Tenant of requests that carry no (valid) tenant tag."""

    default_application: str = Field(IMPLICIT_DEFAULT_APPLICATION_ID, min_length=1)
    """Application of requests that carry no (valid or known) application tag. Either a listed
    application or "default", the built-in single-call chat shape."""

    _tenant_weights: dict[str, float] = PrivateAttr(default_factory=dict)
    _applications: dict[str, ApplicationConfig] = PrivateAttr(default_factory=dict)

    @field_validator("tenants")
    @classmethod
    def _unique_tenant_ids(cls, tenants: list[TenantConfig]) -> list[TenantConfig]:
        _duplicate_ids(tenants, "tenants", "tenant")
        return tenants

    @field_validator("applications")
    @classmethod
    def _unique_application_ids(cls, applications: list[ApplicationConfig]) -> list[ApplicationConfig]:
        _duplicate_ids(applications, "applications", "application")
        return applications

    @model_validator(mode="after")
    def _resolve(self) -> FairServeConfig:
        # Messages raised here start with the key they are about (relative to the block);
        # load_config puts "fairserve." in front.
        listed = {app.id: app for app in self.applications}
        if self.default_application not in listed:
            if self.default_application != IMPLICIT_DEFAULT_APPLICATION_ID:
                valid = ", ".join(repr(app_id) for app_id in listed) or "none are listed"
                raise ValueError(
                    f"default_application = {self.default_application!r}: names no listed application; "
                    f"valid: {IMPLICIT_DEFAULT_APPLICATION_ID!r} (the built-in chat shape) or a listed id ({valid})"
                )
            listed[self.default_application] = _implicit_default_application(self.default_application)
        # A zero-cost shape would make its normalisation factor infinite.
        for index, app in enumerate(listed.values()):
            if app.expected_cost_per_call(self.token_weights) <= 0:
                listed_here = index < len(self.applications)
                where = f"applications[{index}]" if listed_here else "the built-in default application"
                raise ValueError(
                    f"token_weights = {self.token_weights.model_dump()}: prices {where} ({app.id!r}) at 0 weighted "
                    "tokens per call, which cannot normalise its charges; give a positive weight to a kind of "
                    "token it expects, or expect more tokens"
                )
        self._applications = listed
        self._tenant_weights = {tenant.id: tenant.weight for tenant in self.tenants}
        return self

    def tenant_weight(self, tenant_id: str) -> float:
        """Weight of a tenant; unlisted tenants weigh 1 so that tagging alone grants nothing."""
        return self._tenant_weights.get(tenant_id, 1.0)

    def application(self, app_id: str) -> ApplicationConfig:
        """Shape of an application; unknown ids get the default application's shape, so a client
        cannot invent an application to escape its allowance."""
        return self._applications.get(app_id, self._applications[self.default_application])

    def is_known_application(self, app_id: str) -> bool:
        """Whether ``app_id`` is listed (or is the default application)."""
        return app_id in self._applications

    @property
    def default_application_config(self) -> ApplicationConfig:
        """The application untagged requests belong to; its cost is the normalisation reference."""
        return self._applications[self.default_application]

    def application_ids(self) -> list[str]:
        """Every known application id, the default included."""
        return list(self._applications)


# --------------------------------------------------------------------------------------------
# Loading


def load_config(source: None | FairServeConfig | Mapping[str, Any] | str | os.PathLike[str]) -> FairServeConfig:
    """Build the config from vLLM's ``additional_config``, a JSON string, or a .json/.yaml file.

    ``source`` may hold the bare block or a mapping with a top-level ``"fairserve"`` key (other
    top-level keys then belong to other plugins and are ignored). A mapping without that key is
    read as the bare block, so an ``additional_config`` holding only other plugins' keys must
    not be passed whole. ``None`` gives the defaults; a ``FairServeConfig`` is returned as is.
    Every failure is a :class:`FairServeConfigError` naming the file (if any), the dotted key,
    the bad value and what would be valid.
    """
    origin = ""
    if isinstance(source, FairServeConfig):
        return source
    if source is None:
        raw: Any = {}
    elif isinstance(source, Mapping):
        raw = source
    elif isinstance(source, str) and source.lstrip().startswith("{"):
        origin = "fairserve JSON string"
        try:
            raw = json.loads(source)
        except json.JSONDecodeError as error:
            raise FairServeConfigError(f"{origin}: not valid JSON ({error})") from None
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        origin = str(path)
        raw = _read_file(path)
    else:
        raise FairServeConfigError(
            f"fairserve config source of type {type(source).__name__} is not supported; "
            "pass None, a mapping, a JSON string or a path to a .json/.yaml/.yml file"
        )

    block = _unwrap(raw, origin)
    try:
        return FairServeConfig.model_validate(block)
    except ValidationError as error:
        raise FairServeConfigError(_describe(error, origin)) from None


_JSON_SUFFIXES = (".json",)
_YAML_SUFFIXES = (".yaml", ".yml")


def _read_file(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in _JSON_SUFFIXES + _YAML_SUFFIXES:
        raise FairServeConfigError(
            f"fairserve config file {path}: suffix {path.suffix!r} is not supported; "
            f"use one of {', '.join(_JSON_SUFFIXES + _YAML_SUFFIXES)}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FairServeConfigError(f"fairserve config file {path} does not exist") from None
    except OSError as error:
        raise FairServeConfigError(f"fairserve config file {path} cannot be read: {error}") from None
    try:
        if suffix in _JSON_SUFFIXES:
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise FairServeConfigError(f"fairserve config file {path}: not valid JSON ({error})") from None
    except yaml.YAMLError as error:
        raise FairServeConfigError(f"fairserve config file {path}: not valid YAML ({error})") from None


def _unwrap(raw: Any, origin: str) -> Mapping[str, Any]:
    where = f"{origin}: " if origin else ""
    if raw is None:  # an empty file
        return {}
    if not isinstance(raw, Mapping):
        raise FairServeConfigError(
            f"{where}{FAIRSERVE_KEY} = {_show(raw)}: expected a mapping (JSON object / YAML mapping) of settings"
        )
    if FAIRSERVE_KEY in raw:
        block = raw[FAIRSERVE_KEY]
        if block is None:  # "fairserve:" with nothing under it
            return {}
        if not isinstance(block, Mapping):
            raise FairServeConfigError(
                f"{where}{FAIRSERVE_KEY} = {_show(block)}: expected a mapping (JSON object / YAML mapping) of settings"
            )
        return block
    return raw


_VALUE_SHOWN_CHARS = 80  # long values (a whole list) would drown the message


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _VALUE_SHOWN_CHARS else text[: _VALUE_SHOWN_CHARS - 3] + "..."


def _dotted(loc: tuple[int | str, ...]) -> str:
    path = FAIRSERVE_KEY
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The config model that owns the last key of ``loc`` (to list its valid keys)."""
    model: Any = FairServeConfig
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        args = typing.get_args(annotation)
        model = args[0] if typing.get_origin(annotation) is list and args else annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _describe(error: ValidationError, origin: str) -> str:
    where = f"{origin}: " if origin else ""
    lines = []
    for item in error.errors():
        loc = tuple(item["loc"])
        if item["type"] == "extra_forbidden":
            owner = _model_at(loc[:-1])
            valid = ", ".join(owner.model_fields) if owner else "see the documentation"
            lines.append(f"{_dotted(loc)}: unknown key {loc[-1]!r}; valid keys here: {valid}")
            continue
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            lines.append(f"{_dotted(loc)}: required key is missing")
        elif item["type"] == "value_error" and not loc:
            lines.append(f"{FAIRSERVE_KEY}.{message}")
        elif item["type"] == "value_error":
            lines.append(f"{_dotted(loc)}: {message}")
        else:
            lines.append(f"{_dotted(loc)} = {_show(item['input'])}: {message}")
    count = len(lines)
    header = f"{where}invalid fairserve config ({count} problem{'s' if count != 1 else ''})"
    return header + ":\n  " + "\n  ".join(lines)
