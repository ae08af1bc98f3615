"""Weighted service counters: how much of the engine each tenant has had, in one comparable unit.

This is VTC's virtual token counter (Sheng et al., "Fairness in Serving Large Language Models",
OSDI'24) with FairServe's two changes (arXiv 2411.15997): a charge is divided by the tenant's
weight, and normalised by the characteristic cost of the application the request belongs to.
The scheduler serves the backlogged tenant with the lowest counter next, so counters that rise
at the same speed mean tenants get equal (weighted, normalised) service.

Units. A raw charge is in *weighted tokens*: ``w_in * input + w_sys * system + w_out * output``
(``TokenWeights``). The counter adds ``raw * reference_rate / application_rate / tenant_weight``:

- ``application_rate`` is the weighted tokens per minute that one legitimate user of the
  request's application consumes (``ApplicationConfig.expected_cost_per_minute``: the shape of
  a call times calls per interaction times interactions per minute). Dividing by it measures
  service in "characteristic minutes of use", so neither a tenant of a long-by-nature
  application (summarisation) nor one of a frequent-by-nature one (code completion, agents) is
  pushed behind a chat tenant for using its application as intended. (Normalising by the cost
  of one call alone, as a first version did, made a code-completion user at its declared 20
  calls per minute look three times heavier than a chat user, and the simulator showed it
  starved under overload.)
- ``reference_rate`` is that of the *default application*. Multiplying by it brings the unit
  back to weighted tokens, and it makes the default application's factor exactly 1: untagged
  traffic, and every request when no application is configured, is charged exactly as VTC
  charges. Any positive constant would order tenants identically (it scales every counter
  alike); this one keeps the numbers readable and VTC's bound directly comparable.

Counters only ever increase (charges are non-negative, the lift only raises). The queue's lazy
heap relies on this; see ``queue.py``.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

from vllm_fairserve.config import FairServeConfig

#: The lazy min-heap of active tenants is rebuilt once it holds more than this many entries per
#: active tenant (plus the slack below): dead entries are otherwise only dropped when they reach
#: the top, and a tenant that flips between active and idle leaves one behind each time.
HEAP_ENTRIES_PER_ACTIVE_TENANT = 2
#: ...plus this many entries, so a handful of tenants does not trigger rebuilds constantly.
HEAP_REBUILD_SLACK = 64


@dataclass(slots=True)
class TenantService:
    """Raw service one tenant received: not normalised, not divided by its weight.

    ``weighted_tokens`` is VTC's service measure W; differences of it between backlogged tenants
    are what VTC's fairness bound is about. Benchmarks and metrics read these.
    """

    input_tokens: int = 0
    system_tokens: int = 0
    output_tokens: int = 0
    weighted_tokens: float = 0.0  # w_in * input_tokens + w_sys * system_tokens + w_out * output_tokens


class WeightedServiceCounters:
    """Per-tenant virtual service counters with VTC's lift and an O(log n) minimum.

    A tenant is *active* while it has requests waiting or running. The queue activates a tenant
    when its waiting deque becomes non-empty; the scheduler deactivates it when it has neither
    waiting nor running requests. Only activation changes a counter besides charges (the lift).
    """

    def __init__(self, config: FairServeConfig | None = None) -> None:
        self.config = config if config is not None else FairServeConfig()
        self._weights = self.config.token_weights
        reference_rate = self.config.default_application_config.expected_cost_per_minute(self._weights)
        # reference / own rate per known application; unknown ids use the default's, which is 1.
        self._normalisation = {
            app_id: reference_rate / self.config.application(app_id).expected_cost_per_minute(self._weights)
            for app_id in self.config.application_ids()
        }
        # Looked up on every charge: a plain dict, not the config model's accessor.
        self._tenant_weights = {t.id: t.weight for t in self.config.tenants}
        self._default_normalisation = self._normalisation[self.config.default_application]
        self._counters: dict[str, float] = {}
        self._service: dict[str, TenantService] = {}
        self._active: set[str] = set()
        # Lazy min-heap over active tenants: (counter when pushed, tenant, generation). Since
        # counters only rise, an entry's value is a lower bound of its tenant's counter; an
        # entry whose generation is not the tenant's current one, or whose tenant is inactive,
        # is dead.
        self._heap: list[tuple[float, str, int]] = []
        self._generation: dict[str, int] = {}
        self._next_generation = 0

    # ----------------------------------------------------------------------------- charging

    def normalisation(self, application: str) -> float:
        """Factor a raw charge of ``application`` is multiplied by (1 for the default)."""
        return self._normalisation.get(application, self._default_normalisation)

    def charge_prefill(self, tenant: str, application: str, input_tokens: int, system_tokens: int = 0) -> float:
        """Charge prompt tokens as they are computed; returns the counter increase.

        The caller splits the prompt into system and input tokens when it knows the split;
        otherwise everything is input.
        """
        _check_tokens("input_tokens", input_tokens)
        _check_tokens("system_tokens", system_tokens)
        service = self._service_of(tenant)
        raw = self._weights.input * input_tokens + self._weights.system * system_tokens
        service.input_tokens += input_tokens
        service.system_tokens += system_tokens
        service.weighted_tokens += raw
        return self._add(tenant, application, raw)

    def charge_decode(self, tenant: str, application: str, tokens: int = 1) -> float:
        """Charge generated tokens (per step, as VTC does); returns the counter increase."""
        _check_tokens("tokens", tokens)
        service = self._service_of(tenant)
        raw = self._weights.output * tokens
        service.output_tokens += tokens
        service.weighted_tokens += raw
        return self._add(tenant, application, raw)

    def _add(self, tenant: str, application: str, raw: float) -> float:
        delta = raw * self.normalisation(application) / self._tenant_weights.get(tenant, 1.0)
        self._counters[tenant] = self._counters.get(tenant, 0.0) + delta
        return delta

    def _service_of(self, tenant: str) -> TenantService:
        service = self._service.get(tenant)
        if service is None:
            service = self._service[tenant] = TenantService()
        return service

    # ------------------------------------------------------------------------------ reading

    def counter(self, tenant: str) -> float:
        """Virtual service of ``tenant`` (normalised weighted tokens / weight); 0 if never seen."""
        return self._counters.get(tenant, 0.0)

    def service(self, tenant: str) -> TenantService:
        """A copy of the raw service ``tenant`` received."""
        service = self._service.get(tenant, TenantService())
        return TenantService(service.input_tokens, service.system_tokens, service.output_tokens,
                             service.weighted_tokens)

    def tenants(self) -> list[str]:
        """Every tenant ever charged or activated."""
        return list(self._counters.keys() | self._service.keys())

    def pick(self, candidates: Iterable[str]) -> str:
        """The candidate with the lowest counter (ties: smallest id, for determinism). O(k).

        For callers holding a handful of tenants (e.g. choosing among running requests); the
        queue keeps its own heap.
        """
        best = min(candidates, key=lambda tenant: (self.counter(tenant), tenant), default=None)
        if best is None:
            raise ValueError("pick() needs at least one candidate tenant")
        return best

    # ------------------------------------------------------------------ activity and the lift

    def is_active(self, tenant: str) -> bool:
        """Whether ``tenant`` has requests waiting or running (as reported to us)."""
        return tenant in self._active

    def active_tenants(self) -> frozenset[str]:
        """Tenants with requests waiting or running."""
        return frozenset(self._active)

    def activate(self, tenant: str) -> float:
        """Mark ``tenant`` active, lifting its counter first if it was idle; returns the counter.

        The lift (VTC): a tenant becoming active is raised to ``max(own, min over active
        tenants)``, so time spent idle banks no credit it could later use to starve tenants
        that stayed backlogged. When no tenant is active the counter is kept as it is, as VTC's
        artifact does (its paper lifts to the counter of the last tenant that left instead;
        with no one to compete against, either choice only matters for the next arrival, and
        that one is lifted against this tenant anyway). Activating an active tenant does nothing.
        """
        if tenant in self._active:
            return self.counter(tenant)
        floor = self.min_active()
        own = self.counter(tenant)
        if floor is not None and floor > own:
            own = floor
        self._counters[tenant] = own
        self._active.add(tenant)
        self._next_generation += 1
        self._generation[tenant] = self._next_generation
        heapq.heappush(self._heap, (own, tenant, self._next_generation))
        self._maybe_rebuild()
        return own

    def deactivate(self, tenant: str) -> None:
        """Mark ``tenant`` idle (nothing waiting, nothing running). Its counter is kept."""
        self._active.discard(tenant)

    def min_active(self) -> float | None:
        """Lowest counter among active tenants, or None when none is active. Amortised O(log n)."""
        heap = self._heap
        while heap:
            value, tenant, generation = heap[0]
            if tenant not in self._active or self._generation.get(tenant) != generation:
                heapq.heappop(heap)
                continue
            current = self._counters.get(tenant, 0.0)
            if value == current:
                # Every other live entry is <= its own tenant's counter and >= this value.
                return value
            heapq.heapreplace(heap, (current, tenant, generation))
        return None

    def _maybe_rebuild(self) -> None:
        if len(self._heap) <= HEAP_ENTRIES_PER_ACTIVE_TENANT * len(self._active) + HEAP_REBUILD_SLACK:
            return
        self._heap = [(self._counters.get(t, 0.0), t, self._generation[t]) for t in self._active]
        heapq.heapify(self._heap)


def preemption_order(counter: float, computed_tokens: int, over_allowance: bool) -> tuple[bool, int, float]:
    """Sort key of a running request for preemption, ascending: the *last* in this order is the
    victim when KV blocks run out (the simulator and ``FairScheduler`` both use it).

    The victim is a request of a (tenant, application) pair over its throttle allowance
    (``Throttle.over_allowance``) if one runs: that is traffic the throttle would hold, and
    preempting it gives its memory to requests that are in their allowance. Preempting an
    in-allowance request instead costs it its place in the batch and its KV: on the simulator's
    ``flood`` (seed 1) taking the cheapest victim whoever it belonged to preempted well-behaved
    requests 73 times, over-allowance first 16 times.

    Among those, the victim is the request with the least KV computed: a preempted request loses
    all its blocks and recomputes every token it had (prompt and output so far), so the one with
    the fewest wastes the least engine time. Among requests with as much computed, it belongs to
    the tenant with the highest counter, the one furthest ahead. Ties keep the running batch's
    admission order, so among equals the last admitted goes, as vLLM's own victim.

    Cost before counter: preemption only decides who gives memory back, not who is served; the
    victim returns to the front of its tenant's queue, and the fair queue re-admits it when its
    tenant's counter is the lowest, so fairness is kept by admission either way. Ordering by
    counter first (a first version) took the highest-counter tenant's request whatever it had
    computed -- often a long output hundreds of tokens in -- and the simulator showed the
    recomputation cost 5-7 % of throughput under overload (``heavy_legit``, ``many_tenants``).
    """
    return over_allowance, -computed_tokens, counter


def _check_tokens(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name} = {value}: token counts must be >= 0")
