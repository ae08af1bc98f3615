"""FairServe inside vLLM: ``FairScheduler``, a subclass of vLLM's V1 ``Scheduler`` (0.32).

This is the only module that imports vLLM internals. It translates between vLLM's scheduler
and the pure policy modules, and decides nothing itself: the order of waiting requests comes
from ``FairRequestQueue`` (queue.py), charges and the lift from ``WeightedServiceCounters``
(counters.py), holds, releases and deadlines from ``Throttle`` (throttle.py), the tenant of a
request from ``identity_from_extra_args`` (identity.py), every number from the ``fairserve``
block (config.py).

Usage: ``vllm serve MODEL --scheduler-cls vllm_fairserve.FairScheduler
--additional-config '{"fairserve": {...}}'`` (or ``LLM(..., scheduler_cls=..., additional_config=...)``).
The block may be inline, a JSON string, or a path to a JSON/YAML file; an invalid one stops the
engine at start-up with a message naming the key.

How each part of vLLM's scheduler is bound (the upstream methods overridden are listed in
``OVERRIDDEN_UPSTREAM_METHODS``; a test pins their signatures):

- **Waiting queue.** ``self.waiting`` becomes a ``FairRequestQueue``: the next request admitted
  is the head of the waiting tenant with the lowest counter. Preempted and skipped requests go
  back to the front of their own tenant's queue (``prepend_request(s)``). vLLM's second queue,
  ``kv_holding_waiting``, stays vLLM's: it only holds requests that already own KV blocks
  (async KV loads, streaming sessions between chunks) and vLLM drains it first so that a block
  holder never waits behind a request whose allocation fails; reordering it would not change
  who gets blocks.
- **Charging** (``update_from_output``). Prompt tokens are charged when the step that computed
  them comes back, output tokens when they are appended to the request. Which prompt positions
  a step computes is known when it is scheduled (``schedule``), so it is noted there and charged
  in the matching ``update_from_output``; this also holds under async scheduling, where the
  next step is scheduled before the previous one's output arrives. Each prompt position is
  charged at most once: positions the prefix cache served are not computed and not charged,
  and the recomputation after a preemption (the prompt again, plus the earlier output replayed
  as prefill) is not charged either. The victim's tenant did not ask for that work; the
  scheduler chose it to get memory back, so charging again would punish the tenant for the
  engine's choice. Output tokens are charged once each, when generated (a stale output that
  vLLM delivers after a preemption was generated, so it is charged; one vLLM drops is not).
  Output tokens also count toward the throttle's usage window; prompts are counted there by the
  throttle itself when a request is admitted.
- **Preemption victim.** vLLM 0.32 picks the FCFS victim inline in ``schedule()`` as
  ``self.running[-1]`` (then ``self.running.pop()``), with no hook. Counters and usage
  windows only change in ``update_from_output``, never during ``schedule()``, so ordering
  ``self.running`` by ``preemption_order`` (counters.py, the simulator's victim too) just
  before each ``schedule()`` makes every one of those picks a request of an over-allowance
  pair if one runs (traffic the throttle would hold gives memory back first), then the running
  request with the least KV computed, whose recomputation wastes least, and among equals that
  of the tenant with the highest counter. The same order serves running requests most computed first when the token
  budget is short, much as vLLM's admission order does. vLLM's ``priority`` policy picks
  victims differently, so it is refused at construction.
- **Joining the running batch** (the throttle's headroom and eviction rules, the simulator's
  ``may_join`` and ``make_room``). vLLM admits waiting requests after it has scheduled the
  running ones, and a request scheduled in a step cannot be preempted in it, so the two rules
  bind at two places. *Eviction* is a pre-pass before ``super().schedule()``: when the
  waiting request next in fair order will lack blocks once the running pass has taken its own
  (estimated by walking ``self.running`` with the step's budget), ``Throttle.admission_victims``
  names running over-allowance requests of higher-counter tenants, and each goes through
  vLLM's own ``_preempt_request`` (back to the front of its tenant's queue, its output kept,
  its in-flight output handled as vLLM's own preemption does); vLLM then admits the head in the
  same step. *Headroom* is applied at vLLM's admission check itself: for the duration of
  ``super().schedule()`` the fair queue's ``admission_gate`` is ``Throttle.may_join_batch``, and
  vLLM asks the queue's truth right before it peeks at each head to admit it (see queue.py),
  so the rule sees every head with the memory left at that moment; a refused head is passed
  over for the next tenant's head the rule accepts, as in the simulator, since the headroom it
  is refused is kept for exactly those requests. The eviction pre-pass picks its head the same
  way, with the memory the running pass will leave. Both size a request by its whole sequence,
  as vLLM 0.32's own admission does (``scheduler_reserve_full_isl``).
- **Throttle.** ``add_request`` asks ``Throttle.submit`` (after reporting the load: KV-cache
  usage and the length of vLLM's waiting queues). A held request goes through vLLM's own
  ``add_request`` bookkeeping (it is in ``self.requests``, so client aborts and shutdown find
  it) but is kept out of the queues, in ``_held``. Each ``schedule()`` releases what the
  throttle lets go into the queue and ends what waited past ``max_hold_s``: vLLM's own
  ``finish_requests(..., FINISHED_ABORTED)`` frees it, and the next ``update_from_output``
  returns its final output (finish reason ``abort``, the throttle's reason as ``stop_reason``),
  so the client gets a response; a warning names the tenant and the reason. Held requests count
  as waiting in ``get_request_counts``, so the engine keeps stepping while some are held and
  vLLM's stats show them. Streaming-input sessions (``resumable``) are never held: their chunks
  belong to one interaction.
- **Activity.** The queue activates a tenant (VTC's lift) when its queue becomes non-empty; this
  module deactivates it when its last request that is waiting or running finishes
  (``_free_request``, the one place every finish path of vLLM's scheduler goes through).
- **Metrics** (metrics.py decides what and where; settings under ``fairserve_metrics`` in
  ``additional_config``). Per-tenant served tokens, counters, queue lengths and throttle counts
  are published from inside the engine loop: after a ``schedule()`` when the publish interval
  has passed, and at the end of an ``update_from_output`` or ``finish_requests`` that leaves the
  scheduler without requests (the engine then blocks until the next request, so this is the
  last chance to show final figures). ``finish_requests`` is overridden for that alone.
- **Async scheduling** (vLLM's default on GPU): ``AsyncFairScheduler`` combines this class with
  vLLM's ``AsyncScheduler``, as vLLM's own ``DiffusionAsyncScheduler`` does. Naming
  ``FairScheduler`` is enough: when ``scheduler_config.async_scheduling`` is on it constructs an
  ``AsyncFairScheduler``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import vllm
from vllm.config import VllmConfig
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus

from vllm_fairserve.config import FAIRSERVE_KEY, FairServeConfig, FairServeConfigError, load_config
from vllm_fairserve.counters import WeightedServiceCounters, preemption_order
from vllm_fairserve.identity import RequestIdentity, identity_from_extra_args
from vllm_fairserve.metrics import MetricsPublisher, MetricsSnapshot, collect, load_metrics_config
from vllm_fairserve.queue import FairRequestQueue
from vllm_fairserve.throttle import Decision, RunningRequest, Throttle

logger = logging.getLogger(__name__)

#: The vLLM release this adapter is written and tested against. Other 0.32.x releases are
#: expected to work (the scheduler interface is what the pin test checks); others are warned about.
VLLM_VERSION = "0.32.0"
_SUPPORTED_SERIES = VLLM_VERSION.rsplit(".", 1)[0] + "."

#: The upstream ``Scheduler`` methods this module overrides. tests/integration pins their
#: signatures (and the inline FCFS victim pick in ``schedule``) so an upgrade fails loudly.
OVERRIDDEN_UPSTREAM_METHODS = (
    "__init__",
    "schedule",
    "update_from_output",
    "add_request",
    "get_request_counts",
    "_enqueue_waiting_request",
    "_free_request",
    "finish_requests",
)

if not vllm.__version__.startswith(_SUPPORTED_SERIES):
    logger.warning(
        "vllm_fairserve's FairScheduler is written against vLLM %s, but vLLM %s is installed; "
        "run tests/integration/test_fair_scheduler.py before relying on it",
        VLLM_VERSION, vllm.__version__,
    )


def fairserve_config_from(vllm_config: VllmConfig) -> FairServeConfig:
    """The ``fairserve`` block of vLLM's ``additional_config`` (defaults when there is none)."""
    additional = vllm_config.additional_config
    block = additional.get(FAIRSERVE_KEY) if isinstance(additional, Mapping) else None
    try:
        return load_config(block)
    except FairServeConfigError as error:
        origin = f"(read from vLLM's --additional-config '{{\"{FAIRSERVE_KEY}\": ...}}')"
        raise FairServeConfigError(f"{error}\n{origin}") from None


