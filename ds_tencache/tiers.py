"""The host side of the tiered store: which parameter partitions live in pinned CPU memory, which on
NVMe, and the swap files behind the NVMe tier.

Between uses a ZeRO-3 parameter partition sits either in the **CPU tier** (a buffer of the pinned
pool, kept for the whole run, updated in place by the optimizer) or on the **NVMe tier** (a swap
file, read into a pinned *staging* buffer shortly before the parameter is gathered and released
with it). Both kinds of buffer come from one pinned allocation of ``cpu_budget`` bytes, so the
split between them is the decision that matters:

- **Staging.** The device plan (:mod:`ds_tencache.plan`) says, for every moment of a step, which
  parameters are being fetched; each streamed one holds a staging buffer of its size class from
  the issue of its read until its group gathers it (the gathered parameter then holds the values,
  in device memory, which the device budget accounts for). Replaying the plan's fetches gives the
  most buffers of each class that are ever held at once: that many are carved, no more, and at
  least one per class of streamed partitions, through which the optimizer's write-back streams.
- **Residents.** Every byte left over holds parameters permanently. A resident saves
  ``fetches x size`` bytes of NVMe reads per step, so per byte of budget its value is the number of
  times the plan fetches it: parameters are taken greedily by fetch count (then larger first,
  since a large resident also frees its class's staging buffers) while the carving still fits.
- **Small partitions** (under the alignment, so a buffer or file of their own would be mostly
  padding, and each NVMe read a whole block for a few bytes) are packed: placed one after another
  at :data:`PACK_ITEM_ALIGNMENT` offsets in one shared buffer, resident for the whole run.
- **Device budget.** A larger device budget means fewer fetches but may issue more reads ahead at
  once (more staging); the layout tries the configured budget and each halving of it down to the
  largest fetch group, and keeps the one that reads the fewest bytes from NVMe per step (the
  larger budget on a tie).

Before a plan exists (the warm-up steps) the pool is carved by :func:`warmup_carving`.

:class:`SwapFiles` owns the NVMe folder: one file per partition, a checksum of every write verified
on every read, and clear errors, naming the file and the cause, for an unwritable folder, a full
disk, or a missing, truncated or corrupted file. Plain Python and torch only: the asynchronous I/O
handle that moves the bytes is DeepSpeed's, bound in :mod:`ds_tencache.deepspeed_hooks`.
"""

from __future__ import annotations

import errno
import os
import shutil
import weakref
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
import xxhash

from ds_tencache.plan import BudgetTooSmallError, Plan
from ds_tencache.pool import align_up, class_of, size_classes


class TierBudgetError(ValueError):
    """The pinned CPU tier cannot hold what even the smallest workable plan needs."""


class SwapFileError(RuntimeError):
    """A swap file could not be written or read back intact; the message names file and cause."""


@dataclass(frozen=True)
class TierLayout:
    """Where each partition lives and how the pinned pool is carved, for one plan."""

    device_budget_bytes: int  # the gathered-parameter budget the chosen plan was built with
    cpu_resident: frozenset[int]  # partitions kept in the pinned CPU tier for the whole run
    buffers_per_class: dict[int, int]  # class bytes -> buffers (residents + staging)
    staging_per_class: dict[int, int]  # of those, the staging buffers
    nvme_read_bytes_per_step: int  # what the plan reads from NVMe per step with this layout
    resident_bytes: int  # partition bytes held by residents, packed ones included
    packed: dict[int, int] = field(default_factory=dict)  # small partitions -> offset in the pack
    pack_bytes: int = 0  # the pack's buffer (one of buffers_per_class), 0 without small partitions

    @property
    def carved_bytes(self) -> int:
        return sum(size * count for size, count in self.buffers_per_class.items())


def warmup_carving(partition_bytes: Iterable[int], capacity: int, max_classes: int,
                   alignment: int) -> dict[int, int]:
    """The carving for the profiling steps, when no plan says what is needed at once.

    Classes come from the size histogram as always; buffers are dealt out one per class in turn,
    largest class first, until the capacity is full, so every size can be staged and the sizes
    that need the most bytes get spare buffers first.
    """
    classes = size_classes(partition_bytes, max_classes, alignment)
    if sum(classes) > capacity:
        raise TierBudgetError(
            f"tencache.cpu_budget = {capacity} bytes cannot hold one staging buffer of each "
            f"partition size ({sum(classes)} bytes for {len(classes)} size classes); raise it to "
            f"at least {sum(classes)}")
    counts: Counter[int] = Counter()
    used = 0
    dealt = True
    while dealt:
        dealt = False
        for size in reversed(classes):
            if used + size <= capacity:
                counts[size] += 1
                used += size
                dealt = True
    return dict(counts)


