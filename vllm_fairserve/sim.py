"""A continuous-batching engine simulator, to compare scheduling policies on the same trace.

The engine follows vLLM's V1 scheduler (``vllm/v1/core/sched/scheduler.py``, 0.32) closely
enough that a policy's effect on who is served when carries over:

- Each step has a token budget (``max_num_batched_tokens``) and at most ``max_num_seqs``
  running requests. Running requests are scheduled first, in admission order: a decoding
  request takes one token, a prefilling one the rest of its prompt up to the budget (chunked
  prefill). Then, only if nobody was preempted in this step, waiting requests are admitted in
  the policy's order until the budget, the seats or the KV cache run out; the head that does
  not fit stops admission (no skipping). As in vLLM 0.32 (``scheduler_reserve_full_isl``), a
  request fits when the free blocks hold its whole prompt, though it takes only its first
  chunk's blocks now. Two policy hooks, which vLLM's own policies leave
  inert, come in here: the policy may free the head's blocks by preempting running requests
  (``make_room``), and may hold a request back although it fits (``may_join``); FairServe's
  throttle uses them to keep over-allowance traffic out of the KV headroom (``throttle.py``).
  A request ``may_join`` refuses does not stop admission: the policy's queue serves the first
  request it accepts (``set_admission_gate``), as the fair queue does under vLLM, since the
  headroom it was refused is kept for exactly those requests.
- The KV cache is ``num_kv_blocks`` blocks of ``block_size`` tokens. A request holds
  ceil(tokens computed / block_size) blocks. When a running request cannot get the blocks of
  its next tokens, the policy picks a victim, which loses all its blocks (recompute
  preemption) and goes back to the front of the waiting queue; if the victim is the request
  itself it is not scheduled.
- A step lasts ``step_fixed_s + step_per_token_s * tokens`` (see ``EngineConfig``). The step
  that computes a request's last known token samples its next one: the end of its prefill step
  is its first token (TTFT), and a request that generated all its output tokens finishes.
- A request whose prompt plus output cannot fit ``max_model_len`` is refused at arrival with a
  reason, as vLLM refuses it.

Policies (``sim_policies.py``: ``FcfsPolicy``, ``RpmPolicy``, ``VtcPolicy``, ``FairServePolicy``) decide admission
at arrival, the waiting order and the preemption victim; FairServe's is built from the real
``WeightedServiceCounters``, ``FairRequestQueue`` and ``Throttle``. No request is ever lost:
each one ends finished, refused by a rate limit, expired after being held, or refused as too
long, and the end reason is recorded.

Speed. Simulating step by step costs one Python iteration per running request per step. When
a step is pure decode (every running request computes one token), nobody can be admitted
(nothing waits, the seats are full, or the free KV blocks cannot hold the prompt of the
FIFO head -- for a fair queue, whose head moves, of the smallest prompt in the trace; for a
policy that may evict to admit, nothing waits at all), nothing is held and no arrival falls
inside, the next steps are identical except for their count, and
the engine applies k of them at once ("fast-forward"). It stops
before any finish, block shortage, arrival or sampling tick, and still makes every per-step
policy call of the skipped steps -- ``step_start`` with that step's KV usage and waiting count,
then ``on_output_tokens`` at that step's end -- so the policy's state (FairServe's throttle
decides arrivals on the load it was last told) is exactly that of stepping one by one
(``tests/unit/fairserve/test_fairserve_sim.py`` checks this).

Time is kept in integer microseconds so that k steps at once and k single steps reach the
same instant.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any

from vllm_fairserve.identity import RequestIdentity
from vllm_fairserve.sim_model import (MICROSECONDS_PER_SECOND, SERVICE_INPUT_PRICE, SERVICE_OUTPUT_PRICE,
                                      Admission, EndReason, EngineConfig, Sample, SimRequest, SimResult,
                                      _s, _us)
from vllm_fairserve.sim_policies import Policy, make_policy
from vllm_fairserve.workload import Interaction, Workload

# --------------------------------------------------------------------------------------------
# The engine


class Engine:
    """Runs one workload under one policy; ``run()`` once."""

    def __init__(self, workload: Workload, policy: Policy, config: EngineConfig | None = None) -> None:
        self.workload = workload
        self.policy = policy
        self.config = config if config is not None else EngineConfig()
        cfg = self.config
        self._fixed_us = _us(cfg.step_fixed_s)
        self._per_token_us = cfg.step_per_token_s * MICROSECONDS_PER_SECOND
        self._sample_us = _us(cfg.sample_interval_s)
        self._horizon_us = _us(workload.duration_s)

        self._tenants = sorted(workload.tenant_classes)
        self._tenant_index = {tenant: index for index, tenant in enumerate(self._tenants)}
        count = len(self._tenants)
        self._service = [0.0] * count
        self._waiting_of = [0] * count
        self._running_of = [0] * count
        self._backlogged_since_us: list[int | None] = [None] * count
        self._tokens_served = 0

        self._now_us = 0
        self._free_blocks = cfg.num_kv_blocks
        self._running: dict[SimRequest, None] = {}  # admission order, as vLLM's running list
        self._arrivals: list[tuple[int, int, Interaction, int]] = []  # (time us, seq, interaction, call index)
        self._seq = itertools.count()
        self._requests: list[SimRequest] = []
        self._samples: list[Sample] = []
        self._next_sample_us = 0
        self._last_sample_us = 0
        self._steps = 0
        self._busy_us = 0
        self._abandoned = 0
        # The smallest prompt any request of the trace has: fewer free blocks than its first
        # chunk needs means nobody can be admitted, whatever the queue's order.
        self._min_prompt = min(
            (call.system_tokens + call.input_tokens for i in workload.interactions for call in i.calls),
            default=0,
        )
        for interaction in workload.interactions:
            self._push_arrival(_us(interaction.start_s), interaction, 0)

    # ------------------------------------------------------------------------------ the loop

    def run(self) -> SimResult:
        while True:
            self._ingest_arrivals()
            self._policy_step_start()
            scheduled, preempted = self._schedule()
            if not scheduled:
                if preempted:
                    continue  # everyone was preempted; they are waiting and are admitted next step
                if self.policy.num_waiting():
                    # Cannot happen: EngineConfig makes any admitted request fit an empty engine.
                    raise RuntimeError("the engine idled with requests waiting")
                if not self._arrivals and not self.policy.num_held():
                    break
                self._idle_until_next_event()
                continue
            steps = self._stretch(scheduled) if self.config.fast_forward and not preempted else 1
            self._apply(scheduled, steps)
        self._record_samples(final=True)
        return SimResult(
            policy=self.policy.name,
            requests=tuple(self._requests),
            tenants=tuple(self._tenants),
            tenant_classes=tuple(self.workload.tenant_classes[t] for t in self._tenants),
            tenant_weights=tuple(self.workload.tenant_weights[t] for t in self._tenants),
            samples=tuple(self._samples),
            engine=self.config,
            horizon_s=self.workload.duration_s,
            end_s=_s(self._now_us),
            steps=self._steps,
            busy_s=_s(self._busy_us),
            abandoned_interactions=self._abandoned,
        )

    # -------------------------------------------------------------------- arrivals and ends

    def _push_arrival(self, time_us: int, interaction: Interaction, call_index: int) -> None:
        heapq.heappush(self._arrivals, (time_us, next(self._seq), interaction, call_index))

    def _ingest_arrivals(self) -> None:
        now_s = _s(self._now_us)
        while self._arrivals and self._arrivals[0][0] <= self._now_us:
            _, _, interaction, call_index = heapq.heappop(self._arrivals)
            request = self._new_request(interaction, call_index, now_s)
            if request.prompt_tokens + request.output_tokens > self.config.max_model_len:
                self._end(request, EndReason.TOO_LONG, (
                    f"prompt ({request.prompt_tokens}) + output ({request.output_tokens}) tokens exceed "
                    f"max_model_len = {self.config.max_model_len}"
                ))
                continue
            admission, reason = self.policy.submit(request, now_s)
            if admission is Admission.ADMIT:
                self._enqueue(request)
            elif admission is Admission.HOLD:
                request.held = True
            else:
                self._end(request, EndReason.RATE_LIMITED, reason)

    def _new_request(self, interaction: Interaction, call_index: int, now_s: float) -> SimRequest:
        call = interaction.calls[call_index]
        identity = RequestIdentity(interaction.tenant, interaction.application, interaction.id, call_index)
        request = SimRequest(
            id=len(self._requests), identity=identity, user_class=interaction.user_class,
            tenant_index=self._tenant_index[interaction.tenant], arrival_time=now_s,
            system_tokens=call.system_tokens, input_tokens=call.input_tokens, output_tokens=call.output_tokens,
            interaction=interaction,
        )
        self._requests.append(request)
        return request

    def _policy_step_start(self) -> None:
        now_s = _s(self._now_us)
        used = self.config.num_kv_blocks - self._free_blocks
        released, expired = self.policy.step_start(now_s, used / self.config.num_kv_blocks, self.policy.num_waiting())
        for request in released:
            self._enqueue(request)
        for request, reason in expired:
            self._end(request, EndReason.HOLD_EXPIRED, reason)

    def _replay_step_start(self, start_us: int, used_blocks: int, waiting: int) -> None:
        """The ``step_start`` call of a step inside a fast-forward, with the load it would have
        seen. Nothing is held during one (``_stretch``), so nothing can be released or expired;
        the call matters because the policy keeps the load (the throttle decides the next
        arrivals on the load it was told last)."""
        released, expired = self.policy.step_start(_s(start_us), used_blocks / self.config.num_kv_blocks, waiting)
        if released or expired:
            raise RuntimeError("a held request was released or expired inside a fast-forward, which holds none")

    def _end(self, request: SimRequest, reason: EndReason, message: str = "") -> None:
        request.end_time = _s(self._now_us)
        request.end_reason = reason
        request.end_message = message
        interaction = request.interaction
        next_call = request.identity.call_index + 1  # type: ignore[operator]
        if next_call < len(interaction.calls):
            if reason is EndReason.FINISHED:
                self._push_arrival(self._now_us + _us(interaction.call_gap_s), interaction, next_call)
            else:
                self._abandoned += 1  # the user got no answer, so the agent cannot go on

    # ------------------------------------------------------------------ waiting bookkeeping

    def _enqueue(self, request: SimRequest, front: bool = False) -> None:
        if request.queued_time is None:
            request.queued_time = _s(self._now_us)
        index = request.tenant_index
        if not self._waiting_of[index]:
            self._backlogged_since_us[index] = self._now_us
        self._waiting_of[index] += 1
        if front:
            self.policy.prepend(request)
        else:
            self.policy.add(request)

    def _dequeue(self) -> SimRequest:
        request = self.policy.pop()
        index = request.tenant_index
        self._waiting_of[index] -= 1
        if not self._waiting_of[index]:
            self._backlogged_since_us[index] = None
            self.policy.on_waiting_empty(request.tenant)
        return request

    # ------------------------------------------------------------------------ scheduling

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.config.block_size)

    def _schedule(self) -> tuple[dict[SimRequest, int], bool]:
        """One scheduling pass: {request: tokens this step}, and whether anyone was preempted."""
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        scheduled: dict[SimRequest, int] = {}
        preempted = False
        for request in list(self._running):
            if budget == 0:
                break
            if request not in self._running:
                continue  # preempted earlier in this pass
            tokens = min(request.remaining, budget)
            while True:
                need = self._blocks_for(request.computed + tokens) - request.blocks
                if need <= self._free_blocks:
                    self._free_blocks -= need
                    request.blocks += need
                    scheduled[request] = tokens
                    budget -= tokens
                    break
                victim = self.policy.pick_victim(self._running)
                budget += scheduled.pop(victim, 0)
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
        if preempted:
            return scheduled, True  # as vLLM: no admissions in a step that preempted

        def join_blocks(request: SimRequest) -> int:
            """The blocks that must be free for ``request`` to join (vLLM's gate, see
            EngineConfig); only its first chunk's are taken now."""
            return self._blocks_for(request.remaining if cfg.scheduler_reserve_full_isl
                                    else min(request.remaining, budget))

        def may_join(request: SimRequest) -> bool:
            free_after = max(self._free_blocks - join_blocks(request), 0) * cfg.block_size
            return self.policy.may_join(request, free_after, cfg.kv_capacity_tokens, not self._running)

        self.policy.set_admission_gate(may_join)
        try:
            while budget and len(self._running) < cfg.max_num_seqs and self.policy.num_waiting():
                request = self.policy.peek()
                if not may_join(request):
                    break  # no waiting request passes the policy's headroom rule
                gate = join_blocks(request)
                if gate > self._free_blocks:
                    victims = self.policy.make_room(request, gate - self._free_blocks, self._running)
                    if not victims:
                        break  # the request waits for memory; nobody overtakes it
                    for victim in victims:
                        budget += scheduled.pop(victim, 0)
                        self._preempt(victim)
                    continue  # the policy freed enough for the request, which is still first
                tokens = min(request.remaining, budget)
                need = self._blocks_for(tokens)
                self._dequeue()
                self._free_blocks -= need
                request.blocks = need
                self._running[request] = None
                self._running_of[request.tenant_index] += 1
                self.policy.on_admitted(request)
                scheduled[request] = tokens
                budget -= tokens
        finally:
            self.policy.set_admission_gate(None)
        return scheduled, False

    def _preempt(self, request: SimRequest) -> None:
        del self._running[request]
        self._running_of[request.tenant_index] -= 1
        self._free_blocks += request.blocks
        request.blocks = 0
        request.computed = 0
        request.preemptions += 1
        self._enqueue(request, front=True)

    def _stretch(self, scheduled: dict[SimRequest, int]) -> int:
        """How many identical pure-decode steps can be applied at once (1 = just this one)."""
        running = self._running
        if len(scheduled) != len(running) or self.policy.num_held():
            return 1
        if any(request.remaining != 1 for request in running):
            return 1
        if not self._admission_blocked(len(running)):
            return 1
        step_us = self._step_us(len(running))
        limit = min(request.output_tokens - request.generated for request in running)
        for event_us in (self._arrivals[0][0] if self._arrivals else None, self._next_sample_us):
            if event_us is not None:
                # Stop at the first step end at or after the event, where stepping one by one handles it.
                limit = min(limit, max(1, -(-(event_us - self._now_us) // step_us)))
        if limit <= 1:
            return 1
        # The largest k <= limit whose extra blocks (beyond this step's) fit the free ones.
        block_size = self.config.block_size

        def extra_blocks(steps: int) -> int:
            return sum(-(-(r.computed + steps) // block_size) - r.blocks for r in running)

        low, high = 1, limit
        while low < high:
            middle = (low + high + 1) // 2
            if extra_blocks(middle) <= self._free_blocks:
                low = middle
            else:
                high = middle - 1
        return low

    def _admission_blocked(self, running: int) -> bool:
        """Whether no waiting request can be admitted in any step of a pure-decode stretch.

        During one, free blocks only shrink and the budget left is constant, so a test that
        holds now holds throughout. A FIFO head is fixed; a fair queue's head may change as
        counters rise, so there the smallest prompt of the whole trace is used instead.
        """
        if not self.policy.num_waiting():
            return True
        if self.policy.evicts_for_admission:
            # The head may get memory by eviction, or pass the policy's headroom rule, at any
            # step (both depend on counters and usage windows that move during a stretch).
            return False
        budget = self.config.max_num_batched_tokens - running
        if running >= self.config.max_num_seqs or budget <= 0:
            return True
        smallest = self.policy.peek().remaining if self.policy.head_is_stable else self._min_prompt
        if not self.config.scheduler_reserve_full_isl:
            smallest = min(smallest, budget)  # only the first chunk must fit
        return self._blocks_for(smallest) > self._free_blocks

    def _step_us(self, tokens: int) -> int:
        return self._fixed_us + round(self._per_token_us * tokens)

    # ------------------------------------------------------------------------ applying

    def _apply(self, scheduled: dict[SimRequest, int], steps: int) -> None:
        """Advance time by ``steps`` identical steps of ``scheduled`` and account for them.

        With steps > 1 every request decodes (one token per step) and none finishes before
        the last step, by construction of ``_stretch``; the policy still gets, step by step, the
        ``step_start`` call of each step after the first (the first had it in ``run``) and the
        ``on_output_tokens`` calls at each step's end, in the order stepping makes them.
        """
        # Before this step's tokens are applied: the blocks in use after this (first) step's
        # scheduling, which the second step's ``step_start`` sees.
        used_blocks = self.config.num_kv_blocks - self._free_blocks
        replay = steps > 1 and type(self.policy).step_start is not Policy.step_start
        total_tokens = sum(scheduled.values())
        step_us = self._step_us(total_tokens)
        first_end_us = self._now_us + step_us
        self._now_us += step_us * steps
        self._steps += steps
        self._busy_us += step_us * steps
        first_end_s = _s(first_end_us)
        outputs: dict[tuple[str, str], int] = {}  # (tenant, application) -> output tokens per step
        identities: dict[tuple[str, str], RequestIdentity] = {}
        finished: list[SimRequest] = []
        served_tokens = 0
        policy = self.policy
        service = self._service
        block_size = self.config.block_size
        # by_residue[m]: running requests whose computed tokens before this step are m modulo the
        # block size; the j-th step (from 0) takes a new block for each of them with
        # (computed + j) % block_size == 0.
        by_residue = [0] * block_size if replay else None
        for request, tokens in scheduled.items():
            if by_residue is not None:
                by_residue[request.computed % block_size] += 1
            computed = request.computed + tokens + (steps - 1)
            if steps > 1:
                blocks = -(-computed // block_size)
                self._free_blocks -= blocks - request.blocks
                request.blocks = blocks
            request.computed = computed
            if request.prompt_served < request.prompt_tokens:
                new_prompt = min(computed, request.prompt_tokens) - request.prompt_served
                if new_prompt > 0:
                    system = max(0, min(request.system_tokens - request.prompt_served, new_prompt))
                    request.prompt_served += new_prompt
                    policy.on_prompt_tokens(request, system, new_prompt - system)
                    service[request.tenant_index] += SERVICE_INPUT_PRICE * new_prompt
                    served_tokens += new_prompt
            if computed < request.prompt_tokens + request.generated:
                continue  # a prefill chunk that did not reach the end of the prompt
            if request.first_token_time is None:
                request.first_token_time = first_end_s
            request.generated += steps
            service[request.tenant_index] += SERVICE_OUTPUT_PRICE * steps
            served_tokens += steps
            key = (request.tenant, request.identity.application)
            outputs[key] = outputs.get(key, 0) + 1  # output tokens per step
            if key not in identities:
                identities[key] = request.identity
            if request.generated == request.output_tokens:
                finished.append(request)
        self._tokens_served += served_tokens
        # Step by step, as stepping one by one calls them: the step's ``step_start`` with the
        # load at its start (the throttle's overload signal: KV usage grows during a stretch
        # while the waiting count stays), then its output charged at its end, so that counters
        # and the throttle (usage window and load) see exactly what stepping would show them.
        waiting = policy.num_waiting()
        for step in range(steps):
            if step and by_residue is not None:
                self._replay_step_start(first_end_us + (step - 1) * step_us, used_blocks, waiting)
                used_blocks += by_residue[-step % block_size]  # taken by this step's scheduling
            step_end_s = _s(first_end_us + step * step_us)
            for key, tokens in outputs.items():
                policy.on_output_tokens(identities[key], tokens, step_end_s)
        for request in finished:
            self._finish(request)
        self._record_samples()

    def _finish(self, request: SimRequest) -> None:
        del self._running[request]
        self._free_blocks += request.blocks
        request.blocks = 0
        index = request.tenant_index
        self._running_of[index] -= 1
        if not self._running_of[index] and not self._waiting_of[index]:
            self.policy.on_tenant_idle(request.tenant)
        self._end(request, EndReason.FINISHED)

    def _idle_until_next_event(self) -> None:
        """Nothing can run: jump to the next arrival, or poll the throttle one fixed step later
        while it holds requests (an idle engine is not overloaded, so it releases them)."""
        if self.policy.num_held():
            target = self._now_us + max(self._fixed_us, 1)
            if self._arrivals:
                target = min(target, self._arrivals[0][0])
        else:
            target = self._arrivals[0][0]
        self._now_us = max(self._now_us, target)
        self._record_samples()

    # ------------------------------------------------------------------------ sampling

    def _record_samples(self, final: bool = False) -> None:
        while self._next_sample_us <= self._now_us or final:
            at_us = self._now_us if final else self._next_sample_us
            since_limit = self._last_sample_us
            backlogged = frozenset(
                index for index, since in enumerate(self._backlogged_since_us)
                if since is not None and since <= since_limit
            )
            self._samples.append(Sample(_s(at_us), self._tokens_served, tuple(self._service), backlogged))
            self._last_sample_us = at_us
            if final:
                return
            self._next_sample_us += self._sample_us


def simulate(
    workload: Workload, policy: Policy | str, config: EngineConfig | None = None, **policy_options: Any
) -> SimResult:
    """Run ``workload`` under ``policy`` (an instance, or a name from POLICY_NAMES)."""
    if isinstance(policy, str):
        policy = make_policy(policy, workload, **policy_options)
    return Engine(workload, policy, config).run()
