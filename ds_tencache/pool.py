"""A pinned host buffer pool whose size classes come from the measured tensor sizes.

Stock ZeRO-Infinity pins one region of ``buffer_count x buffer_size`` elements and gives every
swapped parameter a whole slot, so the largest parameter sets the slot size for all and a small
one wastes almost all of its slot. Here the slot sizes are the sizes the profile actually saw:

**The size-class rule.** Every tensor size is first rounded up to the alignment (O_DIRECT NVMe I/O
needs 4096-byte-aligned buffers). If at most ``max_classes`` distinct sizes remain, each gets its
own class and nothing is wasted. Otherwise the largest size is always a class (everything must
fit somewhere), and the other ``max_classes - 1`` classes go to the sizes that the most tensors
have; each remaining (rare) size rounds up to the smallest class that holds it. A transformer has
a handful of distinct weight shapes repeated once per layer, so in practice every size is exact.

**One allocation per tier.** The pool allocates one contiguous buffer (through an allocator the
caller passes in: DeepSpeed's page-locking async I/O allocator in production, plain memory in
tests) and carves it into per-class free lists. Buffers are returned to their list and reused; a
request that finds its class exhausted is an error, never a silent new allocation, because the
plan sized the pool for the most buffers of each class in use at once. When a new plan needs
other classes, :meth:`PinnedBufferPool.recarve` divides the *same* allocation anew (nothing may
be in use then), so a re-plan never pins more memory. Stats record what a benchmark needs.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch


def align_up(nbytes: int, alignment: int) -> int:
    return -(-nbytes // alignment) * alignment


def size_classes(sizes: Iterable[int], max_classes: int, alignment: int) -> list[int]:
    """The class sizes (ascending) for tensors of ``sizes`` bytes, by the rule in the module doc."""
    if max_classes < 1:
        raise ValueError(f"max_classes must be at least 1, got {max_classes}")
    counts = Counter(align_up(max(size, 1), alignment) for size in sizes)
    if not counts:
        return []
    if len(counts) <= max_classes:
        return sorted(counts)
    largest = max(counts)
    frequent = sorted((s for s in counts if s != largest), key=lambda s: (-counts[s], s))
    return sorted({largest, *frequent[:max_classes - 1]})


def class_of(nbytes: int, classes: list[int], alignment: int) -> int:
    """The smallest class holding ``nbytes``; raises when none does."""
    index = bisect.bisect_left(classes, align_up(max(nbytes, 1), alignment))
    if index == len(classes):
        raise ValueError(f"no buffer class holds {nbytes} bytes (largest class {classes[-1] if classes else 0})")
    return classes[index]


@dataclass(frozen=True)
class PooledBuffer:
    """A view of the pool's single allocation; ``nbytes`` is what the caller asked for."""

    view: torch.Tensor  # uint8, length = the class size
    class_size: int
    nbytes: int
    offset: int


@dataclass(frozen=True)
class PoolStats:
    reserved_bytes: int  # the one allocation
    in_use_bytes: int  # class bytes of buffers handed out now
    peak_in_use_bytes: int
    # the most bytes callers held at once (the bytes of their tensors, not of the classes)
    peak_requested_bytes: int
    requested_at_peak_bytes: int  # bytes callers held when the in-use class bytes peaked
    allocations: int  # underlying allocations made (1 per pool, 0 if empty)
    acquires: int

    @property
    def utilisation(self) -> float:
        """Peak bytes really used / bytes reserved: what fixed slots waste shows up here. The
        same measure as ZeRO-Infinity's slots get (the most partition bytes in them at once)."""
        return self.peak_requested_bytes / self.reserved_bytes if self.reserved_bytes else 1.0

    @property
    def fragmentation(self) -> float:
        """Share of the in-use class bytes at the peak that rounding to classes wasted."""
        if not self.peak_in_use_bytes:
            return 0.0
        return 1.0 - self.requested_at_peak_bytes / self.peak_in_use_bytes


class PoolExhaustedError(RuntimeError):
    """More buffers of one class were needed at once than the plan sized the pool for."""


Allocator = Callable[[int], torch.Tensor]


