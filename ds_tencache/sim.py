"""Replays a one-step fetch profile on a hardware model: stock ZeRO-Infinity, TenCache, lower bound.

A training step is the profile's fetch groups in order (forward then backward), each computing
for ``hardware.compute_s(flops[g])``, followed by the optimizer step. Transfers run on serial
channels, one per link: NVMe read, host-to-device (H2D), device-to-host (D2H); a parameter
kept on NVMe is read into a pinned buffer, then copied to the device. The GPU waits only for the
parameters of the group it is about to run. The host issues every fetch itself, at
``hardware.fetch_overhead_s`` of host time each, before the group it belongs to runs.
Everything is deterministic, O(uses), pure Python.

**Stock ZeRO-Infinity** (:func:`simulate_stock`) follows DeepSpeed 0.19.8's
``runtime/zero/partitioned_param_coordinator.py`` with the settings of a real DeepSpeed config
(:class:`StockSettings`): demand fetch of the group's missing parameters, then a prefetch of up to
``min(max_live - available, prefetch_bucket)`` elements from the recorded trace, stopping at the
first parameter still on NVMe (``_fetch_sub_module_impl``, L449-L476), NVMe swap-in of the
parameters after those in flight, up to ``2 x in-flight`` elements and the free swap buffers
(``__prefetch_nvme_param_partitions``, L667-L689), and release after use unless reused within
``max_reuse_distance`` elements or already prefetched for a later use (``__params_to_release``,
L634-L665). Where a detail is left out, it is one that could only make stock slower (a demand
fetch never waits for a free swap buffer; see the comments), so stock is never slower than its code.

**TenCache** (:func:`simulate_tencache`) takes residency and prefetch issue points from the
committed :func:`ds_tencache.plan.build_plan` under the device budget, and the CPU tier from the
pool's size classes (:func:`ds_tencache.pool.size_classes`): optimizer states first, then
parameters, fill the pinned CPU memory; the rest lives on NVMe.

**Optimizer step.** Both run DeepSpeed's CPU Adam over every parameter after the backward pass
(the last gradient must arrive first). Each parameter has ``OPTIMIZER_BYTES_PER_PARAM`` of fp32
state (master weight, Adam m and v, gradient). Stock with ``offload_optimizer: nvme`` reads and
writes all of it every step, serially by default (DeepSpeed 0.19.8):

- the fp32 gradients go to NVMe after the backward pass (``stage3.py``
  ``_finalize_offload_gradient_accumulation`` -> ``swap_out_gradients``, L1459-L1482), and the
  first swap-in waits for them (``partitioned_optimizer_swapper.py`` ``swap_in_optimizer_state``
  -> ``_flush_gradient_swapper``, L77);
- ``stage3.py`` ``step`` (L2910-L2926) then, per sub-group: swaps in master weight, m, v and the
  gradient and waits (``_swap_in_parameter``, ``aio_handle.wait()`` L183 and L204), steps, writes
  the updated fp16 partition of NVMe parameters and waits (``_partitioned_params_swap_out`` ->
  ``partitioned_param_swapper.py`` ``swap_out_partitioned_params``, ``synchronize_writes`` L407),
  and writes the states back and waits (``_swap_out_optimizer_state``, L106). Read, Adam and write
  times therefore add. With ``pipeline_read``/``pipeline_write`` the ``PipelinedOptimizerSwapper``
  overlaps the next read and this write with Adam; that is modelled as ``max(Adam, read + write)``
  (one drive: its reads and writes share it).

TenCache keeps what fits in CPU memory there and streams the rest through its pool while Adam
runs (an assumption of this model: its store pipelines read, Adam and write, which is what stock's
pipelined swapper does too, so the fair baseline for that assumption is stock pipelined).

**Lower bound** (:func:`lower_bound`): the largest of the independent resource times: GPU compute
followed by CPU Adam; every non-persistent parameter copied to the device once and every gradient
copied back once; and the NVMe traffic of the bytes that fit neither in pinned CPU memory (read
once and written once per step, since every byte changes every step).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ds_tencache.hardware import HardwareModel
from ds_tencache.plan import build_plan
from ds_tencache.pool import class_of, size_classes

# fp32 master weight, Adam m, Adam v and the fp32 gradient, 4 bytes each (ZeRO-Offload's layout).
OPTIMIZER_BYTES_PER_PARAM = 16
# DeepSpeed's swapper never swaps a partition under 1 MiB (swap_tensor/utils.py MIN_AIO_BYTES,
# used by AsyncPartitionedParameterSwapper.swappable_tensor): such parameters stay in CPU memory.
MIN_SWAPPABLE_BYTES = 2**20
# Part of GPU memory neither policy may plan with: CUDA context, cuBLAS workspaces and allocator
# fragmentation (assumption; PyTorch's caching allocator commonly leaves ~10% unusable).
GPU_RESERVED_FRACTION = 0.1
# Activation memory per layer in bytes, s*b*h*(34 + 5*a*s/h) (Korthikanti et al. 2022, eq. 1),
# kept for one layer at a time under activation checkpointing, plus the checkpointed layer
# inputs (2 bytes x s*b*h per layer).
ACTIVATION_BYTES_PER_ELEMENT = 34
ATTENTION_SCORE_BYTES = 5
CHECKPOINT_BYTES_PER_ELEMENT = 2
# Pool size classes for the CPU tier, as the committed pool builds them (4 KiB O_DIRECT alignment).
POOL_MAX_CLASSES = 16
POOL_ALIGNMENT = 4096


@dataclass(frozen=True)
class StockSettings:
    """The knobs of a DeepSpeed config that drive stock ZeRO-3 / ZeRO-Infinity (elements, not bytes)."""

    prefetch_bucket_numel: int = int(5e7)  # stage3_prefetch_bucket_size default
    max_live_numel: int = int(1e9)  # stage3_max_live_parameters default
    max_reuse_numel: int = int(1e9)  # stage3_max_reuse_distance default
    persistence_threshold: int = int(1e5)  # stage3_param_persistence_threshold default
    offload_param: str = "none"  # offload_param.device: none, cpu or nvme
    buffer_count: int = 5  # offload_param.buffer_count default
    buffer_size: int = int(1e8)  # offload_param.buffer_size default (elements per slot)
    max_in_cpu: int = int(1e9)  # offload_param.max_in_cpu default (elements)
    offload_optimizer: str = "none"  # offload_optimizer.device
    optimizer_pipelined: bool = False  # offload_optimizer.pipeline_read or pipeline_write

    @classmethod
    def from_ds_config(cls, config: Mapping[str, Any]) -> StockSettings:
        """Read the settings from a DeepSpeed config dict, with DeepSpeed 0.19.8's defaults."""
        zero = config.get("zero_optimization", {})
        param = zero.get("offload_param") or {}
        optimizer = zero.get("offload_optimizer") or {}
        defaults = cls()
        return cls(
            prefetch_bucket_numel=int(zero.get("stage3_prefetch_bucket_size", defaults.prefetch_bucket_numel)),
            max_live_numel=int(zero.get("stage3_max_live_parameters", defaults.max_live_numel)),
            max_reuse_numel=int(zero.get("stage3_max_reuse_distance", defaults.max_reuse_numel)),
            persistence_threshold=int(zero.get("stage3_param_persistence_threshold",
                                               defaults.persistence_threshold)),
            offload_param=str(param.get("device", "none")),
            buffer_count=int(param.get("buffer_count", defaults.buffer_count)),
            buffer_size=int(param.get("buffer_size", defaults.buffer_size)),
            max_in_cpu=int(param.get("max_in_cpu", defaults.max_in_cpu)),
            offload_optimizer=str(optimizer.get("device", "none")),
            optimizer_pipelined=bool(optimizer.get("pipeline_read", False)
                                     or optimizer.get("pipeline_write", False)),
        )


