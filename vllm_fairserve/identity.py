"""Who a request belongs to: tenant, application and interaction, read from ``vllm_xargs``.

Clients tag requests with ``vllm_xargs={"tenant": ..., "application": ..., "interaction": ...,
"call_index": ...}``; vLLM hands them to the scheduler as ``SamplingParams.extra_args``. These
values come from the network, so reading them must never raise inside the engine: a malformed
value falls back to the default for that field and is reported once in the log (a client that
sends garbage on every request must not flood it).
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vllm_fairserve.config import FairServeConfig

logger = logging.getLogger(__name__)

#: The ``vllm_xargs`` keys this module reads.
TENANT_KEY = "tenant"
APPLICATION_KEY = "application"
INTERACTION_KEY = "interaction"
CALL_INDEX_KEY = "call_index"

#: Longest accepted id (characters). Ids key in-memory tables and log lines; 128 fits UUIDs,
#: API-key hashes and readable names while a client cannot make the tables hold megabytes.
MAX_ID_LENGTH = 128


@dataclass(frozen=True, slots=True)
class RequestIdentity:
    """Tenant, application and (optional) interaction of one request.

    ``interaction`` groups the calls of one user interaction (an agent's several calls);
    ``call_index`` is the 0-based position of this call in it, when the client knows it.
    Both may be None: then the request counts as the first call of its own interaction.
    """

    tenant: str
    application: str
    interaction: str | None = None
    call_index: int | None = None


def default_identity(config: FairServeConfig) -> RequestIdentity:
    """The identity of an untagged request."""
    return RequestIdentity(tenant=config.default_tenant, application=config.default_application)


#: Problems already logged, as (field, problem) pairs; see identity_from_extra_args.
_PROCESS_WARNED: set[tuple[str, str]] = set()


def identity_from_extra_args(
    extra_args: Mapping[str, Any] | None,
    config: FairServeConfig,
    warned: set[tuple[str, str]] | None = None,
) -> RequestIdentity:
    """Read a request's identity from its ``extra_args``; never raises.

    A missing key silently means the default. A malformed value (wrong type, empty, longer than
    MAX_ID_LENGTH, control characters, negative call index) and an application id the config
    does not know fall back to the default for that field, with one warning per distinct
    (field, problem) recorded in ``warned``. By default ``warned`` is a process-wide set: it only
    limits log volume and decides nothing, and vLLM runs one scheduler per engine process.
    """
    seen = _PROCESS_WARNED if warned is None else warned
    if extra_args is None:
        return default_identity(config)
    if not isinstance(extra_args, Mapping):
        _warn_once(seen, "extra_args", f"is a {type(extra_args).__name__}, not a mapping", extra_args,
                   f"a mapping with keys {TENANT_KEY}, {APPLICATION_KEY}, {INTERACTION_KEY}, {CALL_INDEX_KEY}")
        return default_identity(config)

    tenant = _read_id(extra_args, TENANT_KEY, seen) or config.default_tenant
    application = _read_id(extra_args, APPLICATION_KEY, seen)
    if application is None:
        application = config.default_application
    elif not config.is_known_application(application):
        # Unknown ids would give a client a fresh throttle window per invented name.
        _warn_once(seen, APPLICATION_KEY, "names no configured application", application,
                   f"known: {', '.join(config.application_ids())}")
        application = config.default_application
    interaction = _read_id(extra_args, INTERACTION_KEY, seen)
    call_index = _read_call_index(extra_args, seen)
    return RequestIdentity(tenant=tenant, application=application, interaction=interaction, call_index=call_index)


def _read_id(extra_args: Mapping[str, Any], key: str, seen: set[tuple[str, str]]) -> str | None:
    """The id under ``key``, or None when it is absent or malformed."""
    if key not in extra_args or extra_args[key] is None:
        return None
    value = extra_args[key]
    if not isinstance(value, str):
        _warn_once(seen, key, f"is a {type(value).__name__}, not a string", value)
        return None
    if not value.strip():
        _warn_once(seen, key, "is empty", value)
        return None
    if len(value) > MAX_ID_LENGTH:
        _warn_once(seen, key, f"is longer than {MAX_ID_LENGTH} characters", value)
        return None
    if any(unicodedata.category(char) == "Cc" for char in value):
        _warn_once(seen, key, "contains control characters", value)
        return None
    return value


def _read_call_index(extra_args: Mapping[str, Any], seen: set[tuple[str, str]]) -> int | None:
    if CALL_INDEX_KEY not in extra_args or extra_args[CALL_INDEX_KEY] is None:
        return None
    value = extra_args[CALL_INDEX_KEY]
    # bool is an int subclass, but True is not a position.
    if not isinstance(value, int) or isinstance(value, bool):
        _warn_once(seen, CALL_INDEX_KEY, f"is a {type(value).__name__}, not an integer", value)
        return None
    if value < 0:
        _warn_once(seen, CALL_INDEX_KEY, "is negative", value)
        return None
    return value


#: Characters of an offending value quoted in the log; enough to recognise it, not to flood.
_LOGGED_VALUE_CHARS = 40


def _warn_once(seen: set[tuple[str, str]], field: str, problem: str, value: Any, valid: str = "") -> None:
    if (field, problem) in seen:
        return
    seen.add((field, problem))
    shown = repr(value)
    if len(shown) > _LOGGED_VALUE_CHARS:
        shown = shown[: _LOGGED_VALUE_CHARS - 3] + "..."
    expected = valid or (
        "a non-negative integer" if field == CALL_INDEX_KEY
        else f"a non-empty string of at most {MAX_ID_LENGTH} characters without control characters"
    )
    logger.warning(
        "fairserve: vllm_xargs %r = %s %s; using the default for this field (expected %s). "
        "Further requests with this problem are not reported.",
        field, shown, problem, expected,
    )
