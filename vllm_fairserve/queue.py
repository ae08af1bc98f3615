"""A waiting queue that serves the tenant with the least service first.

``FairRequestQueue`` is one more implementation of vLLM's ``RequestQueue``
(``vllm/v1/core/sched/request_queue.py``, 0.32), by duck typing so that this module imports no
vLLM: the scheduler adapter swaps it in for ``Scheduler.waiting``.

Order. Each tenant has a FIFO deque. The next request is the head of the tenant with the lowest
counter (``WeightedServiceCounters``) among tenants with waiting requests; ties go to the head
that arrived first, then to the smaller tenant id.

Cost. Picking is amortised O(log T) in the number T of waiting tenants, through a lazy heap of
``(counter, head arrival, tenant, seq)`` entries, one *live* entry per waiting tenant (the one
whose seq is recorded in ``_live``); every other entry is dead and is dropped when it surfaces.
A live entry always holds its tenant's current head arrival, because any change of a head
pushes a fresh entry. Its counter may be stale: counters are raised outside the queue when
tokens are charged, without telling the queue. That is safe because counters only rise, so a
stale entry is a lower bound of its tenant's key; when the top entry is live and up to date it
is therefore the true minimum, and when it is stale it is refreshed in place and the search
goes on. Each charge costs at most one refresh. Code that ever *lowers* a counter must call
``notify_counter_changed(tenant)``, or that tenant may be served late.

Admission gate. vLLM's scheduler asks ``if not request_queue`` right before it peeks at the
head to admit it, once per admission, and nowhere else (a pinned test checks this in
0.32's ``Scheduler.schedule``). While ``admission_gate`` is set, the queue serves the first
tenant head in counter order that the gate accepts: truth answers "may some head join the
running batch now", and ``peek_request`` / ``pop_request`` return that head. The scheduler
adapter sets the gate (the throttle's headroom rule) for the duration of its ``schedule()``
call, so that the rule sees each head with the memory left at that moment. A refused head is
passed over, not waited for: the headroom it is refused exists to keep memory for in-allowance
requests, so those behind it must be able to take it in the same step (stopping at a refused
head, as a first version did, left the memory idle and the in-allowance requests waiting; the
simulator's ``burst`` p99 TTFT halved once they could pass). Within a tenant the order stays
FIFO. The head chosen is remembered until the queue changes or truth is asked again, so that
the pop after vLLM's allocation removes the request it peeked even though the gate, asked
again with less memory free, might now refuse it. ``len`` still counts every queued request.
Unset (the default) truth is plain non-emptiness and the head is the lowest-counter one.

Activity. When a tenant's deque goes from empty to non-empty the queue activates the tenant in
the counters (which applies VTC's lift if it was idle). Deactivating a tenant that has nothing
waiting and nothing running is the scheduler's job: only it knows what is running.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from vllm_fairserve.counters import WeightedServiceCounters
from vllm_fairserve.identity import RequestIdentity

#: The heap is rebuilt when it holds more than this many entries per waiting tenant (plus the
#: slack below); dead entries are otherwise only dropped when they reach the top.
HEAP_ENTRIES_PER_WAITING_TENANT = 2
#: ...plus this many entries, so a handful of tenants does not trigger rebuilds constantly.
HEAP_REBUILD_SLACK = 64


class QueuedRequest(Protocol):
    """What the queue needs of a request: an ``arrival_time`` and hashing by identity, as
    vLLM's ``Request`` has."""

    arrival_time: float