@dataclass(frozen=True)
class Trace:
    """One step as the simulator sees it: fetch groups in order, their FLOPs, parameter sizes."""

    groups: list[tuple[int, ...]]
    backward: list[bool]  # per group: True in the backward pass (its gradients go to the host)
    flops: list[float]
    numel: dict[int, int]
    nbytes: dict[int, int]
    activation_bytes: int = 0  # device memory the step's activations need

    @classmethod
    def from_model_profile(cls, model_profile) -> Trace:
        """From a :class:`ds_tencache.model_profiles.ModelProfile` (duck-typed: no torch needed)."""
        shape = model_profile.shape
        tokens = shape.batch * shape.seq_len
        per_layer = tokens * shape.hidden_size * (
            ACTIVATION_BYTES_PER_ELEMENT
            + ATTENTION_SCORE_BYTES * shape.num_heads * shape.seq_len / shape.hidden_size)
        checkpoints = CHECKPOINT_BYTES_PER_ELEMENT * tokens * shape.hidden_size * shape.num_layers
        tensors = model_profile.profile.tensors
        return cls(groups=[g.param_ids for g in model_profile.groups],
                   backward=[g.phase.value == "bwd" for g in model_profile.groups],
                   flops=list(model_profile.flops),
                   numel={p: t.numel for p, t in tensors.items()},
                   nbytes={p: t.nbytes for p, t in tensors.items()},
                   activation_bytes=int(per_layer + checkpoints))


