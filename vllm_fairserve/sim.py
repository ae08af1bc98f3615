"""A continuous-batching engine simulator, to compare scheduling policies on the same trace.

The engine follows vLLM's V1 scheduler (``vllm/v1/core/sched/scheduler.py``, 0.32) closely
enough that a policy's effect on who is served when carries over:

- Each step has a token budget (``max_num_batched_tokens``) and at most ``max_num_seqs``
  running requests. Running requests are scheduled first, in admission order: a decoding
  request takes one token, a prefilling one the rest of its prompt up to the budget (chunked
  prefill). Then, only if nobody was preempted in this step, waiting requests are admitted in
  the policy's order until the budget, the seats or the KV cache run out; the head that does
  not fit stops admission (no skipping).
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

Policies (``FcfsPolicy``, ``RpmPolicy``, ``VtcPolicy``, ``FairServePolicy``) decide admission
at arrival, the waiting order and the preemption victim; FairServe's is built from the real
``WeightedServiceCounters``, ``FairRequestQueue`` and ``Throttle``. No request is ever lost:
each one ends finished, refused by a rate limit, expired after being held, or refused as too
long, and the end reason is recorded.

Speed. Simulating step by step costs one Python iteration per running request per step. When
a step is pure decode (every running request computes one token), nobody can be admitted
(nothing waits, the seats are full, or the free KV blocks cannot hold the first chunk of the
FIFO head -- for a fair queue, whose head moves, of the smallest prompt in the trace), nothing
is held and no arrival falls inside, the next steps are identical except for their count, and
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

import enum
import heapq
import itertools
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vllm_fairserve.config import FairServeConfig, load_config
from vllm_fairserve.counters import WeightedServiceCounters
from vllm_fairserve.identity import RequestIdentity
from vllm_fairserve.queue import FairRequestQueue
from vllm_fairserve.throttle import Decision, Throttle
from vllm_fairserve.workload import Interaction, UserClass, Workload

# --------------------------------------------------------------------------------------------
# The engine's shape and cost model
#
# Defaults model one NVIDIA A10G (24 GB) serving Llama-2-7B in fp16 with vLLM, the setting of
# VTC's experiments (Sheng et al., OSDI'24). They come from the hardware's roofline, not from a
# measurement, and land at 1-2k tokens/s for mixed traffic: the same order as the tiny model
# on this 2-core machine (~1,400 tok/s offline, DESIGN.md section 2), so trace rates carry over.

#: Fixed cost of one step (s): every step reads all 13.5 GB of fp16 weights once; at the A10G's
#: 600 GB/s that is ~22 ms, whatever the batch size.
DEFAULT_STEP_FIXED_S = 0.022
#: Marginal cost of one token in a step (s): 2 x 6.7e9 FLOP per token at ~67 TFLOP/s, the rate
#: an A10G's fp16 tensor cores sustain on large prefill batches.
DEFAULT_STEP_PER_TOKEN_S = 0.0002
#: vLLM's default KV block size (tokens).
DEFAULT_BLOCK_SIZE = 16
#: KV blocks: 24 GB x 0.9 (vLLM's gpu_memory_utilization) - 13.5 GB of weights - ~2 GB of
#: activations leaves ~6 GB; a token's KV is 2 (K, V) x 32 layers x 4096 x 2 bytes = 0.5 MiB,
#: so ~12k tokens = 768 blocks of 16.
DEFAULT_NUM_KV_BLOCKS = 768
#: vLLM V1's default seat count on GPU.
DEFAULT_MAX_NUM_SEQS = 256
#: vLLM V1's default step token budget for online serving on GPUs under 70 GiB.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
#: Llama-2's context length (tokens): prompt plus output must fit it.
DEFAULT_MAX_MODEL_LEN = 4096
#: How often (s of simulated time) per-tenant service and backlog are recorded for the metrics:
#: fine enough to see a one-second TTFT difference, coarse enough to keep 1,000 tenants cheap.
DEFAULT_SAMPLE_INTERVAL_S = 1.0

MICROSECONDS_PER_SECOND = 1_000_000


def _us(seconds: float) -> int:
    return round(seconds * MICROSECONDS_PER_SECOND)


def _s(microseconds: int) -> float:
    return microseconds / MICROSECONDS_PER_SECOND


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Engine limits and step cost; every field is named as in vLLM where vLLM has it."""

    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    block_size: int = DEFAULT_BLOCK_SIZE
    num_kv_blocks: int = DEFAULT_NUM_KV_BLOCKS
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    step_fixed_s: float = DEFAULT_STEP_FIXED_S
    step_per_token_s: float = DEFAULT_STEP_PER_TOKEN_S
    sample_interval_s: float = DEFAULT_SAMPLE_INTERVAL_S
    fast_forward: bool = True  # False steps one by one; kept to verify that both agree

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_kv_blocks", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} = {getattr(self, name)}: must be >= 1")
        for name in ("step_per_token_s", "sample_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EngineConfig.{name} = {getattr(self, name)}: must be > 0 seconds")
        if self.step_fixed_s < 0:
            raise ValueError(f"EngineConfig.step_fixed_s = {self.step_fixed_s}: must be >= 0 seconds")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # As vLLM: otherwise a full batch of decodes could not all be scheduled in one step.
            raise ValueError(
                f"EngineConfig.max_num_batched_tokens = {self.max_num_batched_tokens}: must be >= "
                f"max_num_seqs = {self.max_num_seqs}"
            )
        if self.max_model_len > self.kv_capacity_tokens:
            raise ValueError(
                f"EngineConfig.max_model_len = {self.max_model_len}: exceeds the KV cache "
                f"({self.num_kv_blocks} blocks x {self.block_size} = {self.kv_capacity_tokens} tokens), so one "
                "request could never run; lower it or add blocks"
            )

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the whole KV cache holds: VTC's M, the most tokens a running batch can hold."""
        return self.num_kv_blocks * self.block_size