class FairRequestQueue:
    """Per-tenant FIFO queues served lowest-counter-first; a drop-in ``RequestQueue``."""

    def __init__(
        self,
        counters: WeightedServiceCounters,
        identity_of: Callable[[QueuedRequest], RequestIdentity],
    ) -> None:
        self._counters = counters
        self._identity_of = identity_of
        self._queues: dict[str, deque[QueuedRequest]] = {}  # only tenants with waiting requests
        self._tenant_of: dict[QueuedRequest, str] = {}  # every queued request -> its tenant
        self._heap: list[tuple[float, float, str, int]] = []  # (counter, head arrival, tenant, seq)
        self._live: dict[str, int] = {}  # tenant -> seq of its live heap entry
        self._seq = itertools.count()
        self._gate: Callable[[QueuedRequest], bool] | None = None
        self._admissible: str | None = None  # tenant whose head the gate accepted, until a change

    @property
    def admission_gate(self) -> Callable[[QueuedRequest], bool] | None:
        """While set, the queue serves the first tenant head in counter order that the gate
        accepts, and ``bool(queue)`` says whether there is one (see the module)."""
        return self._gate

    @admission_gate.setter
    def admission_gate(self, gate: Callable[[QueuedRequest], bool] | None) -> None:
        self._gate = gate
        self._admissible = None

    # ------------------------------------------------------------------- RequestQueue API

    def add_request(self, request: QueuedRequest) -> None:
        """Append a request at the back of its tenant's queue."""
        tenant = self._enter(request)
        queue = self._queues.get(tenant)
        if queue:
            queue.append(request)  # the head is unchanged, so is the tenant's key
            return
        self._queues[tenant] = deque([request])
        self._counters.activate(tenant)
        self._push(tenant)

    def pop_request(self) -> QueuedRequest:
        """Remove and return the head of the tenant with the lowest counter (while an admission
        gate is set, the first head it accepts)."""
        tenant = self._serving("pop from an empty queue")
        self._admissible = None
        queue = self._queues[tenant]
        request = queue.popleft()
        del self._tenant_of[request]
        top = self._heap[0]
        if top[2] == tenant and top[3] == self._live[tenant]:
            heapq.heappop(self._heap)  # its live entry is on top unless a gate passed others over
        if queue:
            self._push(tenant)  # any previous entry dies
        else:
            del self._queues[tenant]
            del self._live[tenant]
        return request

    def peek_request(self) -> QueuedRequest:
        """The request ``pop_request`` would return now."""
        return self._queues[self._serving("peek from an empty queue")][0]

    def prepend_request(self, request: QueuedRequest) -> None:
        """Put a request back at the front of its tenant's queue (after preemption or a skip)."""
        tenant = self._enter(request)
        queue = self._queues.get(tenant)
        if queue:
            queue.appendleft(request)
        else:
            self._queues[tenant] = deque([request])
            self._counters.activate(tenant)
        self._push(tenant)

    def prepend_requests(self, requests: Iterable[QueuedRequest]) -> None:
        """Prepend each request in turn, as ``FCFSRequestQueue`` does with ``extendleft``.

        Within a tenant the last one given therefore ends up in front. The scheduler relies on
        this: it collects the requests it skipped with ``appendleft`` and hands them back here,
        which restores their original order.
        """
        for request in requests:
            self.prepend_request(request)

    def remove_request(self, request: QueuedRequest) -> None:
        """Remove a specific request; ValueError if it is not queued (like ``deque.remove``)."""
        tenant = self._tenant_of.pop(request, None)
        if tenant is None:
            raise ValueError(f"FairRequestQueue.remove_request(x): x not in queue ({request!r})")
        queue = self._queues[tenant]
        was_head = queue[0] is request
        queue.remove(request)
        self._after_removal(tenant, head_changed=was_head)

    def remove_requests(self, requests: Iterable[QueuedRequest]) -> None:
        """Remove every given request that is queued; requests not queued are ignored."""
        by_tenant: dict[str, set[QueuedRequest]] = {}
        for request in requests:
            tenant = self._tenant_of.pop(request, None)
            if tenant is not None:
                by_tenant.setdefault(tenant, set()).add(request)
        for tenant, gone in by_tenant.items():
            queue = self._queues[tenant]
            old_head = queue[0]
            self._queues[tenant] = queue = deque(r for r in queue if r not in gone)
            self._after_removal(tenant, head_changed=not queue or queue[0] is not old_head)

    def __bool__(self) -> bool:
        """Whether a request can be taken now: one is queued and, while an admission gate is
        set, the gate lets some tenant's head join (see the module)."""
        if not self._tenant_of:
            return False
        if self._gate is None:
            return True
        self._admissible = self._first_admissible(self._gate)
        return self._admissible is not None

    def __len__(self) -> int:
        return len(self._tenant_of)

    def __iter__(self) -> Iterator[QueuedRequest]:
        """Every queued request once, in the order ``pop_request`` would return them if no
        counter changed meanwhile. A snapshot: the queue may be modified while iterating."""
        snapshot = {tenant: list(queue) for tenant, queue in self._queues.items()}
        heap = [(self._counters.counter(t), q[0].arrival_time, t, 0) for t, q in snapshot.items()]
        heapq.heapify(heap)
        order: list[QueuedRequest] = []
        while heap:
            counter, _, tenant, index = heap[0]
            requests = snapshot[tenant]
            order.append(requests[index])
            if index + 1 < len(requests):
                heapq.heapreplace(heap, (counter, requests[index + 1].arrival_time, tenant, index + 1))
            else:
                heapq.heappop(heap)
        return iter(order)

    # ------------------------------------------------------------------------------ extras

    def notify_counter_changed(self, tenant: str) -> None:
        """Re-key ``tenant`` after its counter was *lowered*; raises need no call (see module)."""
        if tenant in self._queues:
            self._push(tenant)

    def waiting_tenants(self) -> list[str]:
        """Tenants with at least one waiting request."""
        return list(self._queues)

    def num_waiting(self, tenant: str) -> int:
        """Requests ``tenant`` has waiting."""
        queue = self._queues.get(tenant)
        return len(queue) if queue else 0

    def tenant_of(self, request: QueuedRequest) -> str | None:
        """Tenant a queued request was filed under, or None if it is not queued."""
        return self._tenant_of.get(request)

    def __contains__(self, request: object) -> bool:
        return request in self._tenant_of

    # ---------------------------------------------------------------------------- internals

    def _enter(self, request: QueuedRequest) -> str:
        self._admissible = None
        if request in self._tenant_of:
            # A request queued twice would be served twice; this is a caller bug.
            raise ValueError(f"request {request!r} is already in the queue")
        tenant = self._identity_of(request).tenant
        self._tenant_of[request] = tenant
        return tenant

    def _after_removal(self, tenant: str, head_changed: bool) -> None:
        self._admissible = None
        if not self._queues[tenant]:
            del self._queues[tenant]
            del self._live[tenant]  # its heap entry is now dead
        elif head_changed:
            self._push(tenant)

    def _push(self, tenant: str) -> None:
        """Give ``tenant`` a fresh live entry with its current key (the old one dies)."""
        seq = next(self._seq)
        self._live[tenant] = seq
        head = self._queues[tenant][0]
        heapq.heappush(self._heap, (self._counters.counter(tenant), head.arrival_time, tenant, seq))
        if len(self._heap) > HEAP_ENTRIES_PER_WAITING_TENANT * len(self._queues) + HEAP_REBUILD_SLACK:
            self._rebuild()

    def _rebuild(self) -> None:
        self._heap = []
        for tenant, queue in self._queues.items():
            seq = next(self._seq)
            self._live[tenant] = seq
            self._heap.append((self._counters.counter(tenant), queue[0].arrival_time, tenant, seq))
        heapq.heapify(self._heap)

    def _serving(self, empty_message: str) -> str:
        """Tenant whose head is served next: the lowest counter, or while a gate is set the first
        in counter order whose head it accepts (the lowest counter when it accepts none)."""
        if self._gate is None:
            return self._top(empty_message)
        if self._admissible is None:
            self._admissible = self._first_admissible(self._gate)
        return self._admissible if self._admissible is not None else self._top(empty_message)

    def _first_admissible(self, gate: Callable[[QueuedRequest], bool]) -> str | None:
        """First tenant in counter order whose head ``gate`` accepts, or None. O(k log T) for k
        heads refused: refused tenants' entries are set aside while the next one is found, then
        pushed back unchanged (still live)."""
        set_aside: list[tuple[float, float, str, int]] = []
        try:
            for _ in range(len(self._queues)):  # each round a tenant not yet set aside is on top
                tenant = self._top("no waiting tenant left")
                if gate(self._queues[tenant][0]):
                    return tenant
                set_aside.append(heapq.heappop(self._heap))
            return None
        finally:
            for entry in set_aside:
                heapq.heappush(self._heap, entry)

    def _top(self, empty_message: str) -> str:
        """Tenant to serve next, with its live, up-to-date entry left on top of the heap."""
        heap = self._heap
        while heap:
            counter, arrival, tenant, seq = heap[0]
            if self._live.get(tenant) != seq:
                heapq.heappop(heap)
                continue
            current = self._counters.counter(tenant)
            if counter == current:
                return tenant
            # Stale (the tenant was charged since): refresh in place; it keeps being live.
            heapq.heapreplace(heap, (current, arrival, tenant, seq))
        raise IndexError(empty_message)