def staging_peak(plan: Plan, streamed: set[int], class_bytes: Mapping[int, int]) -> Counter[int]:
    """Most staging buffers of each class held at once when ``plan`` runs.

    A streamed fetch holds its buffer from the issue of its read until its group gathers it; the
    gathered parameter then holds the values and the buffer goes back. In group ``g``: the demand
    reads (issued at ``g`` for ``g``) take buffers, the group's gather returns the buffers of every
    fetch for ``g``, then the prefetches issued at ``g`` for later groups take theirs.
    """
    held: Counter[int] = Counter()
    peak: Counter[int] = Counter()

    def take(fetches) -> None:
        for fetch in fetches:
            size = class_bytes[fetch.param_id]
            held[size] += 1
            peak[size] = max(peak[size], held[size])

    by_group: dict[int, list] = {}
    issued: dict[int, list] = {}
    for fetch in plan.fetches:
        if fetch.param_id in streamed:
            by_group.setdefault(fetch.group, []).append(fetch)
            issued.setdefault(fetch.issue_group, []).append(fetch)
    for group in sorted(by_group.keys() | issued.keys()):
        take(f for f in issued.get(group, []) if f.group == group)
        for fetch in by_group.get(group, []):
            held[class_bytes[fetch.param_id]] -= 1
        take(f for f in issued.get(group, []) if f.group > group)
    return peak


def _staging(plan: Plan, streamed: set[int], class_bytes: Mapping[int, int]) -> Counter[int]:
    """Staging buffers to carve: the plan's peak, and one per class that has streamed partitions."""
    staging = staging_peak(plan, streamed, class_bytes)
    for param in streamed:
        staging[class_bytes[param]] = max(staging[class_bytes[param]], 1)
    return staging


def _layout_for(plan: Plan, budget: int, partition_bytes: Mapping[int, int],
                class_bytes: Mapping[int, int], capacity: int) -> TierLayout | None:
    """Greedy residents for one plan (see the module doc); None when even staging does not fit."""
    fetches = Counter(f.param_id for f in plan.fetches)
    streamed = set(partition_bytes)
    staging = _staging(plan, streamed, class_bytes)
    residents: Counter[int] = Counter()

    def carved(staging_now: Counter[int], residents_now: Counter[int]) -> int:
        return sum(size * count for size, count in (staging_now + residents_now).items())

    if carved(staging, residents) > capacity:
        return None
    order = sorted(partition_bytes, key=lambda p: (-fetches[p], -partition_bytes[p], p))
    for param in order:
        if not fetches[param]:
            break  # never fetched: holding it saves nothing
        trial_streamed = streamed - {param}
        trial_staging = _staging(plan, trial_streamed, class_bytes)
        trial_residents = residents + Counter({class_bytes[param]: 1})
        if carved(trial_staging, trial_residents) <= capacity:
            streamed, staging, residents = trial_streamed, trial_staging, trial_residents
    resident = frozenset(partition_bytes.keys() - streamed)
    return TierLayout(
        device_budget_bytes=budget,
        cpu_resident=resident,
        buffers_per_class=dict(staging + residents),
        staging_per_class={size: count for size, count in staging.items() if count},
        nvme_read_bytes_per_step=sum(partition_bytes[f.param_id] for f in plan.fetches
                                     if f.param_id in streamed),
        resident_bytes=sum(partition_bytes[p] for p in resident),
    )


# Offsets of packed partitions: a cache line, which also aligns every dtype.
PACK_ITEM_ALIGNMENT = 64


def pack_offsets(partition_bytes: Mapping[int, int]) -> tuple[dict[int, int], int]:
    """Offsets of partitions placed one after another in a shared buffer, and the bytes used."""
    offsets, end = {}, 0
    for param_id in sorted(partition_bytes):
        offsets[param_id] = end
        end = align_up(end + partition_bytes[param_id], PACK_ITEM_ALIGNMENT)
    return offsets, end