# --------------------------------------------------------------------------------------------
# Requests and their fate


class EndReason(str, enum.Enum):
    """How a request left the system; every request ends with exactly one."""

    FINISHED = "finished"
    RATE_LIMITED = "rate_limited"  # refused at arrival by a per-user RPM limit
    HOLD_EXPIRED = "hold_expired"  # held by the throttle past its deadline
    TOO_LONG = "too_long"  # prompt + output exceed max_model_len


class Admission(enum.Enum):
    """A policy's answer to an arriving request."""

    ADMIT = "admit"  # into the waiting queue now
    HOLD = "hold"  # kept aside; it leaves through step_start (released or expired)
    REJECT = "reject"  # ended now, with the policy's reason


@dataclass(eq=False, slots=True)  # hashed by identity, as vLLM's Request
class SimRequest:
    """One LLM call and everything that happens to it (times in seconds)."""

    id: int
    identity: RequestIdentity
    user_class: UserClass
    tenant_index: int
    arrival_time: float  # submission time; the fair queue breaks ties by it
    system_tokens: int
    input_tokens: int
    output_tokens: int
    interaction: Interaction
    prompt_tokens: int = field(init=False)
    computed: int = 0  # tokens whose KV is in the cache
    generated: int = 0  # output tokens sampled so far
    blocks: int = 0  # KV blocks held
    prompt_served: int = 0  # prompt tokens computed at least once (recomputation is not service)
    held: bool = False  # ever held by the throttle
    queued_time: float | None = None  # first entry into the waiting queue
    first_token_time: float | None = None
    end_time: float | None = None
    end_reason: EndReason | None = None
    end_message: str = ""
    preemptions: int = 0

    def __post_init__(self) -> None:
        self.prompt_tokens = self.system_tokens + self.input_tokens

    @property
    def tenant(self) -> str:
        return self.identity.tenant

    @property
    def remaining(self) -> int:
        """Tokens to compute before the next token can be sampled (1 while decoding)."""
        return self.prompt_tokens + self.generated - self.computed

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


def _identity_of(request: SimRequest) -> RequestIdentity:
    return request.identity


# --------------------------------------------------------------------------------------------
# Policies


