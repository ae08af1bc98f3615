"""Per-tenant metrics of the FairScheduler: what each tenant was served, where it stands, and
what the throttle did to it, published where an operator can read it.

vLLM runs the scheduler in its engine-core process, apart from the API server that answers
HTTP, so anything kept in the scheduler is invisible to a client unless it is carried out. Three
outlets, each chosen because it works across that process boundary:

- **Prometheus** (``fairserve:*`` beside vLLM's ``vllm:*`` on the server's ``/metrics``). vLLM's
  ``/metrics`` reads prometheus_client's *multiprocess* files when ``PROMETHEUS_MULTIPROC_DIR``
  is set, and the engine-core process inherits that variable, so counters incremented in the
  scheduler show up there. Without the variable, counters in the engine-core process would be
  written to memory nobody reads; the exporter is then off (``prometheus: null``, the default,
  means "on exactly when the variable is set"). ``python -m vllm_fairserve.launch`` sets it;
  with ``vllm serve``, export it yourself (an empty directory) before starting.
- **A JSON file** (``path``), replaced atomically, for scripts on the same host and for offline
  ``LLM`` use.
- **A log line** every ``log_interval_s`` while the engine is busy.

Publishing happens inside the engine loop (no thread touches scheduler state): at most once
every ``publish_interval_s`` while requests are in flight, and once more whenever the engine
runs out of requests, because the engine then blocks until the next request arrives and a reader
of an idle server must see the final figures.

Settings come from vLLM's ``--additional-config`` under their own key, beside the policy block:
``{"fairserve": {...}, "fairserve_metrics": {"path": "/tmp/fairserve.json"}}``. They describe
where the figures go, not how requests are scheduled, so the simulator and the policy block
never see them.

This module imports no vLLM; prometheus_client is imported only when the exporter is built.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vllm_fairserve.config import FairServeConfigError
from vllm_fairserve.counters import WeightedServiceCounters
from vllm_fairserve.throttle import TenantThrottleStats, Throttle

logger = logging.getLogger(__name__)

#: Key of the metrics settings in vLLM's ``additional_config``.
METRICS_KEY = "fairserve_metrics"
#: prometheus_client reads this variable when it is imported to choose multiprocess mode.
PROMETHEUS_MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Label value of tenants past ``max_tenant_labels``; "_" cannot clash with a real id's meaning
#: since ids are free strings, so the name says what it is.
OTHER_TENANTS_LABEL = "_other"
#: Tenants named in the periodic log line (largest weighted service first).
LOG_TOP_TENANTS = 5


class MetricsConfig(BaseModel):
    """Where the per-tenant figures go and how often."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, use_attribute_docstrings=True,
                              frozen=True)

    publish_interval_s: float = Field(1.0, gt=0)
    """Least time (seconds) between two refreshes of the Prometheus series and the file while the
    engine is busy. Each refresh costs about a millisecond per thousand tenants (plus the file
    write), so one second keeps it far below 1% of engine time."""

    log_interval_s: float = Field(60.0, ge=0)
    """Seconds between two summary log lines while the engine is busy; 0 turns them off."""

    path: str | None = Field(None, min_length=1)
    """JSON file holding the latest snapshot (replaced atomically); none by default."""

    prometheus: bool | None = None
    """Export ``fairserve:*`` series. ``null``: when ``PROMETHEUS_MULTIPROC_DIR`` is set (only then
    can vLLM's ``/metrics`` see them); ``true``: required, start-up fails without the variable;
    ``false``: never."""

    max_tenant_labels: int = Field(1000, ge=1)
    """Tenants that get their own Prometheus label; later ones share ``tenant="_other"``. Tenant ids
    come from clients, so without a cap a client could grow the series without bound."""