def plain_allocator(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


class PinnedBufferPool:
    """Fixed per-class free lists carved from one allocation, made once and reused.

    ``capacity_bytes`` (default: exactly what the classes need) is the size of the one
    allocation; a later :meth:`recarve` may use any of it.
    """

    def __init__(self, buffers_per_class: Mapping[int, int], alignment: int = 4096,
                 allocator: Allocator = plain_allocator, capacity_bytes: int | None = None) -> None:
        self.alignment = alignment
        total = self._check(buffers_per_class)
        capacity = total if capacity_bytes is None else capacity_bytes
        if total > capacity:
            raise ValueError(f"the classes need {total} bytes, more than the capacity {capacity}")
        self._storage = allocator(capacity) if capacity else torch.empty(0, dtype=torch.uint8)
        if self._storage.numel() < capacity:
            raise ValueError(f"allocator returned {self._storage.numel()} bytes, {capacity} asked")
        self._reserved = capacity
        self._allocations = 1 if capacity else 0
        self._acquires = 0
        self._carve(buffers_per_class)

    def _check(self, buffers_per_class: Mapping[int, int]) -> int:
        for size, count in buffers_per_class.items():
            if size <= 0 or size % self.alignment or count < 0:
                raise ValueError(f"class {size} x {count}: sizes must be positive multiples of "
                                 f"the alignment {self.alignment}, counts at least 0")
        return sum(size * count for size, count in buffers_per_class.items())

    def _carve(self, buffers_per_class: Mapping[int, int]) -> None:
        self.classes = sorted(size for size, count in buffers_per_class.items() if count)
        self._free: dict[int, list[int]] = {}
        offset = 0
        for size in self.classes:
            self._free[size] = [offset + i * size for i in range(buffers_per_class[size])]
            offset += size * buffers_per_class[size]
        self._in_use = self._requested = 0
        self._peak = self._requested_at_peak = self._peak_requested = 0

    def recarve(self, buffers_per_class: Mapping[int, int]) -> None:
        """Divide the same allocation into new classes; peaks restart (they describe one carving).

        Only when no buffer is handed out: a live view into the old carving would overlap new ones.
        """
        if self._in_use:
            raise RuntimeError(f"cannot recarve the pool while {self._in_use} bytes are in use")
        total = self._check(buffers_per_class)
        if total > self._reserved:
            raise ValueError(f"the classes need {total} bytes, more than the pool's {self._reserved}")
        self._carve(buffers_per_class)

    def buffers_per_class(self) -> dict[int, int]:
        """Free buffers per class now (all of them when nothing is in use)."""
        return {size: len(free) for size, free in self._free.items()}

    @classmethod
    def for_demand(cls, sizes_in_use_at_once: Iterable[Iterable[int]], max_classes: int,
                   alignment: int = 4096, allocator: Allocator = plain_allocator) -> PinnedBufferPool:
        """Size a pool for a plan: each item is the set of tensor sizes resident together at one
        moment; every class gets the most buffers it needs at any moment."""
        moments = [list(moment) for moment in sizes_in_use_at_once]
        classes = size_classes((s for moment in moments for s in moment), max_classes, alignment)
        needed: Counter[int] = Counter()
        for moment in moments:
            at_once = Counter(class_of(s, classes, alignment) for s in moment)
            for size, count in at_once.items():
                needed[size] = max(needed[size], count)
        return cls(dict(needed), alignment, allocator)

    def acquire(self, nbytes: int, spill: bool = False) -> PooledBuffer:
        """A free buffer of the smallest class holding ``nbytes``; with ``spill``, of the smallest
        larger class that still has one (for short-lived staging, where waste costs nothing)."""
        size = class_of(nbytes, self.classes, self.alignment)
        if spill and not self._free[size]:
            size = next((c for c in self.classes if c > size and self._free[c]), size)
        free = self._free[size]
        if not free:
            raise PoolExhaustedError(
                f"all {size}-byte buffers are in use; the pool was sized for the plan's peak, so "
                "the execution departed from the plan")
        offset = free.pop()
        self._acquires += 1
        self._in_use += size
        self._requested += nbytes
        if self._in_use > self._peak:
            self._peak, self._requested_at_peak = self._in_use, self._requested
        self._peak_requested = max(self._peak_requested, self._requested)
        return PooledBuffer(self._storage[offset:offset + size], size, nbytes, offset)

    def release(self, buffer: PooledBuffer) -> None:
        free = self._free[buffer.class_size]
        if buffer.offset in free:
            raise ValueError(f"buffer at offset {buffer.offset} released twice")
        free.append(buffer.offset)
        self._in_use -= buffer.class_size
        self._requested -= buffer.nbytes

    def stats(self) -> PoolStats:
        return PoolStats(self._reserved, self._in_use, self._peak, self._peak_requested,
                         self._requested_at_peak, self._allocations, self._acquires)
