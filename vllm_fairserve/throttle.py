"""Application-characteristic-aware, token-length-aware throttling (FairServe's first half).

Fair scheduling alone cannot stop one user of a tenant from flooding the engine: the flood is
served whenever the tenant's counter is lowest, and it fills the KV cache for everyone. So,
*only while the engine is overloaded*, a (tenant, application) pair that has used more than its
application's characteristic usage in a sliding window has its new interactions held back.

- Allowance. Over ``window_s`` seconds a (tenant, application) may use ::

      usage_allowance * interactions_per_minute * (window_s / 60)
                      * calls_per_interaction * expected weighted tokens per call

  weighted tokens (``TokenWeights``), i.e. ``usage_allowance`` times what a legitimate user of
  that application produces. Heavy applications (long outputs, multi-call agents) thus get a
  large allowance by construction and are not throttled for being what they are.
- Token-length awareness. A new request counts with its prompt: it is held when window usage
  plus ``w_in * prompt_tokens`` would exceed the allowance, so one huge prompt weighs as much as
  many small ones.
- Usage. A request's prompt is counted when it is admitted (or released), so a burst counts
  at once instead of after its prefill; its generated tokens are counted by ``record_usage`` as
  they are decoded.
- Never mid-interaction. Only the first call of an interaction may be held. A call with
  ``call_index > 0``, or whose interaction id had a call admitted within
  ``interaction_idle_s``, is always admitted: holding an agent's third call would waste the
  two already served.
- Nothing is lost. A held request ends in exactly one of: released (``release``), expired with
  a reason after ``max_hold_s`` (``expire``), or cancelled (``cancel``). Held requests of one
  (tenant, application) leave in arrival order; one pair's backlog never blocks another's.

Holding at arrival is not enough on its own. Once the overload passes, held requests are
released, and over-allowance traffic that arrives while the engine is below its thresholds is
admitted: the engine should not idle while there is work. But once admitted, those requests
decode for seconds and keep their KV blocks, so an honest request arriving a moment later waits
for memory the over-allowance pair occupies (the simulator showed a 10x chat flood holding ~60 %
of the KV cache while throttled, and honest p99 TTFT at 9x its no-flood value). Two rules at the
point where a waiting request joins the running batch keep the spare capacity usable by
over-allowance traffic yet free for everyone else:

- Headroom (``may_join_batch``). A request of a pair that is over its allowance joins the batch
  only if, once it holds its blocks, the KV-cache usage stays below ``kv_usage_threshold`` (the
  overload line that decides holding, applied to the batch) *and* the free KV still holds the
  longest prompt any known application expects (``prompt_headroom_tokens``, from the config's
  expected input + system tokens), so that an in-allowance request of any application can
  start at once. The first term matters on large caches, the second on small ones (on the
  simulator's 12,288-token A10G cache the 10 % above the threshold is 1,229 tokens, less than a
  2,112-token summarisation prompt). In-allowance requests, and any request while nothing runs
  (the engine must never idle with work waiting), are never held back by it.
- Eviction (``admission_victims``). When the waiting request next in fair order is in its
  allowance and cannot get its KV blocks, running requests of over-allowance pairs whose tenant
  has a higher service counter are preempted (recomputed later, never lost) to make room:
  the one with the least KV computed first, whose recomputation wastes the least, then the
  highest counter, then the last admitted, as vLLM's victim (``preemption_order``, counters.py,
  which also makes over-allowance requests the first victims when running requests outgrow
  the cache).
  This is the fair queue's own rule (serve the lowest counter)
  carried over to memory; it only ever evicts traffic the throttle would hold, and only when
  evicting frees enough for the waiting request, so no work is thrown away for nothing.

The simulator (``sim_policies.FairServePolicy``) and ``FairScheduler`` (scheduler.py) both call
these two methods; the callers only measure memory (free blocks after the request's whole
prompt, as vLLM 0.32 admits) and preempt what they are told.

Neither rule acts on in-allowance pairs, so heavy-but-legitimate applications are never held
back or evicted by them; both act only when memory is short, which is overload.

Time is always passed in (a monotonic clock, in seconds) so decisions are deterministic.
"""

from __future__ import annotations