class Policy(ABC):
    """What a scheduling policy decides: admission at arrival, waiting order, victims.

    The engine calls the hooks; a policy only decides. Hooks a policy does not need are no-ops.
    """

    name: str
    #: Whether the waiting queue's head stays the same until the queue itself changes. True
    #: for FIFO queues; a fair queue's head moves as counters rise during decoding.
    head_is_stable: bool = True

    # --- waiting queue
    @abstractmethod
    def add(self, request: SimRequest) -> None:
        """Append an admitted (or released) request."""

    @abstractmethod
    def prepend(self, request: SimRequest) -> None:
        """Put a preempted request back in front."""

    @abstractmethod
    def peek(self) -> SimRequest:
        """The request to admit next."""

    @abstractmethod
    def pop(self) -> SimRequest:
        """Remove and return ``peek()``."""

    @abstractmethod
    def num_waiting(self) -> int:
        """Requests in the waiting queue (held requests are not in it)."""

    # --- arrivals and holding
    def submit(self, request: SimRequest, now: float) -> tuple[Admission, str]:
        """Decide for an arriving request; a reason comes with REJECT."""
        return Admission.ADMIT, ""

    def step_start(
        self, now: float, kv_usage: float, waiting: int
    ) -> tuple[list[SimRequest], list[tuple[SimRequest, str]]]:
        """Called before each step with the engine's load: held requests released now, and held
        requests expired now with their reason."""
        return [], []

    def num_held(self) -> int:
        """Requests held right now."""
        return 0

    # --- charging and activity
    def on_admitted(self, request: SimRequest) -> None:
        """``request`` left the waiting queue for the running batch."""

    def on_prompt_tokens(self, request: SimRequest, system_tokens: int, input_tokens: int) -> None:
        """Prompt tokens of ``request`` were computed for the first time in the last step."""

    def on_output_tokens(self, identity: RequestIdentity, tokens: int, now: float) -> None:
        """``identity``'s (tenant, application) was served ``tokens`` output tokens in the step
        that ended at ``now``, summed over its running requests."""

    def on_waiting_empty(self, tenant: str) -> None:
        """``tenant`` has no request waiting any more (it may still have some running)."""

    def on_tenant_idle(self, tenant: str) -> None:
        """``tenant`` has nothing waiting and nothing running."""

    # --- preemption
    def pick_victim(self, running: Mapping[SimRequest, None]) -> SimRequest:
        """The running request to preempt. vLLM's default: the last admitted."""
        return next(reversed(running))


class FcfsPolicy(Policy):
    """vLLM's default: one FIFO queue, first come first served."""

    name = "fcfs"

    def __init__(self) -> None:
        self._waiting: deque[SimRequest] = deque()

    def add(self, request: SimRequest) -> None:
        self._waiting.append(request)

    def prepend(self, request: SimRequest) -> None:
        self._waiting.appendleft(request)

    def peek(self) -> SimRequest:
        return self._waiting[0]

    def pop(self) -> SimRequest:
        return self._waiting.popleft()

    def num_waiting(self) -> int:
        return len(self._waiting)


#: Requests per user per minute that RpmPolicy lets through by default: one every 5 s, above a
#: person chatting (6/min), below an editor completing code (20/min) -- the dilemma of a
#: single limit for applications of different shapes.
DEFAULT_RPM_LIMIT = 12
#: The RPM window (s): the limit counts the requests accepted in the last minute.
RPM_WINDOW_S = 60.0


class RpmPolicy(FcfsPolicy):
    """FCFS behind a per-user requests-per-minute limit, as hosted APIs enforce.

    A request over the limit is *refused* at arrival (HTTP 429 in an API), not queued: that is
    how RPM limits work in practice and in VTC's RPM baseline. It ends with a reason, so it is
    throttled, not lost. The limit applies to every call, follow-ups of an agent included,
    since an RPM limit knows nothing of interactions.
    """

    name = "rpm"

    def __init__(self, limit_per_minute: int = DEFAULT_RPM_LIMIT) -> None:
        if limit_per_minute < 1:
            raise ValueError(f"limit_per_minute = {limit_per_minute}: must be >= 1")
        super().__init__()
        self.limit_per_minute = limit_per_minute
        self._accepted: dict[str, deque[float]] = {}

    def submit(self, request: SimRequest, now: float) -> tuple[Admission, str]:
        accepted = self._accepted.setdefault(request.tenant, deque())
        while accepted and accepted[0] <= now - RPM_WINDOW_S:
            accepted.popleft()
        if len(accepted) >= self.limit_per_minute:
            return Admission.REJECT, (
                f"rate limited (HTTP 429): tenant {request.tenant!r} sent {len(accepted)} requests in the last "
                f"{RPM_WINDOW_S:g} s; the limit is {self.limit_per_minute} per minute"
            )
        accepted.append(now)
        return Admission.ADMIT, ""


