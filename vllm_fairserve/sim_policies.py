"""The scheduling policies the simulator compares on the same trace: FCFS, per-user RPM limits,
VTC, and FairServe built from the real ``WeightedServiceCounters``, ``FairRequestQueue`` and
``Throttle``. Each decides admission at arrival, the waiting order and the preemption victim
(see ``Policy``); the engine (``sim.py``) asks and never decides itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from vllm_fairserve.config import FairServeConfig, load_config
from vllm_fairserve.counters import WeightedServiceCounters, preemption_order
from vllm_fairserve.identity import RequestIdentity
from vllm_fairserve.queue import FairRequestQueue
from vllm_fairserve.sim_model import Admission, SimRequest, _identity_of
from vllm_fairserve.throttle import Decision, RunningRequest, Throttle
from vllm_fairserve.workload import Workload

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

    def set_admission_gate(self, gate: Callable[[SimRequest], bool] | None) -> None:
        """While set (the engine sets it for a step's admissions to its test of ``may_join``),
        ``peek`` and ``pop`` serve the first waiting request in the policy's order that the gate
        accepts. FIFO policies ignore it: their ``may_join`` accepts every request."""

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

    # --- joining the running batch
    #: Whether ``make_room`` may ever evict: the engine's fast-forward then cannot take a head
    #: that lacks memory as blocked for the steps it skips.
    evicts_for_admission: bool = False

    def may_join(self, request: SimRequest, free_kv_tokens_after: int, kv_capacity_tokens: int,
                 batch_empty: bool) -> bool:
        """Whether the waiting head may join the running batch, leaving ``free_kv_tokens_after``
        of the KV cache's ``kv_capacity_tokens`` free. vLLM admits whatever fits."""
        return True

    def make_room(self, request: SimRequest, blocks_short: int,
                  running: Mapping[SimRequest, None]) -> list[SimRequest]:
        """Running requests to preempt so the waiting head gets the ``blocks_short`` KV blocks
        it lacks; empty to let it wait. vLLM never preempts to admit."""
        return []

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

    def set_admission_gate(self, gate: Callable[[SimRequest], bool] | None) -> None:
        self.queue.admission_gate = gate  # type: ignore[assignment]

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
    - The victim of a preemption is the last running request in ``preemption_order``
      (counters.py), the order ``FairScheduler`` sorts vLLM's running list by: a request of an
      over-allowance pair if one runs, then the request with the least KV computed (cheapest
      to recompute), among equals that of the tenant with the highest counter.
    - Joining the batch goes through the throttle's headroom and eviction rules
      (``Throttle.may_join_batch``, ``Throttle.admission_victims``) with the time of the step's
      start, as the scheduler adapter passes its clock.
    """

    name = "fairserve"

    def __init__(self, config: FairServeConfig | Mapping[str, Any] | None = None) -> None:
        super().__init__(load_config(config))
        self.throttle = Throttle(self.config)
        self._held: dict[str, SimRequest] = {}
        self._now = 0.0  # start of the current step (s): the throttle's clock for joining the batch

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
        self._now = now
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

    evicts_for_admission = True

    def may_join(self, request: SimRequest, free_kv_tokens_after: int, kv_capacity_tokens: int,
                 batch_empty: bool) -> bool:
        return self.throttle.may_join_batch(request.identity, free_kv_tokens_after, kv_capacity_tokens,
                                            batch_empty, self._now)

    def make_room(self, request: SimRequest, blocks_short: int,
                  running: Mapping[SimRequest, None]) -> list[SimRequest]:
        counter = self.counters.counter
        candidates = (RunningRequest(r, r.identity, counter(r.tenant), r.blocks, r.computed) for r in running)
        return self.throttle.admission_victims(request.identity, counter(request.tenant), blocks_short,
                                               candidates, self._now)

    def pick_victim(self, running: Mapping[SimRequest, None]) -> SimRequest:
        counter = self.counters.counter
        over = self.throttle.over_allowance_at(self._now)
        # The last of the shared order; ties go to the last admitted (``running`` is in admission order).
        _, victim = max(enumerate(running), key=lambda item: (
            *preemption_order(counter(item[1].tenant), item[1].computed, over(item[1].identity)), item[0]))
        return victim


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