def plan_tiers(build: Callable[[int], Plan], device_budget: int, partition_bytes: Mapping[int, int],
               capacity: int, max_classes: int, alignment: int) -> tuple[Plan, TierLayout]:
    """The device plan and tier layout that read the fewest bytes from NVMe (module doc).

    ``build(budget)`` builds the device plan for a gathered-parameter budget; it raises
    :class:`BudgetTooSmallError` below the largest fetch group, which ends the search. Small
    partitions the plans fetch are packed (module doc); only the rest are placed by the layout.
    """
    best: tuple[Plan, TierLayout] | None = None
    classes: list[int] = []
    budget = device_budget
    while budget > 0:
        try:
            plan = build(budget)
        except BudgetTooSmallError:
            break
        if budget == device_budget:  # every plan fetches each parameter it uses at least once
            fetched = {f.param_id for f in plan.fetches}
            packed, packed_end = pack_offsets({p: n for p, n in partition_bytes.items()
                                               if n < alignment and p in fetched})
            pack_bytes = align_up(packed_end, alignment) if packed else 0
            placed = {p: n for p, n in partition_bytes.items() if p not in packed}
            classes = size_classes(placed.values(), max_classes, alignment)
            class_bytes = {p: class_of(n, classes, alignment) for p, n in placed.items()}
        layout = _layout_for(plan, budget, placed, class_bytes, capacity - pack_bytes)
        if layout is not None and packed:
            layout = replace(layout, packed=packed, pack_bytes=pack_bytes,
                             buffers_per_class=dict(Counter(layout.buffers_per_class)
                                                    + Counter({pack_bytes: 1})),
                             resident_bytes=layout.resident_bytes
                             + sum(partition_bytes[p] for p in packed))
        if layout is not None and (best is None or layout.nvme_read_bytes_per_step
                                   < best[1].nvme_read_bytes_per_step):
            best = plan, layout
        budget //= 2
    if best is None:
        raise TierBudgetError(
            f"tencache.cpu_budget = {capacity} bytes is too small to stage the parameters of even "
            f"one fetch group from NVMe (size classes {classes}); raise cpu_budget")
    return best


# --- asynchronous I/O streams ----------------------------------------------------------------------

class AsyncIOHandle(Protocol):
    """The part of DeepSpeed's async I/O handle used here (``AsyncIOBuilder().load().aio_handle``)."""

    def async_pread(self, buffer: torch.Tensor, filename: str, file_offset: int = 0) -> int: ...

    def async_pwrite(self, buffer: torch.Tensor, filename: str, file_offset: int = 0) -> int: ...

    def wait(self) -> int: ...


@dataclass
class _Stream:
    handle: AsyncIOHandle
    ops: list[tuple[Any, str, Callable[[], None]]] = field(default_factory=list)  # key, path, on done


class IOStreams:
    """Several async I/O handles used as independent streams.

    A handle's ``wait()`` completes every operation issued on it, so with one handle, waiting for
    the read a sub-module needs now would also wait for the reads prefetched for the sub-modules
    after it, and no prefetch could ever run ahead. Each batch of operations goes to the next
    stream instead, and :meth:`wait_for` completes only the stream holding the operation needed.
    A stream reused while busy is completed first, so at most ``len(handles)`` batches are in
    flight (the async I/O config's ``queue_depth`` in the adapter).
    """

    def __init__(self, handles: list[AsyncIOHandle], what: str) -> None:
        if not handles:
            raise ValueError("at least one I/O handle is needed")
        self._streams = [_Stream(handle) for handle in handles]
        self._next = 0
        self._where: dict[Any, _Stream] = {}
        self._what = what  # "read" or "write", for messages

    def handle(self, index: int) -> AsyncIOHandle:
        return self._streams[index].handle

    def new_batch(self) -> None:
        """Later submissions go to the next stream (completing what it still holds)."""
        self._next = (self._next + 1) % len(self._streams)
        self._complete(self._streams[self._next])

    def submit(self, key: Any, issue: Callable[[AsyncIOHandle], int], path: str,
               on_done: Callable[[], None]) -> None:
        """Issue one operation on the current stream; ``on_done`` runs when it is complete."""
        stream = self._streams[self._next]
        if issue(stream.handle) != 0:
            self.drain()
            raise SwapFileError(f"swap file {path}: the {self._what} could not be issued (file "
                                "shorter than written, unreadable, or the path is not writable)")
        stream.ops.append((key, path, on_done))
        self._where[key] = stream

    def wait_for(self, key: Any) -> None:
        """Complete the stream holding ``key``'s operation (and only that stream)."""
        stream = self._where.get(key)
        if stream is not None:
            self._complete(stream)

    def wait_all(self) -> None:
        for stream in self._streams:
            self._complete(stream)

    def _complete(self, stream: _Stream) -> None:
        if not stream.ops:
            return
        ops, stream.ops = stream.ops, []
        for key, _, _ in ops:
            del self._where[key]
        done = stream.handle.wait()
        try:
            if done != len(ops):
                raise SwapFileError(f"{len(ops) - done} of {len(ops)} {self._what}s failed (first "
                                    f"file: {ops[0][1]})")
            for _, _, on_done in ops:
                on_done()
        except SwapFileError:
            self.drain()
            raise

    def drain(self) -> None:
        """After a fatal error: let every operation in flight end, dropping their completions.

        Training stops with the error; a handle destroyed with operations pending would abort
        the process instead (DeepSpeed's aio asserts on it), hiding the message.
        """
        for stream in self._streams:
            if stream.ops:
                stream.ops = []
                stream.handle.wait()
        self._where.clear()


# --- swap files -----------------------------------------------------------------------------------