class _CounterPolicy(Policy):
    """The fair queue ordered by weighted service counters, shared by VTC and FairServe."""

    head_is_stable = False

    def __init__(self, config: FairServeConfig) -> None:
        self.config = config
        self.counters = WeightedServiceCounters(config)
        self.queue = FairRequestQueue(self.counters, _identity_of)

    def add(self, request: SimRequest) -> None:
        self.queue.add_request(request)

    def prepend(self, request: SimRequest) -> None:
        self.queue.prepend_request(request)

    def peek(self) -> SimRequest:
        return self.queue.peek_request()  # type: ignore[return-value]

    def pop(self) -> SimRequest:
        return self.queue.pop_request()  # type: ignore[return-value]

    def num_waiting(self) -> int:
        return len(self.queue)

    def on_output_tokens(self, identity: RequestIdentity, tokens: int, now: float) -> None:
        self.counters.charge_decode(identity.tenant, identity.application, tokens)


class VtcPolicy(_CounterPolicy):
    """VTC as in Sheng et al., OSDI'24, and its artifact (``slora/server/router/vtc_req_queue.py``).

    Built from the same ``WeightedServiceCounters`` and ``FairRequestQueue`` as FairServe, with
    no application listed (every normalisation is 1), prices input 1 / system 1 / output 2, and
    no throttle. Three things make it VTC rather than "FairServe without throttle":

    - The lift. The artifact lifts a client whose waiting list becomes non-empty to the minimum
      counter of the clients *with waiting requests*; FairServe's counters lift against tenants
      waiting *or running*. Deactivating a tenant as soon as its waiting queue empties gives
      the artifact's rule with the same classes.
    - The prompt charge. The artifact charges a request's whole prompt when it is admitted to
      the batch; FairServe charges prompt tokens as they are computed (chunk by chunk). A
      prompt is charged once, even if preemption makes the engine recompute it.
    - The victim. The artifact never preempts (it reserves every request's maximum output at
      admission), so VTC here preempts as vLLM does, the last admitted request.

    The artifact's pick is the minimum counter with ties in client insertion order; the fair
    queue breaks ties by head arrival, then tenant id. Tenant weights are honoured (weighted
    VTC, which the artifact also implements).
    """

    name = "vtc"

    def __init__(self, tenant_weights: Mapping[str, float] | None = None) -> None:
        tenants = [{"id": t, "weight": w} for t, w in (tenant_weights or {}).items() if w != 1.0]
        super().__init__(load_config({"tenants": tenants}))
        self._charged: set[int] = set()  # ids of requests whose prompt was charged

    def on_waiting_empty(self, tenant: str) -> None:
        self.counters.deactivate(tenant)  # the artifact's lift set: tenants with waiting requests

    def on_admitted(self, request: SimRequest) -> None:
        if request.id in self._charged:
            return  # re-admitted after a preemption: its prompt was charged the first time
        self._charged.add(request.id)
        self.counters.charge_prefill(request.tenant, request.identity.application, request.input_tokens,
                                     request.system_tokens)


class FairServePolicy(_CounterPolicy):
    """FairServe: the committed counters, fair queue and throttle, wired as DESIGN.md's
    scheduler adapter wires them into vLLM.

    - Arrivals go through ``Throttle.submit``; before every step the throttle is told the KV
      usage fraction and the waiting-queue length (its overload signals), then held requests
      are released into the queue or expired with the throttle's reason.
    - Prompt tokens are charged as they are computed, output tokens as they are generated
      (both normalised by the request's application and divided by the tenant's weight), and
      output tokens also count toward the throttle's usage window.
    - A tenant is deactivated once it has nothing waiting and nothing running, so it is lifted
      when it comes back (VTC's lift over active tenants).
    - The victim of a preemption belongs to the running tenant with the highest counter (the
      one furthest ahead); of its requests, the one with the least KV computed, whose
      recomputation wastes the least work.
    """

    name = "fairserve"

    def __init__(self, config: FairServeConfig | Mapping[str, Any] | None = None) -> None:
        super().__init__(load_config(config))
        self.throttle = Throttle(self.config)
        self._held: dict[str, SimRequest] = {}

    def submit(self, request: SimRequest, now: float) -> tuple[Admission, str]:
        key = str(request.id)
        if self.throttle.submit(key, request.identity, request.prompt_tokens, now) is Decision.ADMIT:
            return Admission.ADMIT, ""
        self._held[key] = request
        return Admission.HOLD, ""

    def step_start(
        self, now: float, kv_usage: float, waiting: int
    ) -> tuple[list[SimRequest], list[tuple[SimRequest, str]]]:
        self.throttle.observe_load(kv_usage, waiting)
        if not self._held:
            return [], []
        released = [self._held.pop(key) for key in self.throttle.release(now)]
        expired = [(self._held.pop(key), reason) for key, reason in self.throttle.expire(now)]
        return released, expired

    def num_held(self) -> int:
        return len(self._held)

    def on_prompt_tokens(self, request: SimRequest, system_tokens: int, input_tokens: int) -> None:
        self.counters.charge_prefill(request.tenant, request.identity.application, input_tokens, system_tokens)

    def on_output_tokens(self, identity: RequestIdentity, tokens: int, now: float) -> None:
        super().on_output_tokens(identity, tokens, now)
        self.throttle.record_usage(identity, tokens, now)

    def on_tenant_idle(self, tenant: str) -> None:
        self.counters.deactivate(tenant)

    def pick_victim(self, running: Mapping[SimRequest, None]) -> SimRequest:
        counter = self.counters.counter
        return max(running, key=lambda request: (counter(request.tenant), -request.computed, request.id))