@dataclass
class PolicyResult:
    step_time_s: float
    hit_rate: float  # uses whose parameter was on the device, complete, when its group started
    bytes_moved: dict[str, int] = field(default_factory=dict)  # direction -> bytes per step
    gpu_mem_util: float = 0.0  # peak device bytes (params + activations) / device memory
    cpu_mem_util: float = 0.0  # peak pinned bytes in use / pinned memory of the host
    forward_backward_s: float = 0.0
    optimizer_s: float = 0.0
    fetches: int = 0  # parameter fetches to the device per step (demand and prefetch)


@dataclass
class _Channels:
    """Serial transfer links; each transfer starts when it is issued and its link is free."""

    hardware: HardwareModel
    nvme_free: float = 0.0
    h2d_free: float = 0.0
    d2h_free: float = 0.0
    moved: dict[str, int] = field(default_factory=dict)

    def _count(self, direction: str, nbytes: int) -> None:
        self.moved[direction] = self.moved.get(direction, 0) + nbytes

    def nvme_read(self, nbytes: int, at: float) -> float:
        self.nvme_free = max(at, self.nvme_free) + nbytes / self.hardware.nvme_read_bytes_per_s
        self._count("nvme_to_cpu", nbytes)
        return self.nvme_free

    def h2d(self, nbytes: int, at: float) -> float:
        self.h2d_free = max(at, self.h2d_free) + nbytes / self.hardware.h2d_bytes_per_s
        self._count("cpu_to_gpu", nbytes)
        return self.h2d_free

    def d2h(self, nbytes: int, at: float) -> float:
        self.d2h_free = max(at, self.d2h_free) + nbytes / self.hardware.d2h_bytes_per_s
        self._count("gpu_to_cpu", nbytes)
        return self.d2h_free


def persistent_params(trace: Trace, settings: StockSettings) -> set[int]:
    """Parameters ZeRO-3 keeps on the device for good (fewer elements than the threshold)."""
    return {p for p, n in trace.numel.items() if n < settings.persistence_threshold}


def _partitioned_groups(trace: Trace, persistent: set[int]) -> list[tuple[int, ...]]:
    return [tuple(p for p in group if p not in persistent) for group in trace.groups]