def checksum(data: torch.Tensor) -> int:
    """xxHash3 (64-bit) of a contiguous CPU tensor's bytes: ~5 GB/s here, against ~1 GB/s for crc32."""
    return xxhash.xxh3_64_intdigest(data.view(torch.uint8).numpy())


@dataclass(frozen=True)
class _Written:
    nbytes: int  # meaningful bytes at the start of the file
    file_bytes: int  # bytes written (aligned for direct I/O)
    digest: int


class SwapFiles:
    """The NVMe tier's folder: file paths, preflight checks, checksums, clean-up at exit.

    A file is named by its tensor's key: a parameter's ``ds_id``, or the name DeepSpeed's
    optimizer swapper gives a state tensor.
    """

    def __init__(self, folder: str | Path, verify: bool = True) -> None:
        self.folder = Path(folder)
        self.verify = verify
        self._written: dict[Hashable, _Written] = {}
        try:
            shutil.rmtree(self.folder, ignore_errors=True)  # a previous run's stale files
            self.folder.mkdir(parents=True, exist_ok=True)
            probe = self.folder / ".write-probe"
            probe.write_bytes(b"\0")
            probe.unlink()
        except OSError as err:
            raise SwapFileError(f"NVMe tier folder {self.folder} is not writable: "
                                f"{err.strerror or err}") from err
        # Swap files are scratch: gone when the store is, and at interpreter exit at the latest.
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.folder), True)

    def path(self, key: Hashable) -> str:
        return str(self.folder / f"{key}.swp")

    def ensure_space(self, nbytes: int) -> None:
        """Refuse a write that cannot fit, rather than leave a short file behind."""
        free = shutil.disk_usage(self.folder).free
        if free < nbytes:
            raise SwapFileError(
                f"NVMe tier folder {self.folder}: disk full ({os.strerror(errno.ENOSPC)}); "
                f"{nbytes} bytes to write, {free} free")

    def wrote(self, key: Hashable, data: torch.Tensor, file_bytes: int) -> None:
        """Record a write of ``data`` (the meaningful bytes) padded to ``file_bytes``."""
        digest = checksum(data) if self.verify else 0
        self._written[key] = _Written(data.numel() * data.element_size(), file_bytes, digest)

    def file_bytes(self, key: Hashable) -> int:
        return self._require(key).file_bytes

    def check_readable(self, key: Hashable) -> None:
        """Before a read is issued: the file exists and is as long as what was written."""
        written = self._require(key)
        path = self.path(key)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise SwapFileError(f"swap file {path} is missing (deleted while training?); "
                                f"tensor {key} cannot be read back") from None
        if size < written.file_bytes:
            raise SwapFileError(f"swap file {path} is truncated: {size} of {written.file_bytes} "
                                f"bytes; tensor {key} cannot be read back")

    def verify_read(self, key: Hashable, data: torch.Tensor) -> None:
        """After a read: the bytes are the ones written, or training stops here."""
        if not self.verify:
            return
        written = self._require(key)
        if checksum(data) != written.digest:
            raise SwapFileError(f"swap file {self.path(key)} is corrupted: its checksum does "
                                f"not match what was written (tensor {key}, "
                                f"{written.nbytes} bytes)")

    def _require(self, key: Hashable) -> _Written:
        try:
            return self._written[key]
        except KeyError:
            raise SwapFileError(f"tensor {key} was never written to {self.folder}") from None


def file_bytes_for(nbytes: int, alignment: int) -> int:
    """Direct I/O moves whole aligned blocks: a swap file is its tensor padded to the alignment."""
    return align_up(max(nbytes, 1), alignment)


# Bytes of host memory per element of an optimizer sub-group kept off NVMe: the fp32 master
# weight, Adam's two moments and the fp32 gradient.
OPTIMIZER_BYTES_PER_ELEMENT = 16


def optimizer_cpu_subgroups(numels: Iterable[int], budget: int, swappable: Callable[[int], bool],
                            bytes_per_element: int = OPTIMIZER_BYTES_PER_ELEMENT) -> frozenset[int]:
    """The optimizer sub-groups whose states stay in host memory, under ``budget`` bytes.

    The optimizer step visits every sub-group exactly once per step, so unlike parameters there is
    no hot set: a kept sub-group saves reading and writing its own bytes every step, and the
    choice that saves the most is the one that keeps the most bytes. Largest first, while they fit
    (a greedy knapsack: within one largest sub-group of the optimum). Sub-groups DeepSpeed would
    not swap anyway (``swappable`` false: under its minimum I/O size) cost nothing here.
    """
    sizes = [(numel * bytes_per_element, index) for index, numel in enumerate(numels)
             if swappable(numel)]
    kept, left = set(), budget
    for nbytes, index in sorted(sizes, key=lambda item: (-item[0], item[1])):
        if nbytes <= left:
            kept.add(index)
            left -= nbytes
    return frozenset(kept)