def load_metrics_config(additional_config: Any) -> MetricsConfig:
    """The ``fairserve_metrics`` block of vLLM's ``additional_config`` (defaults when absent)."""
    block = additional_config.get(METRICS_KEY) if isinstance(additional_config, Mapping) else None
    if block is None:
        return MetricsConfig()
    if not isinstance(block, Mapping):
        raise FairServeConfigError(f"{METRICS_KEY} = {block!r}: expected a mapping of settings")
    try:
        return MetricsConfig.model_validate(block)
    except ValidationError as error:
        lines = []
        for item in error.errors():
            key = ".".join([METRICS_KEY, *(str(part) for part in item["loc"])])
            if item["type"] == "extra_forbidden":
                lines.append(f"{key}: unknown key; valid keys: {', '.join(MetricsConfig.model_fields)}")
            else:
                lines.append(f"{key} = {item.get('input')!r}: {item['msg']}")
        raise FairServeConfigError("invalid fairserve_metrics config:\n  " + "\n  ".join(lines)) from None


# ------------------------------------------------------------------------------ snapshots


@dataclass(frozen=True, slots=True)
class TenantMetrics:
    """One tenant at one moment. Token counts are raw (not normalised, not divided by weight)."""

    tenant: str
    weight: float
    counter: float  # virtual service: normalised weighted tokens / weight (what the queue orders by)
    active: bool  # has requests waiting or running
    input_tokens: int  # prompt tokens computed for it (prefix-cache hits and recomputation excluded)
    system_tokens: int
    output_tokens: int  # tokens generated for it
    weighted_tokens: float  # VTC's service W
    waiting: int  # in the fair queue now
    running: int  # in the running batch now
    held: int  # held by the throttle now
    throttle_submitted: int  # requests the throttle decided on (all but streaming-input chunks)
    throttle_held: int  # ever held
    throttle_released: int
    throttle_expired: int  # ended as aborted past max_hold_s
    throttle_cancelled: int  # client aborted while held


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """Every tenant plus the engine-wide figures the throttle looks at."""

    time_unix_s: float
    scheduler: str
    kv_cache_usage: float
    overloaded: bool
    tenants: tuple[TenantMetrics, ...]  # sorted by tenant id

    @property
    def waiting(self) -> int:
        return sum(t.waiting for t in self.tenants)

    @property
    def running(self) -> int:
        return sum(t.running for t in self.tenants)

    @property
    def held(self) -> int:
        return sum(t.held for t in self.tenants)

    def tenant(self, tenant: str) -> TenantMetrics | None:
        """The figures of ``tenant``, or None if the scheduler never saw it."""
        return next((t for t in self.tenants if t.tenant == tenant), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "time_unix_s": self.time_unix_s,
            "scheduler": self.scheduler,
            "kv_cache_usage": self.kv_cache_usage,
            "overloaded": self.overloaded,
            "waiting": self.waiting,
            "running": self.running,
            "held": self.held,
            "tenants": {t.tenant: {k: v for k, v in asdict(t).items() if k != "tenant"} for t in self.tenants},
        }

    def summary(self) -> str:
        """One log line: totals, then the tenants with the most service."""
        active = sum(t.active for t in self.tenants)
        top = sorted(self.tenants, key=lambda t: (-t.weighted_tokens, t.tenant))[:LOG_TOP_TENANTS]
        shown = "; ".join(
            f"{t.tenant!r} in {t.input_tokens + t.system_tokens} out {t.output_tokens} counter {t.counter:.0f} "
            f"w{t.waiting}/r{t.running}/h{t.held}" for t in top
        )
        held = sum(t.throttle_held for t in self.tenants)
        expired = sum(t.throttle_expired for t in self.tenants)
        return (
            f"fairserve: {len(self.tenants)} tenants ({active} active), {self.waiting} waiting, {self.running} "
            f"running, {self.held} held; throttle held {held} and expired {expired} so far; KV usage "
            f"{self.kv_cache_usage:.2f}{' (overloaded)' if self.overloaded else ''}; most served: {shown or 'none'}"
        )