def simulate_stock(trace: Trace, hardware: HardwareModel, settings: StockSettings) -> PolicyResult:
    """Stock ZeRO-3 / ZeRO-Infinity in its steady state (trace complete, prefetch active)."""
    persistent = persistent_params(trace, settings)
    groups = _partitioned_groups(trace, persistent)
    on_nvme = _stock_nvme_params(trace, settings, persistent)
    numel, nbytes = trace.numel, trace.nbytes
    uses = [(g, p) for g, group in enumerate(groups) for p in group]  # the prefetch queue
    group_end = _group_ends(groups)
    keep_for_reuse = _reused_within(groups, numel, settings.max_reuse_numel)

    channels = _Channels(hardware)
    on_device: dict[int, float] = {}  # param -> time its device copy completes
    swapped_in: dict[int, float] = {}  # NVMe param -> time its pinned swap buffer is filled
    fetched_for: dict[int, int] = {}  # __most_recent_step_id_param_fetched_for
    available = 0  # __n_available_params, elements
    peak_device = 0
    hits = total_uses = fetches = 0
    now = 0.0
    cursor = 0  # head of __param_queue

    def fetch(param: int, at: float) -> float:
        """Issue one fetch once the host is free at ``at``; returns when the host is free again."""
        nonlocal available, peak_device, fetches
        at += hardware.fetch_overhead_s
        fetches += 1
        source_ready = at
        if param in on_nvme:
            if param not in swapped_in:
                swapped_in[param] = channels.nvme_read(nbytes[param], at)
            source_ready = swapped_in[param]
        on_device[param] = channels.h2d(nbytes[param], source_ready)
        available += numel[param]
        peak_device = max(peak_device, available)
        return at

    for g, group in enumerate(groups):
        start = now
        total_uses += len(group)
        hits += sum(1 for p in group if p in on_device and on_device[p] <= start)
        host = start
        for param in group:  # __all_gather_params of the group's missing parameters
            if param not in on_device:
                host = fetch(param, host)
        # Block until the group's parameters are there. __max_ongoing_fetch_events (2) only makes
        # the host wait for fetches issued before these on the same serial stream, which are done
        # by then, so the cap adds no delay on one device and is not modelled further.
        now = max([host, *(on_device[p] for p in group)])
        # Pop the group's own entries off the queue (they were fetched for this use).
        cursor = max(cursor, group_end[g])
        for param in group:
            fetched_for[param] = max(fetched_for.get(param, -1), g)
        if settings.prefetch_bucket_numel > 0:
            limit = min(settings.max_live_numel - available, settings.prefetch_bucket_numel)
            chosen: list[int] = []
            prefetching = 0
            while cursor < len(uses) and prefetching < limit:
                use_group, param = uses[cursor]
                if param in on_nvme and param not in on_device and param not in swapped_in:
                    break  # "nvme prefetch is handled elsewhere ... preserve fetch order"
                fetched_for[param] = max(fetched_for.get(param, -1), use_group)
                if param not in on_device and param not in chosen:
                    chosen.append(param)
                    prefetching += numel[param]
                cursor += 1
            for param in chosen:
                now = fetch(param, now)
            if on_nvme:
                _prefetch_nvme(uses, cursor, on_nvme, on_device, swapped_in, numel, nbytes,
                               settings.buffer_count, channels, now)
        now += hardware.compute_s(trace.flops[g])
        if trace.backward[g]:
            for param in group:
                channels.d2h(nbytes[param], now)
        for param in group:  # release_sub_module
            if fetched_for.get(param, -1) > g or param in keep_for_reuse[g]:
                continue
            del on_device[param]
            swapped_in.pop(param, None)  # remove_partition_and_release_buffers frees its slot
            available -= numel[param]
    forward_backward = max(now, channels.d2h_free)

    optimizer_s, optimizer_moved = _stock_optimizer(trace, hardware, settings, on_nvme)
    for direction, moved in optimizer_moved.items():
        channels._count(direction, moved)
    persistent_bytes = sum(nbytes[p] for p in persistent)
    device_peak = peak_device * _itemsize(trace) + persistent_bytes + trace.activation_bytes
    return PolicyResult(
        step_time_s=forward_backward + optimizer_s,
        hit_rate=hits / total_uses if total_uses else 1.0,
        bytes_moved=channels.moved,
        gpu_mem_util=device_peak / hardware.gpu_mem_bytes,
        cpu_mem_util=_share(_stock_pinned_bytes(trace, settings), hardware.pinned_cpu_bytes),
        forward_backward_s=forward_backward, optimizer_s=optimizer_s, fetches=fetches)


def _prefetch_nvme(uses, cursor, on_nvme, on_device, swapped_in, numel, nbytes, buffer_count,
                   channels: _Channels, now: float) -> None:
    """__prefetch_nvme_param_partitions: swap in upcoming NVMe parameters, bounded by the elements
    in flight and the free swap buffers (one fixed slot per parameter)."""
    in_flight = sum(numel[p] for p, ready in on_device.items() if ready > now)
    free_slots = buffer_count - len(swapped_in)
    considered = 0
    swap_in = []
    for _, param in uses[cursor:]:
        if param not in on_nvme:
            continue
        if considered > 2 * in_flight or len(swap_in) >= free_slots:
            break
        if param not in swapped_in and param not in on_device and param not in swap_in:
            swap_in.append(param)
        considered += numel[param]
    for param in swap_in:
        swapped_in[param] = channels.nvme_read(nbytes[param], now)