def _check_policy(vllm_config: VllmConfig) -> None:
    policy = vllm_config.scheduler_config.policy
    if policy != SchedulingPolicy.FCFS.value:
        raise ValueError(
            f"scheduling_policy = {policy!r}: FairScheduler orders requests by tenant service counters "
            f"and needs vLLM's {SchedulingPolicy.FCFS.value!r} policy (the default); "
            "drop --scheduling-policy or use the stock scheduler"
        )


class FairScheduler(Scheduler):
    """vLLM's V1 scheduler with FairServe's per-tenant fair queue, victim choice and throttle."""

    #: Monotonic clock (seconds) of the throttle's windows and deadlines; tests replace it.
    clock: Callable[[], float] = staticmethod(time.monotonic)

    def __new__(cls, *args: Any, **kwargs: Any) -> FairScheduler:
        # vLLM builds whatever class --scheduler-cls names; with async scheduling on (the GPU
        # default) that must be an AsyncScheduler, so the one name users type fits both modes.
        vllm_config = kwargs.get("vllm_config", args[0] if args else None)
        if cls is FairScheduler and getattr(getattr(vllm_config, "scheduler_config", None), "async_scheduling", False):
            cls = AsyncFairScheduler
        return super().__new__(cls)

    def __init__(self, vllm_config: VllmConfig, *args: Any, **kwargs: Any) -> None:
        # Before vLLM allocates anything: a bad config must stop start-up with its key.
        config = fairserve_config_from(vllm_config)
        metrics_config = load_metrics_config(vllm_config.additional_config)
        _check_policy(vllm_config)
        publisher = MetricsPublisher.from_config(metrics_config)
        super().__init__(vllm_config, *args, **kwargs)
        self.fairserve_config = config
        self.metrics = publisher
        self.counters = WeightedServiceCounters(config)
        self.throttle = Throttle(config)
        self._identities: dict[str, RequestIdentity] = {}  # request id -> identity, until it finishes
        self._freed_identities: dict[str, RequestIdentity] = {}  # finished since the last update_from_output
        self.waiting = FairRequestQueue(self.counters, self._identity_of)
        self._held: dict[str, Request] = {}  # request id -> request the throttle holds
        self._holding: Request | None = None  # the request add_request is holding right now
        # Requests waiting or running (not held), per tenant: a tenant is deactivated at 0.
        self._tenant_of_live: dict[str, str] = {}
        self._live_per_tenant: dict[str, int] = {}
        self._prompt_charged: dict[str, int] = {}  # request id -> prompt positions charged so far
        # id(scheduler output) -> (that output, [(identity, prompt tokens)]) until its step returns.
        self._pending_prompt_charges: dict[int, tuple[SchedulerOutput, list[tuple[RequestIdentity, int]]]] = {}
        self._throttle_outputs: dict[int, list[EngineCoreOutput]] = {}  # client index -> final outputs
        _use_vllm_log_handlers()
        logger.info(
            "fairserve: %s active (vLLM %s, async scheduling %s): %d weighted tenants, %d applications, "
            "throttle %s; metrics: prometheus %s, file %s, log every %gs",
            type(self).__name__, vllm.__version__, "on" if isinstance(self, AsyncScheduler) else "off",
            len(config.tenants), len(config.applications), "on" if config.throttle.enabled else "off",
            "on" if publisher.exporter is not None else "off", metrics_config.path or "none",
            metrics_config.log_interval_s,
        )

    # ------------------------------------------------------------------------------ identity

    def _identity_of(self, request: Request) -> RequestIdentity:
        identity = self._identities.get(request.request_id)
        if identity is None:
            params = request.sampling_params
            extra_args = params.extra_args if params is not None else None
            identity = identity_from_extra_args(extra_args, self.fairserve_config)
            self._identities[request.request_id] = identity
        return identity

    # ---------------------------------------------------------------------------- admission

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            # The next chunk of a streaming-input session: vLLM's own path, nothing new to admit.
            super().add_request(request)
            return
        identity = self._identity_of(request)
        decision = Decision.ADMIT
        if not request.resumable:  # a streaming session's chunks are one interaction: never held
            self._observe_load()
            decision = self.throttle.submit(request.request_id, identity, request.num_prompt_tokens, self.clock())
        if decision is Decision.HOLD:
            # vLLM's bookkeeping (self.requests, connector, events) runs; only the queueing is
            # diverted into _held by _enqueue_waiting_request.
            self._holding = request
            try:
                super().add_request(request)
            finally:
                self._holding = None
            logger.debug("fairserve: holding request %s of tenant %r (application %r)",
                         request.request_id, identity.tenant, identity.application)
            return
        super().add_request(request)
        self._mark_live(request, identity)

    def _enqueue_waiting_request(self, request: Request) -> None:
        if request is self._holding:
            self._held[request.request_id] = request
            return
        super()._enqueue_waiting_request(request)

    def _mark_live(self, request: Request, identity: RequestIdentity) -> None:
        tenant = identity.tenant
        self._tenant_of_live[request.request_id] = tenant
        self._live_per_tenant[tenant] = self._live_per_tenant.get(tenant, 0) + 1

    def get_request_counts(self) -> tuple[int, int]:
        # Held requests wait too: counting them keeps the engine stepping (so they are released
        # or expired) and shows them in vLLM's stats.
        num_running, num_waiting = super().get_request_counts()
        return num_running, num_waiting + len(self._held)

    def _observe_load(self) -> None:
        kv_usage = min(max(float(self.kv_cache_manager.usage), 0.0), 1.0)
        # vLLM's queues only: what the engine has queued, not what the throttle holds back.
        self.throttle.observe_load(kv_usage, len(self.waiting) + len(self.kv_holding_waiting))

    def _release_and_expire(self, now: float) -> None:
        for request_id in self.throttle.release(now):
            request = self._held.pop(request_id)
            super()._enqueue_waiting_request(request)
            self._mark_live(request, self._identity_of(request))
        expired = self.throttle.expire(now)
        if not expired:
            return
        reasons = dict(expired)
        for request_id, reason in expired:
            identity = self._identity_of(self._held[request_id])
            logger.warning("fairserve: ended request %s of tenant %r (application %r) as aborted: %s",
                           request_id, identity.tenant, identity.application, reason)
        # vLLM's own finish path frees the request; _free_request drops it from _held.
        for request in self.finish_requests(list(reasons), RequestStatus.FINISHED_ABORTED):
            reason = reasons[request.request_id]
            request.stop_reason = reason
            self._throttle_outputs.setdefault(request.client_index, []).append(
                EngineCoreOutput(
                    request_id=request.request_id,
                    new_token_ids=[],
                    finish_reason=request.get_finished_reason(),
                    stop_reason=reason,
                    events=request.take_events(),
                    trace_headers=request.trace_headers,
                )
            )

    # ----------------------------------------------------------------------------- one step

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        self._observe_load()
        now = self.clock()
        if self._held:
            self._release_and_expire(now)
        self._order_running_for_preemption(now)
        self._evict_for_waiting_head(now)
        block_pool = self.kv_cache_manager.block_pool
        self.waiting.admission_gate = lambda request: self._may_join_batch(
            request, block_pool.get_num_free_blocks(), now)
        try:
            output = super().schedule(throttle_prefills)
        finally:
            self.waiting.admission_gate = None
        self._note_prompt_positions(output)
        if self.metrics.due(self.clock()):
            self.publish_metrics()
        return output

    def _order_running_for_preemption(self, now: float) -> None:
        """Sort by ``preemption_order`` (stable: ties keep admission order), so vLLM's inline FCFS
        victim ``running[-1]`` is the simulator's victim: a request of an over-allowance pair if
        one runs, then the request with the least KV computed, among equals that of the
        highest-counter tenant."""
        if len(self.running) < 2:
            return
        counter = self.counters.counter
        over = self.throttle.over_allowance_at(now)
        identity_of = self._identity_of
        by_tenant: dict[str, float] = {}

        def key(request: Request) -> tuple[bool, int, float]:
            identity = identity_of(request)
            value = by_tenant.get(identity.tenant)
            if value is None:
                value = by_tenant[identity.tenant] = counter(identity.tenant)
            return preemption_order(value, request.num_computed_tokens, over(identity))

        self.running.sort(key=key)

    # ------------------------------------------------------ joining the running batch

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _kv_capacity_tokens(self) -> int:
        # The block pool's first block is its null block, never handed out (as BlockPool.get_usage).
        return (self.kv_cache_manager.block_pool.num_gpu_blocks - 1) * self.block_size

    def _admission_blocks(self, request: Request) -> int:
        """Blocks that must be free for a waiting request to join: its whole sequence, as vLLM's
        own gate (``scheduler_reserve_full_isl``) asks, without credit for prefix-cache hits
        (unknown before vLLM looks them up, so the rules err towards keeping memory free)."""
        return self._blocks_for(min(request.num_tokens, self.max_model_len))

    def _may_join_batch(self, request: Request, free_blocks: int, now: float) -> bool:
        """The throttle's headroom rule for a waiting tenant head with ``free_blocks`` free (the
        fair queue's admission gate: vLLM's admission loop asks it with the memory left at that
        moment, the eviction pre-pass with what the running pass will leave)."""
        free_after = free_blocks - self._admission_blocks(request)
        return self.throttle.may_join_batch(self._identity_of(request), max(free_after, 0) * self.block_size,
                                            self._kv_capacity_tokens(), not self.running, now)

    def _running_pass_blocks(self) -> tuple[dict[Request, int], int]:
        """What vLLM's coming running pass will take: {running request: new blocks}, and the
        token budget it leaves to admissions.

        It walks ``self.running`` in order with the step's token budget, each request taking
        the tokens it has left to compute (a decode one, a prefill chunk the rest of its
        prompt), as vLLM's first loop does; blocks held are counted from computed tokens. This
        is an estimate (prefix-cache sharing, spec decode and long-prefill caps are ignored),
        used only to size an eviction; vLLM's own allocation still decides what runs.
        """
        budget = self.max_num_scheduled_tokens
        taken: dict[Request, int] = {}
        lookahead = self.num_lookahead_tokens
        for request in self.running:
            if budget <= 0:
                break
            computed = request.num_computed_tokens
            tokens = min(request.num_tokens_with_spec + request.num_output_placeholders - computed, budget)
            if tokens <= 0:
                continue
            taken[request] = self._blocks_for(computed + tokens + lookahead) - self._blocks_for(computed)
            budget -= tokens
        return taken, budget

    def _evict_for_waiting_head(self, now: float) -> None:
        """The throttle's eviction rule, before vLLM schedules: when the waiting request vLLM
        will admit next (the first tenant head in fair order that the headroom rule accepts with
        the memory the running pass leaves) will lack KV blocks, preempt what
        ``Throttle.admission_victims`` names, through vLLM's own ``_preempt_request`` (the victim
        returns to the front of its tenant's queue, its output so far kept, and is recomputed).

        It runs before ``super().schedule()`` because vLLM admits waiting requests only after
        scheduling the running ones, and a request already scheduled in a step cannot be
        preempted in it; vLLM then admits the head in this same step (no preemption happened
        inside its pass). Nothing is done while vLLM would not admit anyway: requests holding
        KV blocks are drained first, admission is paused, or the seats are full.
        """
        if (not self.waiting or self.kv_holding_waiting or self._pause_state != PauseState.UNPAUSED
                or len(self.running) + self.num_waiting_for_streaming_input >= self.max_num_active_reqs):
            return
        taken, budget_left = self._running_pass_blocks()
        if budget_left <= 0:
            return  # vLLM will not reach the waiting queue in this step
        free = self.kv_cache_manager.block_pool.get_num_free_blocks() - sum(taken.values())
        self.waiting.admission_gate = lambda request: self._may_join_batch(request, free, now)
        try:
            head = self.waiting.peek_request() if self.waiting else None
        finally:
            self.waiting.admission_gate = None
        if head is None:
            return  # the headroom rule refuses every head: vLLM will admit none
        identity = self._identity_of(head)
        if self.throttle.over_allowance(identity, now):
            return  # the rule only ever makes room for in-allowance requests
        short = self._admission_blocks(head) - free
        if short <= 0:
            return
        counter = self.counters.counter
        identity_of = self._identity_of
        candidates = (
            RunningRequest(request, identity_of(request), counter(identity_of(request).tenant),
                           # Preempting it frees what it holds and what it would take in this step.
                           self._blocks_for(request.num_computed_tokens) + taken.get(request, 0),
                           request.num_computed_tokens)
            for request in self.running
            if self._request_blocks_can_be_freed(request)  # a deferred free would not help now
        )
        victims = self.throttle.admission_victims(identity, counter(identity.tenant), short, candidates, now)
        if not victims:
            return
        timestamp = time.monotonic()
        for victim in victims:
            self.running.remove(victim)
            self._preempt_request(victim, timestamp, drop_stale_output=self.requires_kv_delivery)
            # It may resume in this very step; then the model runner, which drops it on the
            # preemption, must be sent its tokens again (as vLLM's reset_prefix_cache ensures).
            self.prev_step_scheduled_req_ids.discard(victim.request_id)
        logger.debug("fairserve: preempted %d over-allowance request(s) to admit request %s of tenant %r",
                     len(victims), head.request_id, identity.tenant)

    def _note_prompt_positions(self, output: SchedulerOutput) -> None:
        """Record the prompt positions this step computes for the first time (see the module
        docstring), to be charged when its output comes back."""
        charges: list[tuple[RequestIdentity, int]] = []
        requests = self.requests
        for request_id, tokens in output.num_scheduled_tokens.items():
            request = requests[request_id]
            # vLLM has already advanced num_computed_tokens by this step's tokens.
            end = request.num_computed_tokens
            start = end - tokens
            prompt = request.num_prompt_tokens
            if start >= prompt:
                continue  # a decode step: its output is charged when it is appended
            end = min(end, prompt)
            first = max(start, self._prompt_charged.get(request_id, 0))
            if end > first:
                self._prompt_charged[request_id] = end
                charges.append((self._identity_of(request), end - first))
        if charges:
            self._pending_prompt_charges[id(output)] = (output, charges)

    def update_from_output(
        self, scheduler_output: SchedulerOutput, model_runner_output: ModelRunnerOutput
    ) -> dict[int, EngineCoreOutputs]:
        outputs = super().update_from_output(scheduler_output, model_runner_output)

        pending = self._pending_prompt_charges.pop(id(scheduler_output), None)
        if pending is not None:
            for identity, tokens in pending[1]:
                self.counters.charge_prefill(identity.tenant, identity.application, tokens)
        # The new_token_ids vLLM returns are exactly the tokens it appended to each request
        # (trimmed at a stop; none for dropped stale output).
        identities, freed = self._identities, self._freed_identities
        decoded: dict[tuple[str, str], tuple[RequestIdentity, int]] = {}
        for engine_core_outputs in outputs.values():
            for output in engine_core_outputs.outputs:
                tokens = len(output.new_token_ids)
                if not tokens:
                    continue
                identity = identities.get(output.request_id) or freed.get(output.request_id)
                if identity is None:
                    continue
                key = (identity.tenant, identity.application)
                seen = decoded.get(key)
                decoded[key] = (identity, tokens + seen[1]) if seen else (identity, tokens)
        freed.clear()
        if decoded:
            now = self.clock()
            for identity, tokens in decoded.values():
                self.counters.charge_decode(identity.tenant, identity.application, tokens)
                self.throttle.record_usage(identity, tokens, now)

        if self._throttle_outputs:
            for client_index, finals in self._throttle_outputs.items():
                engine_core_outputs = outputs.get(client_index)
                if engine_core_outputs is None:
                    outputs[client_index] = EngineCoreOutputs(outputs=finals)
                else:
                    engine_core_outputs.outputs = [*engine_core_outputs.outputs, *finals]
            self._throttle_outputs = {}
        self._publish_if_idle()
        return outputs

    # ------------------------------------------------------------------------------ finishing

    def finish_requests(
        self, request_ids: str | Iterable[str] | None, finished_status: RequestStatus
    ) -> list[Request]:
        finished = super().finish_requests(request_ids, finished_status)
        self._publish_if_idle()
        return finished

    def _free_request(
        self, request: Request, delay_free_blocks: bool = False
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        result = super()._free_request(request, delay_free_blocks)
        request_id = request.request_id
        if self._held.pop(request_id, None) is not None:
            self.throttle.cancel(request_id)  # a client abort (or shutdown) of a held request
        identity = self._identities.pop(request_id, None)
        if identity is not None:  # its last output tokens are charged after vLLM frees it
            self._freed_identities[request_id] = identity
        self._prompt_charged.pop(request_id, None)
        tenant = self._tenant_of_live.pop(request_id, None)
        if tenant is not None:
            left = self._live_per_tenant[tenant] - 1
            if left:
                self._live_per_tenant[tenant] = left
            else:
                del self._live_per_tenant[tenant]
                self.counters.deactivate(tenant)  # nothing waiting, nothing running
        return result

    # -------------------------------------------------------------------------------- metrics

    def metrics_snapshot(self) -> MetricsSnapshot:
        """Per-tenant figures now: service, counters, queue lengths, throttle outcomes."""
        waiting = {tenant: self.waiting.num_waiting(tenant) for tenant in self.waiting.waiting_tenants()}
        running: dict[str, int] = {}
        for request in self.running:
            tenant = self._identity_of(request).tenant
            running[tenant] = running.get(tenant, 0) + 1
        return collect(scheduler=type(self).__name__, counters=self.counters, throttle=self.throttle,
                       waiting=waiting, running=running,
                       kv_cache_usage=min(max(float(self.kv_cache_manager.usage), 0.0), 1.0),
                       time_unix_s=time.time())

    def publish_metrics(self) -> MetricsSnapshot:
        """Publish a snapshot to the configured outlets now, and return it."""
        snapshot = self.metrics_snapshot()
        self.metrics.publish(snapshot, self.clock())
        return snapshot

    def _publish_if_idle(self) -> None:
        # The engine blocks once it has no requests: publish the final figures first.
        if self.metrics.enabled and not self.has_unfinished_requests():
            self.publish_metrics()

    # -------------------------------------------------------------------------------- reading

    def held_request_ids(self) -> list[str]:
        """Requests the throttle holds right now, oldest first."""
        return list(self._held)

    def live_requests_of(self, tenant: str) -> int:
        """Requests of ``tenant`` waiting or running (held ones not included)."""
        return self._live_per_tenant.get(tenant, 0)


class AsyncFairScheduler(FairScheduler, AsyncScheduler):
    """``FairScheduler`` for vLLM's async scheduling (the GPU default).

    ``AsyncScheduler`` only overrides ``_update_after_schedule`` and
    ``_update_request_with_output`` (output placeholders), which this module does not touch,
    so the method resolution order FairScheduler -> AsyncScheduler -> Scheduler composes them.
    """


def _use_vllm_log_handlers() -> None:
    """Show this package's log lines the way vLLM shows its own, where nothing else would.

    vLLM gives only its ``vllm`` logger a handler, so in the server (whose root logger has
    none) our INFO lines would vanish. When the application configured logging itself (a root
    handler exists: a script, pytest), it is left alone.
    """
    ours = logging.getLogger(__name__.split(".", 1)[0])
    if ours.handlers or logging.getLogger().handlers:
        return
    vllm_logger = logging.getLogger("vllm")
    if not vllm_logger.handlers:
        return
    for handler in vllm_logger.handlers:
        ours.addHandler(handler)
    ours.setLevel(vllm_logger.level or logging.INFO)
    ours.propagate = False