def collect(
    *,
    scheduler: str,
    counters: WeightedServiceCounters,
    throttle: Throttle,
    waiting: Mapping[str, int],
    running: Mapping[str, int],
    kv_cache_usage: float,
    time_unix_s: float,
) -> MetricsSnapshot:
    """A snapshot from the policy objects plus the per-tenant queue lengths the adapter counted."""
    throttle_stats = throttle.stats()
    config = counters.config
    none = TenantThrottleStats()
    tenants = []
    for tenant in sorted(set(counters.tenants()) | throttle_stats.keys() | waiting.keys() | running.keys()):
        service = counters.service(tenant)
        stats = throttle_stats.get(tenant, none)
        tenants.append(TenantMetrics(
            tenant=tenant, weight=config.tenant_weight(tenant), counter=counters.counter(tenant),
            active=counters.is_active(tenant), input_tokens=service.input_tokens,
            system_tokens=service.system_tokens, output_tokens=service.output_tokens,
            weighted_tokens=service.weighted_tokens, waiting=waiting.get(tenant, 0), running=running.get(tenant, 0),
            held=stats.holding, throttle_submitted=stats.submitted, throttle_held=stats.held,
            throttle_released=stats.released, throttle_expired=stats.expired, throttle_cancelled=stats.cancelled,
        ))
    return MetricsSnapshot(time_unix_s=time_unix_s, scheduler=scheduler, kv_cache_usage=kv_cache_usage,
                           overloaded=throttle.overloaded, tenants=tuple(tenants))


# ------------------------------------------------------------------------------- outlets

#: Monotonic per-tenant fields exported as Prometheus counters: field -> (metric, label value).
_SERVED_FIELDS = {"input_tokens": "input", "system_tokens": "system", "output_tokens": "output"}
_THROTTLE_FIELDS = {"throttle_held": "held", "throttle_released": "released", "throttle_expired": "expired",
                    "throttle_cancelled": "cancelled"}
_STATE_FIELDS = ("waiting", "running", "held")


class PrometheusExporter:
    """``fairserve:*`` series: counters advance by the difference between snapshots.

    The metrics are not registered in a registry unless one is given: in multiprocess mode the
    values go to prometheus_client's files whatever the registry, and vLLM's ``/metrics``
    collects those files; registering them in the engine-core process would only make a second
    scheduler in one process (tests, offline ``LLM`` twice) fail with duplicate names.
    """

    def __init__(self, max_tenant_labels: int, registry: Any = None) -> None:
        from prometheus_client import Counter, Gauge

        self._max_labels = max_tenant_labels
        self._labels: dict[str, str] = {}  # tenant -> its label value
        self._exported: dict[tuple[str, str], float] = {}  # (tenant, field) -> value already counted
        self.served_tokens = Counter(
            "fairserve:served_tokens", "Tokens computed for a tenant, by kind (prefix-cache hits and "
            "recomputation after preemption excluded)", ["tenant", "kind"], registry=registry)
        self.throttled_requests = Counter(
            "fairserve:throttled_requests", "Requests of a tenant the throttle held, and how their holds "
            "ended", ["tenant", "outcome"], registry=registry)
        self.service_counter = Gauge(
            "fairserve:service_counter", "Virtual service counter of a tenant (normalised weighted tokens "
            "divided by its weight); the waiting tenant with the lowest is served next", ["tenant"],
            registry=registry, multiprocess_mode="mostrecent")
        self.requests = Gauge(
            "fairserve:requests", "Requests of a tenant waiting in the fair queue, running, or held by the "
            "throttle", ["tenant", "state"], registry=registry, multiprocess_mode="mostrecent")

    def label_of(self, tenant: str) -> str:
        label = self._labels.get(tenant)
        if label is None:
            label = tenant if len(self._labels) < self._max_labels else OTHER_TENANTS_LABEL
            self._labels[tenant] = label
        return label

    def export(self, snapshot: MetricsSnapshot) -> None:
        gauges: dict[str, list[float]] = {}  # label -> [counter (max), waiting, running, held]
        for tenant in snapshot.tenants:
            label = self.label_of(tenant.tenant)
            for field, kind in _SERVED_FIELDS.items():
                self._advance(self.served_tokens.labels(label, kind), tenant, field)
            for field, outcome in _THROTTLE_FIELDS.items():
                self._advance(self.throttled_requests.labels(label, outcome), tenant, field)
            values = gauges.setdefault(label, [-math.inf, 0, 0, 0])
            values[0] = max(values[0], tenant.counter)
            values[1] += tenant.waiting
            values[2] += tenant.running
            values[3] += tenant.held
        for label, (counter, *states) in gauges.items():
            self.service_counter.labels(label).set(counter)
            for state, value in zip(_STATE_FIELDS, states):
                self.requests.labels(label, state).set(value)

    def _advance(self, child: Any, tenant: TenantMetrics, field: str) -> None:
        key = (tenant.tenant, field)
        value = getattr(tenant, field)
        delta = value - self._exported.get(key, 0)
        if delta > 0:
            child.inc(delta)
            self._exported[key] = value