def _stock_nvme_params(trace: Trace, settings: StockSettings, persistent: set[int]) -> set[int]:
    """Parameters stock fetches from NVMe: swappable ones (>= 1 MiB) when offload_param is nvme.

    ``max_in_cpu`` keeps the first ``max_in_cpu`` elements of the fp16 flat buffer in CPU memory
    (stage3.py ``_create_fp16_partitions_with_defragmentation``, L897-L900); we let those be
    fetched from CPU, the most favourable reading for stock.
    """
    if settings.offload_param != "nvme":
        return set()
    in_cpu = 0
    nvme = set()
    for param in sorted(trace.numel):
        if param in persistent or trace.nbytes[param] < MIN_SWAPPABLE_BYTES:
            continue
        if in_cpu + trace.numel[param] <= settings.max_in_cpu:
            in_cpu += trace.numel[param]
        else:
            nvme.add(param)
    return nvme


def _stock_optimizer(trace: Trace, hardware: HardwareModel, settings: StockSettings,
                     on_nvme: set[int]) -> tuple[float, dict[str, int]]:
    """CPU Adam; with optimizer states on NVMe, swap in + step + swap out (serial by default),
    and the updated fp16 copies of NVMe parameters written back."""
    params = sum(trace.numel.values())
    adam_s = params / hardware.cpu_adam_params_per_s
    if settings.offload_optimizer != "nvme":
        param_write = sum(trace.nbytes[p] for p in on_nvme)
        write_s = param_write / hardware.nvme_write_bytes_per_s
        return adam_s + write_s, {"cpu_to_nvme": param_write} if param_write else {}
    state = params * OPTIMIZER_BYTES_PER_PARAM
    written = state + sum(trace.nbytes[p] for p in on_nvme)
    read_s = state / hardware.nvme_read_bytes_per_s
    write_s = written / hardware.nvme_write_bytes_per_s
    total = max(adam_s, read_s + write_s) if settings.optimizer_pipelined else read_s + adam_s + write_s
    return total, {"nvme_to_cpu": state, "cpu_to_nvme": written}


def _stock_pinned_bytes(trace: Trace, settings: StockSettings) -> int:
    """Host memory stock pins or keeps: the fixed swap slots, max_in_cpu fp16 elements, and the
    optimizer states when they are offloaded to the CPU rather than to NVMe."""
    params = sum(trace.numel.values())
    itemsize = _itemsize(trace)
    if settings.offload_param == "nvme":
        pinned = settings.buffer_count * settings.buffer_size * itemsize
        pinned += min(params, settings.max_in_cpu) * itemsize
    elif settings.offload_param == "cpu":
        pinned = params * itemsize
    else:
        pinned = 0
    if settings.offload_optimizer == "cpu":
        pinned += params * OPTIMIZER_BYTES_PER_PARAM
    return pinned


@dataclass(frozen=True)
class CpuTier:
    """What TenCache keeps in pinned CPU memory; the rest of each kind lives on NVMe."""

    optimizer_params: int  # parameters whose optimizer states are cached in CPU memory
    params_in_cpu: frozenset[int]
    reserved_bytes: int  # pool bytes (class-rounded) plus the cached optimizer states
    requested_bytes: int