POLICY_NAMES = ("fcfs", "rpm", "vtc", "fairserve")


def make_policy(name: str, workload: Workload, rpm_limit: int = DEFAULT_RPM_LIMIT,
                throttle: Mapping[str, Any] | None = None) -> Policy:
    """The named policy, configured for ``workload`` (its tenants' weights; for FairServe its
    declared applications and the given throttle settings)."""
    if name == "fcfs":
        return FcfsPolicy()
    if name == "rpm":
        return RpmPolicy(rpm_limit)
    if name == "vtc":
        return VtcPolicy(workload.tenant_weights)
    if name == "fairserve":
        return FairServePolicy(workload.fairserve_config(dict(throttle) if throttle else None))
    raise ValueError(f"policy = {name!r}: unknown; valid: {', '.join(POLICY_NAMES)}")


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class Sample:
    """The engine at one sampling tick."""

    time_s: float
    tokens_served: int  # prompt tokens computed once + output tokens, all tenants, since t=0
    service: tuple[float, ...]  # per tenant index: VTC's service W = 1 * prompt + 2 * output tokens
    backlogged: frozenset[int]  # tenant indexes with requests waiting throughout the last interval


@dataclass(frozen=True, slots=True)
class SimResult:
    """Everything a run produced; metrics are computed from it (``sim_metrics``)."""

    policy: str
    requests: tuple[SimRequest, ...]  # every request submitted, in submission order
    tenants: tuple[str, ...]  # tenant index -> id
    tenant_classes: tuple[UserClass, ...]
    tenant_weights: tuple[float, ...]
    samples: tuple[Sample, ...]
    engine: EngineConfig
    horizon_s: float  # the workload's duration: no interaction starts later
    end_s: float  # when the last request ended
    steps: int  # engine steps taken (a fast-forward of k steps counts k)
    busy_s: float  # simulated time spent in steps; work-conserving: the time some request was queued or running
    abandoned_interactions: int  # interactions whose remaining calls were not sent (a call ended unfinished)


#: Price of a prompt and of an output token in the service measure, as VTC defines service.
SERVICE_INPUT_PRICE = 1.0
SERVICE_OUTPUT_PRICE = 2.0


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
        while budget and len(self._running) < cfg.max_num_seqs and self.policy.num_waiting():
            request = self.policy.peek()
            tokens = min(request.remaining, budget)
            need = self._blocks_for(tokens)
            if need > self._free_blocks:
                break  # the head waits for memory; nobody overtakes it
            self._dequeue()
            self._free_blocks -= need
            request.blocks = need
            self._running[request] = None
            self._running_of[request.tenant_index] += 1
            self.policy.on_admitted(request)
            scheduled[request] = tokens
            budget -= tokens
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
        budget = self.config.max_num_batched_tokens - running
        if running >= self.config.max_num_seqs or budget <= 0:
            return True
        smallest = self.policy.peek().remaining if self.policy.head_is_stable else self._min_prompt
        return self._blocks_for(min(smallest, budget)) > self._free_blocks

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