class MetricsPublisher:
    """Decides when a snapshot is due and sends it to each configured outlet."""

    def __init__(self, config: MetricsConfig, exporter: PrometheusExporter | None) -> None:
        self.config = config
        self.exporter = exporter
        self._path = Path(config.path) if config.path else None
        self._next_publish = -math.inf
        self._next_log = -math.inf
        self.published = 0  # snapshots published so far

    @classmethod
    def from_config(cls, config: MetricsConfig, environ: Mapping[str, str] | None = None) -> MetricsPublisher:
        """Build the outlets ``config`` asks for; ``prometheus: true`` without multiprocess mode
        is a configuration error (nothing could ever read the series)."""
        environ = os.environ if environ is None else environ
        multiprocess = bool(environ.get(PROMETHEUS_MULTIPROC_ENV))
        if config.prometheus and not multiprocess:
            raise FairServeConfigError(
                f"{METRICS_KEY}.prometheus = true, but {PROMETHEUS_MULTIPROC_ENV} is not set in the engine process, so "
                "vLLM's /metrics (served by another process) could never show the series; start the server with "
                f"{PROMETHEUS_MULTIPROC_ENV}=<empty directory> (python -m vllm_fairserve.launch sets it) or set "
                "prometheus to null/false"
            )
        wanted = multiprocess if config.prometheus is None else config.prometheus
        return cls(config, PrometheusExporter(config.max_tenant_labels) if wanted else None)

    @property
    def _has_outlet(self) -> bool:
        return self.exporter is not None or self._path is not None

    @property
    def enabled(self) -> bool:
        """Whether anything is published at all (an outlet, or the log line)."""
        return self._has_outlet or self.config.log_interval_s > 0

    def due(self, now: float) -> bool:
        """Whether a busy engine should publish at monotonic time ``now`` (seconds)."""
        return (self._has_outlet and now >= self._next_publish) or (
            self.config.log_interval_s > 0 and now >= self._next_log)

    def publish(self, snapshot: MetricsSnapshot, now: float) -> None:
        """Send ``snapshot`` to the outlets; the log line only when its interval has passed."""
        if self.exporter is not None:
            self.exporter.export(snapshot)
        if self._path is not None:
            write_snapshot(snapshot, self._path)
        self._next_publish = now + self.config.publish_interval_s
        if self.config.log_interval_s > 0 and now >= self._next_log:
            logger.info("%s", snapshot.summary())
            self._next_log = now + self.config.log_interval_s
        self.published += 1


def write_snapshot(snapshot: MetricsSnapshot, path: Path) -> None:
    """Replace ``path`` atomically, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(snapshot.to_json(), handle, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_snapshot(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON a publisher wrote to ``path`` (for clients and tests)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