import enum
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

from vllm_fairserve.config import SECONDS_PER_MINUTE, ApplicationConfig, FairServeConfig
from vllm_fairserve.counters import preemption_order
from vllm_fairserve.identity import RequestIdentity

UsageKey = tuple[str, str]  # (tenant, application)


class Decision(enum.Enum):
    """What ``submit`` decided for a request."""

    ADMIT = "admit"  # pass it to the scheduler now
    HOLD = "hold"  # keep it; it leaves through release, expire or cancel


@dataclass(slots=True)
class TenantThrottleStats:
    """Fate of one tenant's submitted requests.

    Always ``submitted == admitted + released + expired + cancelled + holding``, and
    ``held == released + expired + cancelled + holding``.
    """

    submitted: int = 0
    admitted: int = 0  # admitted at submit, never held
    held: int = 0  # ever held
    released: int = 0
    expired: int = 0
    cancelled: int = 0
    holding: int = 0  # held right now


RequestRef = TypeVar("RequestRef")


@dataclass(frozen=True, slots=True)
class RunningRequest(Generic[RequestRef]):
    """What ``admission_victims`` needs to know of one running request; ``ref`` is the caller's
    handle for it (a vLLM ``Request``, a simulated request), returned as is."""

    ref: RequestRef
    identity: RequestIdentity
    counter: float  # its tenant's service counter (WeightedServiceCounters.counter)
    kv_blocks: int  # KV blocks it holds, all freed if it is preempted
    computed_tokens: int  # tokens whose KV it holds, recomputed if it is preempted


@dataclass(slots=True)
class _Held:
    request_id: str
    identity: RequestIdentity
    prompt_cost: float  # weighted tokens of its prompt
    held_at: float  # seconds
    key: UsageKey = field(init=False)

    def __post_init__(self) -> None:
        self.key = (self.identity.tenant, self.identity.application)


@dataclass(slots=True)
class _Window:
    """Weighted tokens used by one (tenant, application) over the last ``window_s`` seconds."""

    events: deque[tuple[float, float]] = field(default_factory=deque)  # (time s, weighted tokens)
    total: float = 0.0

    def add(self, now: float, tokens: float) -> None:
        self.events.append((now, tokens))
        self.total += tokens

    def usage(self, now: float, window_s: float) -> float:
        horizon = now - window_s
        while self.events and self.events[0][0] <= horizon:
            self.total -= self.events.popleft()[1]
        if not self.events:
            self.total = 0.0  # no rounding residue survives an empty window
        return self.total