def plan_cpu_tier(trace: Trace, hardware: HardwareModel, settings: StockSettings,
                  persistent: set[int]) -> CpuTier:
    """Fill pinned CPU memory with optimizer states first, then parameters.

    Optimizer states go first: every uncached byte of them is read and written each step with
    nothing to hide it behind, while a parameter read from NVMe overlaps the step's compute.
    Parameters are placed in id order (layer order); the pool rounds each to its size class.
    """
    capacity = hardware.pinned_cpu_bytes
    params = sum(trace.numel.values())
    if settings.offload_optimizer == "nvme":
        optimizer_params = min(params, capacity // OPTIMIZER_BYTES_PER_PARAM)
    else:  # states stay where the config keeps them, as for stock: never on NVMe
        optimizer_params = params
    used = optimizer_params * OPTIMIZER_BYTES_PER_PARAM
    candidates = [p for p in sorted(trace.numel) if p not in persistent]
    classes = size_classes((trace.nbytes[p] for p in candidates), POOL_MAX_CLASSES, POOL_ALIGNMENT)
    in_cpu = []
    requested = 0
    for param in candidates:
        rounded = class_of(trace.nbytes[param], classes, POOL_ALIGNMENT)
        if settings.offload_param == "nvme" and used + rounded > capacity:
            continue
        in_cpu.append(param)
        used += rounded
        requested += trace.nbytes[param]
    return CpuTier(optimizer_params, frozenset(in_cpu), used,
                   requested + optimizer_params * OPTIMIZER_BYTES_PER_PARAM)


def device_budget(trace: Trace, hardware: HardwareModel, persistent: set[int]) -> int:
    """Device bytes TenCache may cache parameters in: what activations, persistent parameters
    and the reserved share leave free."""
    persistent_bytes = sum(trace.nbytes[p] for p in persistent)
    return int(hardware.gpu_mem_bytes * (1 - GPU_RESERVED_FRACTION)
               - trace.activation_bytes - persistent_bytes)


def simulate_tencache(trace: Trace, hardware: HardwareModel, settings: StockSettings,
                      budget_bytes: int | None = None) -> PolicyResult:
    """TenCache: the committed plan's residency and issue points, the pool's CPU tier.

    ``settings`` supplies where the stock config offloads to (the tiers TenCache may use) and the
    persistence threshold, which both policies share. ``budget_bytes`` defaults to
    :func:`device_budget`.
    """
    persistent = persistent_params(trace, settings)
    groups = _partitioned_groups(trace, persistent)
    tier = plan_cpu_tier(trace, hardware, settings, persistent)
    nbytes = trace.nbytes
    budget = device_budget(trace, hardware, persistent) if budget_bytes is None else budget_bytes
    compute = [hardware.compute_s(f) for f in trace.flops]
    on_nvme = {p for g in groups for p in g if p not in tier.params_in_cpu}
    # The plan times fetches on one channel; a fetch from NVMe crosses NVMe then PCIe, so give
    # the plan the bytes-weighted rate of the path each parameter really takes.
    fetch_bytes = sum(nbytes[p] for p in trace.nbytes if p not in persistent)
    fetch_s = sum(nbytes[p] / hardware.h2d_bytes_per_s
                  + (nbytes[p] / hardware.nvme_read_bytes_per_s if p in on_nvme else 0.0)
                  for p in trace.nbytes if p not in persistent)
    bandwidth = fetch_bytes / fetch_s if fetch_s else hardware.h2d_bytes_per_s
    plan = build_plan(groups, nbytes, budget, compute, bandwidth)

    channels = _Channels(hardware)
    ready: dict[int, float] = {}  # fetch index -> time the parameter is on the device
    by_group: dict[int, list[int]] = {}
    for index, f in enumerate(plan.fetches):
        by_group.setdefault(f.group, []).append(index)
    issue_order = {id(f): index for index, f in enumerate(plan.fetches)}
    late = 0
    now = 0.0
    for g in range(len(groups)):
        start = host = now
        for f in plan.issue_at.get(g, []):  # the plan's prefetches (and demand fetches) here
            host += hardware.fetch_overhead_s  # the host issues each fetch before the group runs
            source_ready = channels.nvme_read(f.nbytes, host) if f.param_id in on_nvme else host
            ready[issue_order[id(f)]] = channels.h2d(f.nbytes, source_ready)
        needed = [ready[i] for i in by_group.get(g, [])]
        late += sum(1 for t in needed if t > start)
        now = max([host, *needed])
        now += compute[g]
        if trace.backward[g]:
            for param in groups[g]:
                channels.d2h(nbytes[param], now)
    forward_backward = max(now, channels.d2h_free)

    optimizer_s, optimizer_moved = _tencache_optimizer(trace, hardware, tier, on_nvme)
    for direction, moved in optimizer_moved.items():
        channels._count(direction, moved)
    persistent_bytes = sum(nbytes[p] for p in persistent)
    device_peak = plan.peak_resident_bytes + persistent_bytes + trace.activation_bytes
    return PolicyResult(
        step_time_s=forward_backward + optimizer_s,
        hit_rate=1.0 - late / plan.uses if plan.uses else 1.0,
        bytes_moved=channels.moved,
        gpu_mem_util=device_peak / hardware.gpu_mem_bytes,
        cpu_mem_util=_share(tier.requested_bytes, hardware.pinned_cpu_bytes),
        forward_backward_s=forward_backward, optimizer_s=optimizer_s, fetches=len(plan.fetches))


def _tencache_optimizer(trace: Trace, hardware: HardwareModel, tier: CpuTier,
                        on_nvme: set[int]) -> tuple[float, dict[str, int]]:
    """CPU Adam over every parameter, overlapped with streaming the uncached states from and to
    NVMe (one device: its read and write times add) and writing back NVMe parameters."""
    params = sum(trace.numel.values())
    adam_s = params / hardware.cpu_adam_params_per_s
    uncached = (params - tier.optimizer_params) * OPTIMIZER_BYTES_PER_PARAM
    written = uncached + sum(trace.nbytes[p] for p in on_nvme)
    io_s = uncached / hardware.nvme_read_bytes_per_s + written / hardware.nvme_write_bytes_per_s
    moved = {direction: b for direction, b in (("nvme_to_cpu", uncached), ("cpu_to_nvme", written)) if b}
    return max(adam_s, io_s), moved


def lower_bound(trace: Trace, hardware: HardwareModel, settings: StockSettings) -> float:
    """No policy on this hardware can step faster (see the module docstring for each term)."""
    persistent = persistent_params(trace, settings)
    params = sum(trace.numel.values())
    groups = _partitioned_groups(trace, persistent)
    # Only parameters some group uses must cross PCIe (a parameter no sub-module fetches moves
    # under no policy; counting it let both policies "beat" the bound on such traces).
    partitioned = sum(trace.nbytes[p] for p in {p for group in groups for p in group})
    gradients = sum(trace.nbytes[p] for group, backward in zip(groups, trace.backward)
                    if backward for p in group)
    adam_s = params / hardware.cpu_adam_params_per_s
    compute = sum(hardware.compute_s(f) for f in trace.flops)
    if settings.offload_param == "none":
        return compute + (adam_s if settings.offload_optimizer != "none" else 0.0)
    states = params * OPTIMIZER_BYTES_PER_PARAM
    # Parameters under MIN_SWAPPABLE_BYTES may stay in ordinary host memory (stock never swaps
    # them), so only the swappable ones can be forced onto NVMe by a full pinned tier.
    swappable = sum(trace.nbytes[p] for p in {p for group in groups for p in group}
                    if trace.nbytes[p] >= MIN_SWAPPABLE_BYTES)
    # The first ``max_in_cpu`` elements stay in host memory of their own (stock keeps them there,
    # beside the optimizer states); only the rest competes with the states for the pinned tier.
    spilled = max(0, swappable - settings.max_in_cpu * _itemsize(trace))
    if settings.offload_param != "nvme":
        overflow = 0
    elif settings.offload_optimizer == "nvme":
        overflow = max(0, spilled + states - hardware.pinned_cpu_bytes)
    else:  # the states must stay in host memory; only parameters may spill to NVMe
        overflow = max(0, spilled - max(0, hardware.pinned_cpu_bytes - states))
    return max(compute + adam_s,
               partitioned / hardware.h2d_bytes_per_s,
               gradients / hardware.d2h_bytes_per_s,
               overflow / hardware.nvme_read_bytes_per_s + overflow / hardware.nvme_write_bytes_per_s)


def _group_ends(groups: Sequence[Sequence[int]]) -> list[int]:
    """Index in the flat use queue just after each group's entries."""
    ends, total = [], 0
    for group in groups:
        total += len(group)
        ends.append(total)
    return ends


def _reused_within(groups: Sequence[Sequence[int]], numel: Mapping[int, int],
                   max_reuse_numel: int) -> list[set[int]]:
    """Per group, its parameters that __params_to_release keeps: used again in a module reached
    before the elements traversed from the next module on reach ``max_reuse_numel``."""
    cumulative = [0]
    for group in groups:
        cumulative.append(cumulative[-1] + sum(numel[p] for p in group))
    next_use: dict[int, int] = {}
    keep: list[set[int]] = [set() for _ in groups]
    for g in range(len(groups) - 1, -1, -1):
        for param in groups[g]:
            later = next_use.get(param)
            if later is not None and cumulative[later] - cumulative[g + 1] < max_reuse_numel:
                keep[g].add(param)
        for param in groups[g]:
            next_use[param] = g
    return keep


def _share(used: int, capacity: int) -> float:
    """Utilisation; a host with no pinned memory reports its use against one byte, not a crash."""
    return used / max(capacity, 1)


def _itemsize(trace: Trace) -> int:
    """Bytes per element of the trained weights (all parameters share one dtype)."""
    param = next(iter(trace.numel))
    return trace.nbytes[param] // max(trace.numel[param], 1)