class Throttle:
    """Holds the new interactions of over-allowance (tenant, application) pairs under overload."""

    def __init__(self, config: FairServeConfig | None = None) -> None:
        self.config = config if config is not None else FairServeConfig()
        self._limits = self.config.throttle
        self._weights = self.config.token_weights
        self._overloaded = False
        self._kv_usage = 0.0
        self._waiting = 0
        self._windows: dict[UsageKey, _Window] = {}
        # application id -> allowance: the config is fixed, and the scheduler asks for every
        # running request's pair at every step (a pydantic lookup and the arithmetic cost ~5 us)
        self._allowances: dict[str, float] = {}
        # Pairs whose usage may exceed their allowance: usage grows only when recorded, so a pair
        # found under its allowance stays under until its next record, and the scheduler's
        # per-step question (every running request's pair) is a set lookup for all the others.
        self._maybe_over: set[UsageKey] = set()
        # (tenant, interaction) -> time its last call was admitted; oldest first, for pruning.
        self._interactions: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._held: OrderedDict[str, _Held] = OrderedDict()  # request id -> held, in hold order
        self._held_by_key: dict[UsageKey, deque[str]] = {}  # FIFO of held ids per pair
        self._stats: dict[str, TenantThrottleStats] = {}
        self._prompt_headroom_tokens = max(
            app.expected_input_tokens + app.expected_system_tokens
            for app in map(self.config.application, self.config.application_ids())
        )

    # --------------------------------------------------------------------------------- load

    def observe_load(self, kv_usage: float, waiting: int) -> bool:
        """Report the engine's KV-cache usage fraction and waiting-queue length; returns
        whether it is now overloaded."""
        if not 0.0 <= kv_usage <= 1.0:
            raise ValueError(f"kv_usage = {kv_usage!r}: must be a fraction in [0, 1]")
        if waiting < 0:
            raise ValueError(f"waiting = {waiting!r}: must be a request count >= 0")
        self._kv_usage, self._waiting = kv_usage, waiting
        self._overloaded = (
            kv_usage >= self._limits.kv_usage_threshold or waiting >= self._limits.waiting_queue_threshold
        )
        return self._overloaded

    @property
    def overloaded(self) -> bool:
        """Whether the last reported load counts as overload."""
        return self._overloaded

    # ------------------------------------------------------------------------ the allowance

    def allowance(self, application: str) -> float:
        """Weighted tokens a (tenant, ``application``) may use per window before it is held."""
        allowance = self._allowances.get(application)
        if allowance is None:
            allowance = self._allowances[application] = self._allowance(
                self.config.application(application))
        return allowance

    def _allowance(self, app: ApplicationConfig) -> float:
        """``usage_allowance`` times the expected interactions in a window, plus Poisson slack
        (``poisson_slack_sigmas`` standard deviations, ``sqrt(n)``; see ``ThrottleConfig``)."""
        expected = app.interactions_per_minute * self._limits.window_s / SECONDS_PER_MINUTE
        interactions = (self._limits.usage_allowance * expected
                        + self._limits.poisson_slack_sigmas * math.sqrt(expected))
        return interactions * app.calls_per_interaction * app.expected_cost_per_call(self._weights)

    def usage(self, identity: RequestIdentity, now: float) -> float:
        """Weighted tokens the identity's (tenant, application) used in the window ending now."""
        window = self._windows.get((identity.tenant, identity.application))
        return window.usage(now, self._limits.window_s) if window else 0.0

    def over_allowance(self, identity: RequestIdentity, now: float) -> bool:
        """Whether the identity's (tenant, application) used more than its allowance in the
        window ending now (what makes its new interactions holdable under overload)."""
        if not self._limits.enabled:
            return False
        key = (identity.tenant, identity.application)
        if key not in self._maybe_over:
            return False
        if self.usage(identity, now) > self.allowance(identity.application):
            return True
        self._maybe_over.discard(key)
        return False

    def over_allowance_at(self, now: float) -> Callable[[RequestIdentity], bool]:
        """``over_allowance`` at ``now``, worked out once per (tenant, application): for callers
        that ask it of every running request (victim choice, eviction)."""
        known: dict[UsageKey, bool] = {}

        def over(identity: RequestIdentity) -> bool:
            key = (identity.tenant, identity.application)
            value = known.get(key)
            if value is None:
                value = known[key] = self.over_allowance(identity, now)
            return value

        return over

    def _fits(self, identity: RequestIdentity, prompt_cost: float, now: float) -> bool:
        return self.usage(identity, now) + prompt_cost <= self.allowance(identity.application)

    # ------------------------------------------------------------------------ the decisions

    def submit(self, request_id: str, identity: RequestIdentity, prompt_tokens: int, now: float) -> Decision:
        """Decide for a new request: ADMIT now, or HOLD until release, expire or cancel."""
        if request_id in self._held:
            raise ValueError(f"request_id = {request_id!r} is already held; request ids must be unique")
        if prompt_tokens < 0:
            raise ValueError(f"prompt_tokens = {prompt_tokens}: must be >= 0")
        stats = self._stats_of(identity.tenant)
        stats.submitted += 1
        prompt_cost = self._weights.input * prompt_tokens
        key = (identity.tenant, identity.application)
        hold = (
            self._limits.enabled
            and not self.is_follow_up(identity, now)
            # Behind earlier held requests of the same pair, whatever the load: no overtaking.
            and (key in self._held_by_key or (self._overloaded and not self._fits(identity, prompt_cost, now)))
        )
        if not hold:
            stats.admitted += 1
            self._admitted(identity, prompt_cost, now)
            return Decision.ADMIT
        stats.held += 1
        stats.holding += 1
        self._held[request_id] = _Held(request_id, identity, prompt_cost, now)
        self._held_by_key.setdefault(key, deque()).append(request_id)
        return Decision.HOLD

    def is_follow_up(self, identity: RequestIdentity, now: float) -> bool:
        """Whether the request continues an interaction in progress (and so is never held)."""
        if identity.call_index is not None and identity.call_index > 0:
            return True
        if identity.interaction is None:
            return False
        self._forget_idle_interactions(now)
        return (identity.tenant, identity.interaction) in self._interactions

    def release(self, now: float) -> list[str]:
        """Held requests that may go now, oldest first: all of them when the engine is no longer
        overloaded, else those whose pair is back under its allowance. Call every step."""
        released: list[tuple[float, str]] = []
        for key in list(self._held_by_key):
            queue = self._held_by_key[key]
            while queue:
                held = self._held[queue[0]]
                if self._overloaded and not self._fits(held.identity, held.prompt_cost, now):
                    break  # later requests of this pair wait behind it
                queue.popleft()
                del self._held[held.request_id]
                stats = self._stats_of(held.identity.tenant)
                stats.holding -= 1
                stats.released += 1
                self._admitted(held.identity, held.prompt_cost, now)
                released.append((held.held_at, held.request_id))
            if not queue:
                del self._held_by_key[key]
        released.sort(key=lambda item: item[0])
        return [request_id for _, request_id in released]

    def expire(self, now: float) -> list[tuple[str, str]]:
        """Held requests that waited ``max_hold_s`` or longer, with a reason for the client.

        Call ``release`` first in a step so a request that may go is not expired instead.
        """
        expired: list[tuple[str, str]] = []
        deadline = now - self._limits.max_hold_s
        while self._held:
            held = next(iter(self._held.values()))  # the oldest (``now`` is monotonic)
            if held.held_at > deadline:
                break
            self._drop_held(held)
            stats = self._stats_of(held.identity.tenant)
            stats.expired += 1
            expired.append((held.request_id, self._reason(held, now)))
        return expired

    def cancel(self, request_id: str) -> bool:
        """Forget a held request whose client went away; False if it is not held."""
        held = self._held.get(request_id)
        if held is None:
            return False
        self._drop_held(held)
        self._stats_of(held.identity.tenant).cancelled += 1
        return True

    # ------------------------------------------------------------- joining the running batch

    @property
    def prompt_headroom_tokens(self) -> int:
        """KV tokens kept free of over-allowance traffic: the longest prompt (input + system
        tokens) any known application expects."""
        return self._prompt_headroom_tokens

    def may_join_batch(self, identity: RequestIdentity, free_kv_tokens_after: int, kv_capacity_tokens: int,
                       batch_empty: bool, now: float) -> bool:
        """Whether a waiting request may join the running batch now (the headroom rule, see the
        module docstring).

        ``free_kv_tokens_after`` is what the KV cache has free (in tokens) once the request holds
        the blocks it needs to join, out of ``kv_capacity_tokens``; ``batch_empty`` whether
        nothing runs (then it may always join).
        """
        if kv_capacity_tokens <= 0:
            raise ValueError(f"kv_capacity_tokens = {kv_capacity_tokens}: must be > 0")
        usage_after = 1.0 - free_kv_tokens_after / kv_capacity_tokens
        if batch_empty or (usage_after < self._limits.kv_usage_threshold
                           and free_kv_tokens_after >= self._prompt_headroom_tokens):
            return True
        return not self.over_allowance(identity, now)

    def admission_victims(self, waiting: RequestIdentity, waiting_counter: float, blocks_short: int,
                          running: Iterable[RunningRequest[RequestRef]], now: float) -> list[RequestRef]:
        """Running requests to preempt so that the waiting request next in fair order gets the
        ``blocks_short`` KV blocks it lacks (the eviction rule, see the module docstring).

        Candidates are requests of over-allowance pairs whose tenant's counter is above
        ``waiting_counter``, taken least KV computed first, then highest counter, then latest
        in ``running`` (pass it in admission order: vLLM's own victim is the last admitted);
        the shortest such prefix that frees ``blocks_short`` is returned. The
        list is empty when the waiting request is itself over its allowance, when nothing is
        short, or when all candidates together would not free enough (evicting them would
        waste their work and still not let it in).
        """
        if blocks_short <= 0 or not self._limits.enabled or self.over_allowance(waiting, now):
            return []
        over = self.over_allowance_at(now)
        candidates: list[tuple[tuple[bool, int, float], int, RunningRequest[RequestRef]]] = []
        for position, request in enumerate(running):
            if request.counter <= waiting_counter:
                continue
            if over(request.identity):
                candidates.append((preemption_order(request.counter, request.computed_tokens, True),
                                   position, request))
        # The victim order of any preemption (counters.py), last first.
        candidates.sort(key=lambda item: item[:2], reverse=True)
        victims: list[RequestRef] = []
        freed = 0
        for *_, request in candidates:
            victims.append(request.ref)
            freed += request.kv_blocks
            if freed >= blocks_short:
                return victims
        return []

    def record_usage(self, identity: RequestIdentity, output_tokens: int, now: float) -> None:
        """Count generated tokens (prompts were counted when their request was admitted)."""
        if output_tokens < 0:
            raise ValueError(f"output_tokens = {output_tokens}: must be >= 0")
        self._use(identity, now, self._weights.output * output_tokens)

    # ----------------------------------------------------------------------------- reading

    def is_held(self, request_id: str) -> bool:
        """Whether ``request_id`` is held right now."""
        return request_id in self._held

    def num_held(self) -> int:
        """Requests held right now."""
        return len(self._held)

    def stats(self) -> dict[str, TenantThrottleStats]:
        """A copy of the per-tenant counts."""
        return {tenant: replace(stats) for tenant, stats in self._stats.items()}

    # --------------------------------------------------------------------------- internals

    def _use(self, identity: RequestIdentity, now: float, tokens: float) -> None:
        key = (identity.tenant, identity.application)
        window = self._window_of(key)
        window.add(now, tokens)
        if window.total > self.allowance(identity.application):  # total >= the windowed usage
            self._maybe_over.add(key)

    def _admitted(self, identity: RequestIdentity, prompt_cost: float, now: float) -> None:
        self._use(identity, now, prompt_cost)
        if identity.interaction is not None:
            key = (identity.tenant, identity.interaction)
            self._interactions[key] = now
            self._interactions.move_to_end(key)

    def _drop_held(self, held: _Held) -> None:
        del self._held[held.request_id]
        queue = self._held_by_key[held.key]
        queue.remove(held.request_id)
        if not queue:
            del self._held_by_key[held.key]
        self._stats_of(held.identity.tenant).holding -= 1

    def _forget_idle_interactions(self, now: float) -> None:
        horizon = now - self._limits.interaction_idle_s
        while self._interactions:
            key, last_admitted = next(iter(self._interactions.items()))
            if last_admitted >= horizon:
                break
            del self._interactions[key]

    def _window_of(self, key: UsageKey) -> _Window:
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window()
        return window

    def _stats_of(self, tenant: str) -> TenantThrottleStats:
        stats = self._stats.get(tenant)
        if stats is None:
            stats = self._stats[tenant] = TenantThrottleStats()
        return stats

    def _reason(self, held: _Held, now: float) -> str:
        identity = held.identity
        app = self.config.application(identity.application)
        load = (
            f"the engine is overloaded (KV-cache usage {self._kv_usage:.2f}, limit "
            f"{self._limits.kv_usage_threshold:g}; {self._waiting} waiting, "
            f"limit {self._limits.waiting_queue_threshold})"
            if self._overloaded
            else "the engine was overloaded while it waited"
        )
        return (
            f"throttled: held {now - held.held_at:.1f} s, the limit (throttle.max_hold_s) is "
            f"{self._limits.max_hold_s:g} s; {load}. Tenant {identity.tenant!r} used "
            f"{self.usage(identity, now):.0f} weighted tokens of application {identity.application!r} in the "
            f"last {self._limits.window_s:g} s, and this request's prompt adds {held.prompt_cost:.0f}, against an "
            f"allowance of {self.allowance(identity.application):.0f} ({self._limits.usage_allowance:g}x the application's "
            f"characteristic: {app.interactions_per_minute:g} interactions/min x {app.calls_per_interaction} "
            "calls). Retry later or send fewer/shorter requests."
        )
