"""The only module that touches DeepSpeed internals. Written against deepspeed==0.19.8.

It translates; :mod:`ds_tencache.controller` and :mod:`ds_tencache.tiers` decide. The bindings:

- :class:`TencacheCoordinator` subclasses ZeRO-3's ``PartitionedParameterCoordinator``. Every
  ZeRO-3 hook asks ``DeepSpeedZeRoOffload.get_param_coordinator()`` at call time, so swapping the
  instance before the first forward routes every fetch and release through it. While profiling it
  is stock ZeRO-3 plus timestamps; once planned it keeps gathered parameters resident until the
  plan evicts them, issues the plan's prefetches itself, and turns stock prefetching off.
- ``DeepSpeedZeroOptimizer_Stage3.initialize_ds_offload`` (an overridable factory) is wrapped so a
  config with a ``"tencache"`` block gets the coordinator: after ``import ds_tencache`` a plain
  ``deepspeed.initialize`` (and so Hugging Face's Trainer) activates it.
- ``DeepSpeedConfig.__init__`` is wrapped to validate the block when DeepSpeed reads the config,
  so a mistake (or tencache without ZeRO-3) fails before any engine is built.
- With NVMe optimizer offload, :class:`TieredOptimizerSwapper` replaces ZeRO-3's optimizer-state
  swapper (``DeepSpeedZeroOptimizer_Stage3._configure_tensor_swapping`` is wrapped), and
  ``_swappable_optimizer_subgroup`` is wrapped so the sub-groups of its CPU tier stay in memory.
- With NVMe parameter offload, :class:`TieredParameterSwapper` replaces ZeRO-Infinity's
  ``AsyncPartitionedParameterSwapper``: ``zero.Init`` builds its swapper by that name from
  ``partition_parameters``'s namespace, so the name is bound to a factory that returns ours when
  the config asks for the NVMe tier and stock's otherwise. It keeps the upstream interface (the
  methods ZeRO-3 calls, listed in ``SWAPPER_METHODS``) over the size-class pool, the CPU tier and
  checksummed swap files.

Name-mangled upstream members used here (``_PartitionedParameterCoordinator__*``) are listed in
``UPSTREAM_MEMBERS``; ``tests/integration/test_tencache_upstream.py`` fails loudly when an upgrade
renames one.
"""

from __future__ import annotations

import atexit
import functools
import logging
import sys
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT
from deepspeed.ops.op_builder import AsyncIOBuilder
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.swap_tensor import constants as aio_keys
from deepspeed.runtime.swap_tensor.optimizer_utils import OptimizerSwapper
from deepspeed.runtime.swap_tensor.partitioned_optimizer_swapper import PartitionedOptimizerSwapper
from deepspeed.runtime.swap_tensor.partitioned_param_swapper import (
    AsyncPartitionedParameterSwapper, PartitionedParamStatus)
from deepspeed.runtime.zero import partition_parameters
from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.runtime.zero.partitioned_param_coordinator import (PartitionedParameterCoordinator,
                                                                   iter_params)
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.utils import z3_leaf_module

from ds_tencache.config import (TencacheConfig, TencacheConfigError, from_ds_config,
                               nvme_tier_active, optimizer_tier_active)
from ds_tencache.controller import CacheController, Mode, PlanInputs
from ds_tencache.metrics import MetricsReporter
from ds_tencache.pool import PinnedBufferPool, PooledBuffer, PoolExhaustedError, PoolStats
from ds_tencache.profile import Phase, TensorInfo
from ds_tencache.tiers import (IOStreams, SwapFileError, SwapFiles, TierLayout, file_bytes_for,
                               optimizer_cpu_subgroups, plan_tiers, warmup_carving)

DEEPSPEED_VERSION = "0.19.8"
_MANGLED = "_PartitionedParameterCoordinator__"
# Private upstream members this adapter reads or overrides; checked by a test on upgrade.
UPSTREAM_MEMBERS = ("all_gather_params", "release_param", "params_to_release", "prefetch_bucket_sz",
                    "max_n_available_params")
# The upstream swapper's methods that ZeRO-3 calls with NVMe parameter offload and an optimizer in
# CPU memory, each overridden by TieredParameterSwapper; checked by a test on upgrade.
SWAPPER_METHODS = ("swappable_tensor", "get_buffer", "swap_out_and_release", "swap_in",
                   "synchronize_reads", "synchronize_writes", "remove_partition_and_release_buffers",
                   "swap_into_buffer", "reserve_partitioned_swap_space",
                   "swap_out_partitioned_params", "get_path", "available_swap_in_buffers")
# The upstream optimizer swapper's methods TieredOptimizerSwapper overrides, and the members of
# its buffer manager it reads; checked by a test on upgrade.
OPTIMIZER_SWAPPER_METHODS = ("swap_in_optimizer_state", "_swap_in_pinned_gradients",
                             "_swap_out_optimizer_state", "_swap_out_unpinned_tensors",
                             "swap_out_gradients", "release_swap_buffers", "pre_backward",
                             "purge_state")
BUFFER_MANAGER_MEMBERS = ("free_buffer_index", "all_buffers")

logger = logging.getLogger("ds_tencache")


class TencacheCoordinator(PartitionedParameterCoordinator):
    """ZeRO-3's parameter coordinator, driven by a :class:`CacheController` after warm-up."""

    controller: CacheController
    offload_device: str
    store: TieredParameterSwapper | None

    @classmethod
    def adopt(cls, stock: PartitionedParameterCoordinator, controller: CacheController,
              offload_device: str, store: TieredParameterSwapper | None = None) -> TencacheCoordinator:
        """Take over a freshly built stock coordinator's state (streams, registry, limits).

        Copying the state, rather than calling the constructor again, keeps this adapter
        independent of the constructor's long and changing argument list.
        """
        coordinator = cls.__new__(cls)
        coordinator.__dict__.update(stock.__dict__)
        coordinator.controller = controller
        coordinator.offload_device = offload_device
        coordinator.store = store
        coordinator.stock_swapper = None  # ZeRO-Infinity's swapper, when it stays: its usage is sampled
        coordinator.stock_swap_peak_bytes = 0
        coordinator._layout = None  # the tier layout the store has applied
        coordinator._nvme_read_seen = 0
        coordinator._params_by_id = {}
        coordinator._modules = {}
        coordinator._mode = None
        coordinator._stock_prefetch_bucket = getattr(stock, _MANGLED + "prefetch_bucket_sz")
        return coordinator

    # --- step and fetch events ----------------------------------------------------------------

    def reset_step(self) -> None:
        if self.controller.mode is Mode.PLANNED:
            # The optimizer step releases everything, but a forward without one (gradient
            # accumulation, evaluation) would otherwise start with the last step's residents.
            self._release(list(self._params_by_id))
        super().reset_step()
        self.controller.start_step(time.perf_counter(), agree=_same_on_every_rank)
        layout = self.controller.layout
        if self.store is not None and layout is not None and layout is not self._layout:
            if self.store.apply_layout(layout, self._params_by_id):
                self._layout = layout
                self._nvme_read_seen = self.store.bytes_read  # residents' one-off reads
                if _rank() == 0:
                    logger.info(
                        "tencache: NVMe tier laid out: %d partitions (%.1f MiB) in the CPU tier, "
                        "%d staging buffers, %.1f of %.1f MiB pinned carved; plan reads %.1f MiB "
                        "from NVMe per step at a device budget of %.1f MiB",
                        len(layout.cpu_resident) + len(layout.packed), layout.resident_bytes / 2**20,
                        sum(layout.staging_per_class.values()), layout.carved_bytes / 2**20,
                        self.store.capacity / 2**20, layout.nvme_read_bytes_per_step / 2**20,
                        layout.device_budget_bytes / 2**20)
        self._apply_mode()

    def fetch_sub_module(self, current_submodule: torch.nn.Module, forward: bool) -> None:
        name, params, ids = self._module_info(current_submodule)
        start = time.perf_counter()
        group = self.controller.begin_group(
            name, Phase.FORWARD if forward else Phase.BACKWARD, ids, list(map(_issued, params)),
            start)
        self._apply_mode()  # the controller may just have abandoned its plan
        self._release(group.evict)
        if self.store is not None:
            self.store.wait_for_reads(params)  # not the prefetches issued after them
        super().fetch_sub_module(current_submodule, forward)
        if self.store is not None:
            self.store.release_staging(params)
        end = time.perf_counter()
        if self.stock_swapper is not None:
            self._sample_stock_swapper()
        if self.store is not None:  # the NVMe reads of this group and the prefetches before it
            self.controller.record_moved("nvme_to_cpu", self.store.bytes_read - self._nvme_read_seen)
            self._nvme_read_seen = self.store.bytes_read
        prefetch = self.controller.end_group(end, end - start)
        if prefetch:
            missing = [param for param in map(self._params_by_id.__getitem__, prefetch)
                       if param.ds_status == ZeroParamStatus.NOT_AVAILABLE]
            if self.store is not None:
                # NVMe partitions: start their reads now, in plan order; the gather at use waits.
                self.store.prefetch(p for p in missing if _on_nvme(p))
                missing = [p for p in missing if not _on_nvme(p)]
            if missing:
                getattr(self, _MANGLED + "all_gather_params")(set(missing), forward)

    def _module_info(self, module: torch.nn.Module) -> tuple[str, list[torch.nn.Parameter], tuple[int, ...]]:
        """Name, partitioned parameters and their ds_ids of a sub-module, worked out once."""
        info = self._modules.get(module.ds_id)
        if info is None:
            params = sorted((p for p in iter_params(module, recurse=z3_leaf_module(module))
                             if not p.ds_persist), key=lambda p: p.ds_id)
            for param in params:
                self._params_by_id[param.ds_id] = param
                self.controller.register_tensor(TensorInfo(
                    param.ds_id, param.ds_numel, str(param.dtype), _nbytes(param)))
            info = self._modules[module.ds_id] = (f"{type(module).__name__}#{module.ds_id}", params,
                                                  tuple(p.ds_id for p in params))
        return info

    # --- upstream private members, overridden by their mangled names --------------------------

    def _PartitionedParameterCoordinator__params_to_release(self, submodule, step_id):
        """Planned: nothing is released after use; the plan's evictions decide. Profiling with the
        NVMe tier: everything is released right after use, so the warm-up carving (one staging
        buffer per size class and spares) suffices whatever stock's reuse distance would keep."""
        if self.controller.mode is Mode.PLANNED:
            return set()
        if self.store is not None:
            return {p.ds_id for p in iter_params(submodule, recurse=z3_leaf_module(submodule))
                    if not p.ds_persist}
        return PartitionedParameterCoordinator._PartitionedParameterCoordinator__params_to_release(
            self, submodule, step_id)

    def _PartitionedParameterCoordinator__all_gather_params(self, params, forward):
        """Every all-gather, stock or planned, is counted with the bytes it really moves."""
        missing = sum(_nbytes(p) for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE)
        start = time.perf_counter()
        PartitionedParameterCoordinator._PartitionedParameterCoordinator__all_gather_params(
            self, params, forward)
        source = "cpu" if self.store is not None else self.offload_device  # NVMe reads land in host memory
        self.controller.record_gather(missing, time.perf_counter() - start, f"{source}_to_device")

    # --- helpers --------------------------------------------------------------------------------

    def _release(self, param_ids) -> None:
        release = getattr(self, _MANGLED + "release_param")
        for param_id in param_ids:
            param = self._params_by_id[param_id]
            if param.ds_status == ZeroParamStatus.AVAILABLE and not param.ds_active_sub_modules:
                release(param)

    def _sample_stock_swapper(self) -> None:
        """Bytes of partitions in ZeRO-Infinity's fixed slots now (for the pool comparison)."""
        swapper = self.stock_swapper
        in_use = sum(swapper.param_id_to_numel[p] for p in swapper.param_id_to_buffer_id)
        self.stock_swap_peak_bytes = max(self.stock_swap_peak_bytes,
                                         in_use * swapper.swap_element_size)

    def _apply_mode(self) -> None:
        """Stock prefetching runs only while profiling; the plan prefetches by itself. With the NVMe
        tier stock never prefetches: its NVMe prefetch claims buffers by count, not by size."""
        if self.controller.mode is not self._mode:
            self._mode = self.controller.mode
            planned = self._mode is Mode.PLANNED or self.store is not None
            bucket = 0 if planned else self._stock_prefetch_bucket
            setattr(self, _MANGLED + "prefetch_bucket_sz", bucket)


def _nbytes(param: torch.nn.Parameter) -> int:
    return param.ds_numel * param.dtype.itemsize


def _on_nvme(param: torch.nn.Parameter) -> bool:
    return getattr(param.ds_tensor, "final_location", None) == OffloadDeviceEnum.nvme


def _issued(param: torch.nn.Parameter) -> bool:
    """A use's transfer was issued before it: gathered or gathering, or (NVMe) its read started."""
    if param.ds_status != ZeroParamStatus.NOT_AVAILABLE:
        return True
    return _on_nvme(param) and param.ds_tensor.status != PartitionedParamStatus.NOT_AVAILABLE


def _same_on_every_rank(inputs: PlanInputs) -> PlanInputs:
    """Rank 0's plan inputs on every rank: their all-gathers must be issued in the same order."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return inputs
    box = [inputs]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def build_controller(config: TencacheConfig, stock: PartitionedParameterCoordinator,
                     module: torch.nn.Module,
                     store: TieredParameterSwapper | None = None) -> CacheController:
    """A controller for one engine, with "auto" settings resolved against the stock limits."""
    if config.device_budget == "auto":
        itemsize = next(module.parameters()).dtype.itemsize
        budget = getattr(stock, _MANGLED + "max_n_available_params") * itemsize
    else:
        budget = config.device_budget
    lookahead = None if config.prefetch_lookahead == "auto" else config.prefetch_lookahead
    rank0 = _rank() == 0
    reporter = MetricsReporter(config.metrics.path if rank0 else None, config.metrics.every_n_steps,
                               log=rank0)
    tiers = None
    if store is not None:
        def tiers(build, device_budget):
            return plan_tiers(build, device_budget, store.partition_bytes, store.capacity,
                              store.max_classes, store.alignment)
    return CacheController(config.warmup_steps, budget, reporter, lookahead_bytes=lookahead,
                           profile_path=config.profile_path if rank0 else None, plan_tiers=tiers)


def tencache_controller(engine: Any) -> CacheController | None:
    """The controller of a DeepSpeed engine, or None when tencache is not active on it."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    coordinator = getattr(offload, "param_coordinator", None)
    return coordinator.controller if isinstance(coordinator, TencacheCoordinator) else None


def _param_swapper(params: Iterable[torch.nn.Parameter]):
    """The NVMe swapper zero.Init gave these parameters (tencache's or ZeRO-Infinity's), if any."""
    return next((p.nvme_swapper for p in params if getattr(p, "nvme_swapper", None) is not None),
                None)


def host_tier_figures(engine: Any) -> dict[str, Any] | None:
    """Pinned-memory figures of the engine's parameter swapper (tencache's or ZeRO-Infinity's).

    None without NVMe parameter offload. ZeRO-Infinity's in-use peak is sampled at every fetch,
    so it exists only when a tencache coordinator watched the run.
    """
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    coordinator = getattr(offload, "param_coordinator", None)
    swapper = _param_swapper(engine.module.parameters())
    if isinstance(swapper, TieredParameterSwapper):
        stats = swapper.pool_stats()
        layout = swapper.layout
        return {
            "pinned_bytes_reserved": stats.reserved_bytes,
            "pinned_bytes_used_peak": stats.peak_requested_bytes,
            "utilisation": stats.utilisation,
            "fragmentation": stats.fragmentation,
            "allocations_after_warmup": (None if swapper.allocations_at_plan is None
                                         else stats.allocations - swapper.allocations_at_plan),
            "cpu_resident_bytes": layout.resident_bytes if layout else 0,
            "packed_partitions": len(layout.packed) if layout else 0,
            "device_budget_bytes": layout.device_budget_bytes if layout else None,
            "nvme_bytes_read": swapper.bytes_read,
            "nvme_bytes_written": swapper.bytes_written,
        }
    if swapper is not None:
        slots = swapper.buffers.numel() * swapper.buffers.element_size()
        extra = swapper.partitioned_swap_buffer
        write_back = 0 if extra is None else extra.numel() * extra.element_size()
        sampled = isinstance(coordinator, TencacheCoordinator)
        # Partitions never swapped (under 1 MiB, or within max_in_cpu) stay in host memory,
        # pinned when offload_param.pin_memory is set.
        in_memory = sum(p.ds_tensor.ds_numel * p.ds_tensor.element_size()
                        for p in engine.module.parameters()
                        if getattr(p.ds_tensor, "final_location", None) != OffloadDeviceEnum.nvme)
        pinned_partitions = in_memory if engine.zero_offload_param().pin_memory else 0
        return {
            # every pinned byte stock holds for parameters: slots, write-back buffer, partitions
            "pinned_bytes_reserved": slots + write_back + pinned_partitions,
            "pinned_swap_slot_bytes": slots,
            "pinned_write_back_bytes": write_back,
            "pinned_partition_bytes": pinned_partitions,
            # the fixed slots are stock's pool: their in-use peak is sampled at every fetch
            "pinned_bytes_used_peak": coordinator.stock_swap_peak_bytes if sampled else None,
            "utilisation": coordinator.stock_swap_peak_bytes / slots if sampled else None,
        }
    return None


def optimizer_tier_figures(engine: Any, steps: int) -> dict[str, Any] | None:
    """What the optimizer-state swapper (tencache's or ZeRO-Infinity's) kept and moved.

    None without NVMe optimizer offload. Bytes moved are known for tencache's swapper only.
    """
    optimizer = getattr(engine, "optimizer", None)
    swapper = getattr(optimizer, "optimizer_swapper", None)
    if swapper is None:
        return None
    numels = optimizer.fp16_partitioned_groups_flat_numel
    streamed = _streamed_optimizer_subgroups(optimizer)
    figures = {
        "sub_groups": len(numels),
        "streamed_sub_groups": len(streamed),
        "streamed_elements": sum(numels[i] for i in streamed),
        "pinned_staging_bytes": sum(b.numel() * b.element_size()
                                    for b in swapper.swap_buffer_manager.all_buffers),
        # gradient fragments of 1 MiB and more go to files of their own during backward
        "gradient_files": sum(len(info.swapped_gradients)
                              for info in swapper.swap_params_info.values()),
    }
    if isinstance(swapper, TieredOptimizerSwapper):
        figures.update(nvme_bytes_read_per_step=swapper.bytes_read / steps,
                       nvme_bytes_written_per_step=swapper.bytes_written / steps,
                       prefetched_reads=swapper.prefetched_reads,
                       verified_gradient_reads=swapper.verified_gradient_reads)
    return figures


# --- activation ----------------------------------------------------------------------------------

def _wrap_initialize_ds_offload(original):
    @functools.wraps(original)
    def initialize_ds_offload(self, *args, **kwargs):
        offload = original(self, *args, **kwargs)
        ds_config = kwargs.get("ds_config")
        config = from_ds_config(ds_config) if isinstance(ds_config, Mapping) else None
        # ZeRO-3 configures its optimizer swapper after this call; the block decides which.
        self._tencache_optimizer_tier = config if (
            config is not None and optimizer_tier_active(ds_config)) else None
        if config is not None:
            stock = offload.param_coordinator
            device = str(getattr(offload.offload_device, "value", offload.offload_device) or "none")
            swapper = _param_swapper(offload.module.parameters())
            store = swapper if isinstance(swapper, TieredParameterSwapper) else None
            offload.param_coordinator = TencacheCoordinator.adopt(
                stock, build_controller(config, stock, offload.module, store), device, store)
            offload.param_coordinator.stock_swapper = swapper if store is None else None
            logger.info("tencache: active (warm-up %d steps, device budget %s%s)",
                        config.warmup_steps, config.device_budget,
                        f", NVMe tier with a {store.capacity / 2**20:.1f} MiB pinned pool"
                        if store is not None else "")
            ignored = config.tier_settings_ignored(store is not None,
                                                   self._tencache_optimizer_tier is not None)
            if ignored:
                logger.warning("tencache: %s apply to an NVMe tier that is not active here "
                               "(offload_param / offload_optimizer device \"nvme\"); ignored",
                               ", ".join(ignored))
        return offload

    initialize_ds_offload.__tencache_wrapped__ = True
    return initialize_ds_offload


def _wrap_zero_nvme_offload_optimizer(original):
    """Which checkpoint path the engine takes with optimizer states on NVMe.

    For it, DeepSpeed copies the swap folder beside the checkpoint and, on load, copies it back and
    skips the optimizer's state dict altogether, so master weights held in memory (sub-groups under
    the swap minimum, tencache's CPU tier) are never restored and every partition keeps the fresh
    engine's weights (measured: all of the tiny model's). With tencache's tier the engine takes
    the path of in-memory optimizers instead: streamed states are read into the state dict on save
    (:func:`_wrap_rigid_state_dict`) and written back to their files on load
    (:func:`_restore_streamed_optimizer_states`).
    """

    @functools.wraps(original)
    def zero_nvme_offload_optimizer(self):
        if isinstance(getattr(self.optimizer, "optimizer_swapper", None), TieredOptimizerSwapper):
            return False
        return original(self)

    zero_nvme_offload_optimizer.__tencache_wrapped__ = True
    return zero_nvme_offload_optimizer


def _streamed_optimizer_subgroups(optimizer) -> list[int]:
    return [i for i in range(len(optimizer.fp16_groups)) if optimizer._swappable_optimizer_subgroup(i)]


def _wrap_rigid_state_dict(original):
    """Checkpoint saving with optimizer states on NVMe.

    Upstream puts each sub-group's fp32 master weights and Adam states in the state dict as they
    are in memory, which for a sub-group swapped to NVMe is an empty placeholder: the checkpoint
    silently lacks them, and a resumed run starts those sub-groups from the initial weights. With
    tencache's optimizer tier they are read back into memory for the save.
    """

    @functools.wraps(original)
    def _rigid_state_dict(self):
        swapper = self.optimizer_swapper
        if not isinstance(swapper, TieredOptimizerSwapper):
            return original(self)
        held = swapper.materialize([self.fp32_partitioned_groups_flat[i]
                                    for i in _streamed_optimizer_subgroups(self)])
        try:
            state = original(self)
            # The dict keeps its own handles on the values; the live tensors are emptied again.
            ids = {id(tensor) for tensor in held}
            state[FP32_FLAT_GROUPS] = [t.detach() if id(t) in ids else t
                                       for t in state[FP32_FLAT_GROUPS]]
            for entry in state[OPTIMIZER_STATE_DICT]["state"].values():
                for name, value in entry.items():
                    if id(value) in ids:
                        entry[name] = value.detach()
        finally:
            for tensor in held:
                tensor.data = torch.Tensor()
        return state

    _rigid_state_dict.__tencache_wrapped__ = True
    return _rigid_state_dict


def _restore_streamed_optimizer_states(optimizer, swapper: TieredOptimizerSwapper,
                                       state_dict: dict, load_optimizer_states: bool) -> dict:
    """Before upstream's load: write the checkpoint's master weights (and states) of streamed
    sub-groups into their swap files, which upstream's load then reads back ("touch all
    parameters"); returns the state dict with those entries emptied, as upstream expects for
    swapped sub-groups (it copies master weights only into tensors held in memory)."""
    streamed = set(_streamed_optimizer_subgroups(optimizer))
    # torch numbers optimizer states by position over param_groups, as upstream fills them
    # (_set_fp32_optimizer_param_groups: each group's sub-groups in order).
    order = [i for g in range(len(optimizer.optimizer.param_groups))
             for i in range(len(optimizer.fp16_groups)) if optimizer.sub_group_to_group_id[i] == g]
    saved_states = state_dict[OPTIMIZER_STATE_DICT]["state"]
    tensors, paths = [], []
    for index, sub_group in enumerate(order):
        if sub_group not in streamed:
            continue
        parameter = optimizer.fp32_partitioned_groups_flat[sub_group]
        swap_info = swapper._get_param_swap_info(parameter)
        tensors.append(state_dict[FP32_FLAT_GROUPS][sub_group])
        paths.append(swap_info.get_swap_paths()[0])
        for name, value in saved_states.get(index, {}).items() if load_optimizer_states else ():
            if torch.is_tensor(value) and swapper.is_swappable_tensor(tensor=value):
                # upstream's name for a state tensor's file (OptimizerSwapper._get_state_tensors)
                tensors.append(value)
                paths.append(str(Path(swapper.swap_folder) / f"{name}-{parameter.ds_id}.tensor.swp"))
    swapper.write_states(tensors, paths)
    state_dict = dict(state_dict)
    state_dict[FP32_FLAT_GROUPS] = [torch.empty(0) if i in streamed else t
                                    for i, t in enumerate(state_dict[FP32_FLAT_GROUPS])]
    return state_dict


def _wrap_rigid_load_state_dict(original):
    """Checkpoint loading with partitions or optimizer states on NVMe.

    Optimizer states: see :func:`_restore_streamed_optimizer_states`. Partitions (``max_in_cpu``
    exceeded): upstream restores the low-precision partitions by copying the loaded fp32 master weights into
    each sub-group's flat host buffer, which does not exist for sub-groups whose partitions live
    on NVMe (it fails with ``'NoneType' object has no attribute 'data'``, with or without tencache).
    With the NVMe tier, such sub-groups get a scratch flat buffer for the duration of the call;
    afterwards the restored values go where each partition lives: written to its swap file, or
    copied into its CPU-tier buffer.
    """

    @functools.wraps(original)
    def _rigid_load_state_dict(self, state_dict, load_optimizer_states=True):
        if isinstance(self.optimizer_swapper, TieredOptimizerSwapper):
            state_dict = _restore_streamed_optimizer_states(self, self.optimizer_swapper, state_dict,
                                                            load_optimizer_states)
        store = _param_swapper(p for group in self.fp16_groups for p in group)
        missing = [i for i, flat in enumerate(self.fp16_partitioned_groups_flat) if flat is None]
        if not isinstance(store, TieredParameterSwapper) or not missing:
            return original(self, state_dict, load_optimizer_states)
        for i in missing:
            flat = torch.empty(self.fp16_partitioned_groups_flat_numel[i],
                               dtype=self.fp16_groups[i][0].dtype)
            self.fp16_partitioned_groups_flat[i] = flat
            offset = 0
            for partition in self.fp16_partitioned_groups[i]:
                # upstream unflattens by these shapes; a partition on NVMe has a placeholder
                if partition.status == PartitionedParamStatus.NOT_AVAILABLE:
                    partition.data = flat.narrow(0, offset, partition.ds_numel)
                offset += partition.ds_numel
        try:
            original(self, state_dict, load_optimizer_states)
            for i in missing:
                store.restore_partitions(self.fp16_groups[i])
        finally:
            for i in missing:
                self.fp16_partitioned_groups_flat[i] = None

    _rigid_load_state_dict.__tencache_wrapped__ = True
    return _rigid_load_state_dict


def _wrap_configure_tensor_swapping(original):
    """ZeRO-3 builds its optimizer-state swapper here; with the block's NVMe tier, it gets ours."""

    @functools.wraps(original)
    def _configure_tensor_swapping(self, offload_optimizer_config, aio_config):
        config = getattr(self, "_tencache_optimizer_tier", None)
        if config is None:
            return original(self, offload_optimizer_config, aio_config)
        base = Path(config.nvme_path or offload_optimizer_config.nvme_path) / "tencache"
        self.optimizer_swapper = TieredOptimizerSwapper(
            swap_config=offload_optimizer_config, aio_config=aio_config, base_folder=str(base),
            optimizer=self.optimizer, largest_numel=max(self.fp16_partitioned_groups_flat_numel),
            device=self.device, dtype=self.master_weights_and_grads_dtype, timers=self.timers,
            folder=base / "optimizer" / f"rank{_rank()}", verify=config.verify_checksums,
            cpu_budget=config.optimizer_cpu_budget)
        return None

    _configure_tensor_swapping.__tencache_wrapped__ = True
    return _configure_tensor_swapping


def _wrap_swappable_optimizer_subgroup(original):
    """Sub-groups in tencache's optimizer CPU tier are not swappable: ZeRO-3 keeps them in memory."""

    @functools.wraps(original)
    def _swappable_optimizer_subgroup(self, sub_group_id):
        swapper = self.optimizer_swapper
        if isinstance(swapper, TieredOptimizerSwapper) and swapper.keeps_in_cpu(
                sub_group_id, self.fp16_partitioned_groups_flat_numel):
            return False
        return original(self, sub_group_id)

    _swappable_optimizer_subgroup.__tencache_wrapped__ = True
    return _swappable_optimizer_subgroup


def _wrap_config_init(original):
    @functools.wraps(original)
    def __init__(self, config, *args, **kwargs):
        original(self, config, *args, **kwargs)
        from_ds_config(self._param_dict)  # raises TencacheConfigError naming the bad key

    __init__.__tencache_wrapped__ = True
    return __init__


def install() -> None:
    """Bind tencache to DeepSpeed (idempotent); ``import ds_tencache`` calls this."""
    if not getattr(DeepSpeedZeroOptimizer_Stage3.initialize_ds_offload, "__tencache_wrapped__", False):
        DeepSpeedZeroOptimizer_Stage3.initialize_ds_offload = _wrap_initialize_ds_offload(
            DeepSpeedZeroOptimizer_Stage3.initialize_ds_offload)
    if not getattr(DeepSpeedEngine.zero_nvme_offload_optimizer, "__tencache_wrapped__", False):
        DeepSpeedEngine.zero_nvme_offload_optimizer = _wrap_zero_nvme_offload_optimizer(
            DeepSpeedEngine.zero_nvme_offload_optimizer)
    if not getattr(DeepSpeedConfig.__init__, "__tencache_wrapped__", False):
        DeepSpeedConfig.__init__ = _wrap_config_init(DeepSpeedConfig.__init__)
    for name, wrap in (("_rigid_load_state_dict", _wrap_rigid_load_state_dict),
                       ("_rigid_state_dict", _wrap_rigid_state_dict),
                       ("_configure_tensor_swapping", _wrap_configure_tensor_swapping),
                       ("_swappable_optimizer_subgroup", _wrap_swappable_optimizer_subgroup)):
        method = getattr(DeepSpeedZeroOptimizer_Stage3, name)
        if not getattr(method, "__tencache_wrapped__", False):
            setattr(DeepSpeedZeroOptimizer_Stage3, name, wrap(method))
    # zero.Init builds its parameter swapper by this module-level name.
    partition_parameters.AsyncPartitionedParameterSwapper = _swapper_factory
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(asctime)s] [%(levelname)s] [%(name)s] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    if logger.level == logging.NOTSET:  # a level the application chose wins
        logger.setLevel(logging.INFO)


def initialize(*args, **kwargs):
    """Drop-in for ``deepspeed.initialize``: same arguments, same return value.

    It validates the ``"tencache"`` block first, so a mistake is reported before DeepSpeed starts
    building the engine.
    """
    import deepspeed

    config = kwargs.get("config", kwargs.get("config_params"))
    if config is None and kwargs.get("args") is not None:
        config = getattr(kwargs["args"], "deepspeed_config", None)
    if config is not None and not isinstance(config, DeepSpeedConfig):
        from_ds_config(config)  # a TencacheConfigError here names the bad key
    install()
    return deepspeed.initialize(*args, **kwargs)


# --- the NVMe tier ----------------------------------------------------------------------------------

def _element_size(ds_config: DeepSpeedConfig) -> int:
    """Bytes per parameter element as the config trains (fp16/bf16: 2, else fp32: 4)."""
    return 2 if ds_config.bfloat16_config.enabled or ds_config.float16_config.enabled else 4


class TieredParameterSwapper(AsyncPartitionedParameterSwapper):
    """ZeRO-Infinity's parameter swapper interface over the pinned pool, CPU tier and swap files.

    What differs from the upstream swapper, and why:

    - **One pinned allocation of ``cpu_budget`` bytes**, carved into size classes (warm-up: by
      :func:`~ds_tencache.tiers.warmup_carving`; then by the plan's :class:`TierLayout`), instead
      of ``buffer_count`` fixed slots sized for the largest parameter plus a second pinned buffer
      as large as the largest optimizer sub-group for the write-back.
    - **A CPU tier**: the partitions the layout picks stay in their pool buffer for the whole run,
      marked as host partitions, so ZeRO-3 gathers them from memory and the optimizer updates them
      in place; they are never read from or written to NVMe.
    - **Every partition size is handled** (upstream leaves partitions under 1 MiB in unpinned
      host memory, outside its accounting): the plan decides where even small ones live.
    - **Each parameter's own dtype** sizes its buffer: upstream sizes its slots by ``zero.Init``'s
      dtype, which for an fp32 model on an accelerator without fp16 is bf16 (an operator-precedence
      slip in ``Init._set_dtype``), so fp32 NVMe offload fails there.
    - **Integrity**: a checksum of every write is verified on every read; unwritable folders, full
      disks, missing, truncated or corrupt files raise :class:`SwapFileError` naming the file.
    """

    def __init__(self, ds_config: DeepSpeedConfig, model_dtype: torch.dtype) -> None:
        # Deliberately not super().__init__(): it pins the fixed slots this class replaces.
        config = from_ds_config(ds_config._param_dict)  # the factory checked the tier is active
        assert config is not None
        offload = ds_config.zero_config.offload_param
        self.dtype = model_dtype  # upstream attribute; buffers use each parameter's own dtype
        self.aio_config = ds_config.aio_config
        if self.aio_config[aio_keys.AIO_USE_GDS]:
            raise TencacheConfigError("aio.use_gds is not supported by tencache's NVMe tier; set "
                                      "tencache.nvme_tier to false to use ZeRO-Infinity's swapper")
        self.reads, self.writes = _io_streams(self.aio_config, "read"), _io_streams(self.aio_config, "write")
        # Direct I/O moves whole 512-byte sectors on each of the op's parallel threads.
        self.alignment = max(config.pool.alignment_bytes,
                             512 * self.aio_config[aio_keys.AIO_INTRA_OP_PARALLELISM])
        self.max_classes = config.pool.max_size_classes
        self.capacity = (int(offload.buffer_count * offload.buffer_size) * _element_size(ds_config)
                         if config.cpu_budget == "auto" else config.cpu_budget)
        folder = Path(config.nvme_path or offload.nvme_path) / "tencache" / f"rank{_rank()}"
        self.files = SwapFiles(folder, verify=config.verify_checksums)
        # Until every partition is known (zero.Init writes them one at a time), the whole capacity
        # is one buffer; the first read carves the warm-up classes out of the same allocation.
        self.pool = PinnedBufferPool(
            {self.capacity // self.alignment * self.alignment: 1} if self.capacity >= self.alignment
            else {}, self.alignment, self._locked, capacity_bytes=self.capacity)
        self._init_carving = True  # one buffer of the whole capacity, for zero.Init's writes
        self.layout: TierLayout | None = None
        self.partition_bytes: dict[int, int] = {}
        self._staged: dict[int, PooledBuffer] = {}  # NVMe partitions read into staging buffers
        self._resident: dict[int, PooledBuffer] = {}  # the CPU tier
        self._pack: PooledBuffer | None = None  # the CPU tier's shared buffer of small partitions
        self._packed: dict[int, torch.Tensor] = {}  # their views into it
        self.invalid_buffer = torch.tensor(1).half()  # upstream's placeholder for a released partition
        self.bytes_read = self.bytes_written = 0
        self.allocations_at_plan: int | None = None
        # The optimizer's last write-back is still in flight when training ends; DeepSpeed's aio
        # handle aborts the process if destroyed with operations pending.
        atexit.register(_drain_streams, weakref.ref(self))

    def _locked(self, nbytes: int) -> torch.Tensor:
        """Page-locked host memory from DeepSpeed's async I/O op (pinned on a GPU host)."""
        return self.reads.handle(0).new_cpu_locked_tensor(nbytes, torch.empty(0, dtype=torch.uint8))

    # --- the upstream interface ------------------------------------------------------------------

    def swappable_tensor(self, param=None, numel=None) -> bool:
        return True

    def available_swap_in_buffers(self) -> int:
        return sum(self.pool.buffers_per_class().values())

    def get_path(self, param, must_exist: bool = False) -> str:
        return self.files.path(param.ds_id)

    def get_buffer(self, param, numel: int) -> torch.Tensor:
        """zero.Init's first placement of a partition: a staging buffer, written out next."""
        self.partition_bytes[param.ds_id] = numel * param.dtype.itemsize
        buffer = self._acquire(param.ds_id)
        self._staged[param.ds_id] = buffer
        return self._partition_view(buffer, param)

    def swap_out_and_release(self, params, async_op: bool = False,
                             force_buffer_release: bool = False) -> None:
        for param in params:
            self._write(param.ds_id, self._staged[param.ds_id], free_after=False)
        self.synchronize_writes()
        self.remove_partition_and_release_buffers(params)

    def swap_in(self, params, async_op: bool = True, swap_in_buffers=None) -> None:
        if swap_in_buffers is not None:
            raise NotImplementedError("tencache's NVMe tier stages reads in its own pool")
        self._ensure_training_carving()
        self.reads.new_batch()
        for param in params:
            param_id = param.ds_id
            path = self.files.path(param_id)
            self.writes.wait_for(path)  # a read must see the last write of its file
            _check_readable(self, param_id)
            buffer = self._acquire(param_id)
            self._staged[param_id] = buffer
            view = buffer.view[:self.files.file_bytes(param_id)]
            self.reads.submit(param_id, lambda aio, view=view, path=path: aio.async_pread(view, path, 0),
                              path, functools.partial(self._read_done, param))
            param.ds_tensor.status = PartitionedParamStatus.INFLIGHT
            self.bytes_read += view.numel()
        if not async_op:
            self.wait_for_reads(params)

    def synchronize_reads(self) -> None:
        self.reads.wait_all()

    def synchronize_writes(self) -> None:
        self.writes.wait_all()

    def wait_for_reads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Complete the reads of these partitions only (later prefetches stay in flight)."""
        for param in params:
            self.reads.wait_for(param.ds_id)

    def remove_partition_and_release_buffers(self, params) -> None:
        self.wait_for_reads(params)  # never hand back a buffer the disk is still filling
        for param in params:
            buffer = self._staged.pop(param.ds_id, None)
            if buffer is not None:
                self.pool.release(buffer)
            param.ds_tensor.data = self.invalid_buffer.data
            param.ds_tensor.status = PartitionedParamStatus.NOT_AVAILABLE

    def release_staging(self, params: Iterable[torch.nn.Parameter]) -> None:
        """After the gather: the gathered parameters hold the values, so their partitions' staging
        buffers go back to the pool (upstream keeps a slot until the parameter is released).

        On one rank ZeRO-3 does not gather: the parameter becomes a view of its partition, moved
        to the device, which on the CPU accelerator is the staging buffer itself. Such a view is
        copied first, as the host-to-device copy of a GPU would; the copy lives in device memory,
        within the device budget.
        """
        for param in params:
            buffer = self._staged.get(param.ds_id)
            if buffer is None or param.ds_status != ZeroParamStatus.AVAILABLE:
                continue
            if param.data.data_ptr() == buffer.view.data_ptr():
                param.data = param.data.clone()
            del self._staged[param.ds_id]
            self.pool.release(buffer)
            param.ds_tensor.data = self.invalid_buffer.data
            param.ds_tensor.status = PartitionedParamStatus.NOT_AVAILABLE

    def swap_into_buffer(self, param, dest_buffer: torch.Tensor) -> None:
        self.swap_in([param], async_op=False)
        dest_buffer.data.copy_(param.ds_tensor.data)
        self.remove_partition_and_release_buffers([param])

    def reserve_partitioned_swap_space(self, partition_num_elems) -> None:
        """Upstream pins a second buffer as large as the largest optimizer sub-group here; the
        write-back below streams through the pool's free buffers instead."""

    def swap_out_partitioned_params(self, dst_fp16_params, src_fp32_params) -> None:
        """The optimizer step's write-back of updated partitions (upstream: one big pinned buffer).

        Nothing is staged during the optimizer step, so every staging buffer is free: each
        partition is converted into one of its class or, when those are taken, of a larger class;
        only when none is left are the writes in flight completed to free theirs. The writes stay
        in flight after return, like upstream's; the next read waits for them.
        """
        for param, source in zip(dst_fp16_params, src_fp32_params, strict=True):
            buffer = self._acquire(param.ds_id, spill=True)
            self._partition_view(buffer, param).copy_(source)
            self.writes.new_batch()  # each write its own stream: a read waits for its file only
            self._write(param.ds_id, buffer, free_after=True)
        for param in dst_fp16_params:
            param.ds_tensor.status = PartitionedParamStatus.NOT_AVAILABLE

    # --- the CPU tier ----------------------------------------------------------------------------

    def prefetch(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Start the NVMe reads of partitions the plan needs soon; the gather waits for them."""
        wanted = [p for p in params if p.ds_tensor.status == PartitionedParamStatus.NOT_AVAILABLE]
        if wanted:
            self.swap_in(wanted, async_op=True)

    def apply_layout(self, layout: TierLayout, params: Mapping[int, torch.nn.Parameter]) -> bool:
        """Move to a plan's layout: write back leaving residents, recarve, read in new residents.

        Only between steps with nothing staged (False: try again at the next step start). Old
        residents are written back first because the optimizer updated them in place.
        """
        if self._staged:
            return False
        self.synchronize_reads()
        self.synchronize_writes()
        packed = self._unpack(layout.packed, params)
        for param_id in list(self._resident):
            self._write(param_id, self._resident.pop(param_id), free_after=True)
            param = params[param_id]
            param.ds_tensor.final_location = OffloadDeviceEnum.nvme
            param.ds_tensor.data = self.invalid_buffer.data
            param.ds_tensor.status = PartitionedParamStatus.NOT_AVAILABLE
        self.synchronize_writes()
        self.pool.recarve(layout.buffers_per_class)
        self._init_carving = False
        if layout.packed:  # asks for the bytes the packed partitions use, in the pack's class
            self._pack = self.pool.acquire(max(offset + self.partition_bytes[param_id]
                                               for param_id, offset in layout.packed.items()))
        for param_id, offset in layout.packed.items():
            param = params[param_id]
            view = self._pack.view[offset:offset + self.partition_bytes[param_id]].view(param.dtype)
            view.copy_(packed[param_id])
            self._packed[param_id] = view
            param.ds_tensor.data = view.data
            param.ds_tensor.status = PartitionedParamStatus.AVAILABLE
            param.ds_tensor.final_location = OffloadDeviceEnum.cpu
        for param_id in sorted(layout.cpu_resident):
            param = params[param_id]
            self.swap_in([param], async_op=False)
            self._resident[param_id] = self._staged.pop(param_id)
            # A host partition from now on: gathered from memory, updated in place by the optimizer.
            param.ds_tensor.final_location = OffloadDeviceEnum.cpu
        self.layout = layout
        self.allocations_at_plan = self.pool.stats().allocations
        return True

    def _unpack(self, packed: Mapping[int, int], params) -> dict[int, torch.Tensor]:
        """The current values of the partitions to pack, in plain memory, and the old pack freed.

        Packed partitions sit at unaligned offsets, where direct I/O cannot write from, so a new
        layout takes them from the old pack, or (the first layout) reads them from their files.
        """
        values = {param_id: view.clone() for param_id, view in self._packed.items()}
        self._packed = {}
        if self._pack is not None:
            self.pool.release(self._pack)
            self._pack = None
        for param_id in sorted(packed.keys() - values.keys()):
            param = params[param_id]
            self.swap_in([param], async_op=False)
            values[param_id] = param.ds_tensor.data.clone()
            self.remove_partition_and_release_buffers([param])
        return values

    def restore_partitions(self, params) -> None:
        """After a checkpoint load pointed these partitions at loaded values (in scratch memory):
        store each where it lives, NVMe or the CPU tier."""
        streamed = []
        for param in params:
            loaded = param.ds_tensor.data
            resident = self._resident.get(param.ds_id)
            if resident is not None:
                target = self._partition_view(resident, param)
            elif param.ds_id in self._packed:
                target = self._packed[param.ds_id]
            else:
                streamed.append((param, loaded))
                continue
            target.copy_(loaded.view(-1))
            param.ds_tensor.data = target.data
        if streamed:
            self.swap_out_partitioned_params([p for p, _ in streamed], [t.view(-1) for _, t in streamed])
            self.synchronize_writes()
            for param, _ in streamed:
                param.ds_tensor.data = self.invalid_buffer.data

    def pool_stats(self) -> PoolStats:
        return self.pool.stats()

    # --- internals -------------------------------------------------------------------------------

    def _ensure_training_carving(self) -> None:
        """After zero.Init has written every partition: carve the warm-up classes."""
        if self._init_carving:
            self.synchronize_writes()
            self.pool.recarve(warmup_carving(self.partition_bytes.values(), self.capacity,
                                             self.max_classes, self.alignment))
            self._init_carving = False

    def _acquire(self, param_id: int, spill: bool = False) -> PooledBuffer:
        """A buffer for a partition; the last write-back's buffers return when its writes end."""
        nbytes = self.partition_bytes[param_id]
        try:
            try:
                return self.pool.acquire(nbytes, spill)  # its class holds the aligned file bytes too
            except PoolExhaustedError:
                self.synchronize_writes()
                return self.pool.acquire(nbytes, spill)
        except ValueError as err:  # no class large enough
            raise TencacheConfigError(
                f"tencache.cpu_budget = {self.capacity} bytes cannot stage parameter {param_id} "
                f"({nbytes} bytes with alignment): {err}; raise cpu_budget") from None

    def _partition_view(self, buffer: PooledBuffer, param) -> torch.Tensor:
        """The partition's bytes at the start of a pooled buffer, as the parameter's dtype."""
        return buffer.view[:self.partition_bytes[param.ds_id]].view(param.dtype)

    def _read_done(self, param) -> None:
        buffer = self._staged[param.ds_id]
        self.files.verify_read(param.ds_id, buffer.view[:self.partition_bytes[param.ds_id]])
        param.ds_tensor.data = self._partition_view(buffer, param).data
        param.ds_tensor.status = PartitionedParamStatus.AVAILABLE

    def _write(self, param_id: int, buffer: PooledBuffer, free_after: bool) -> None:
        nbytes = self.partition_bytes[param_id]
        path = self.files.path(param_id)
        self.writes.wait_for(path)  # the file's previous write first
        view = buffer.view[:file_bytes_for(nbytes, self.alignment)]
        self.files.ensure_space(view.numel())
        self.files.wrote(param_id, buffer.view[:nbytes], view.numel())
        self.writes.submit(path, lambda aio: aio.async_pwrite(view, path, 0), path,
                           functools.partial(self.pool.release, buffer) if free_after
                           else lambda: None)
        self.bytes_written += view.numel()


class TieredOptimizerSwapper(PartitionedOptimizerSwapper):
    """ZeRO-Infinity's optimizer-state swapper, with a CPU tier, prefetch and checksummed files.

    ZeRO-3 with ``offload_optimizer.device: "nvme"`` reads every sub-group's fp32 master weights,
    Adam moments and gradient from NVMe for its optimizer step and writes them back, every step.
    What differs here from upstream's ``PartitionedOptimizerSwapper``, and why:

    - **A CPU tier.** The sub-groups :func:`~ds_tencache.tiers.optimizer_cpu_subgroups` picks under
      ``tencache.optimizer_cpu_budget`` are reported not swappable, so ZeRO-3 keeps their states
      in host memory, as with ``offload_optimizer.device: "cpu"``: no NVMe traffic for them.
      Upstream streams every sub-group whatever host memory is free.
    - **Prefetch.** While one sub-group's step runs, the next streamed sub-group's states are being
      read (ZeRO-3 names it in ``async_parameter``, which upstream's partitioned swapper ignores:
      it reads each sub-group only when asked and waits). Needs free staging buffers:
      ``offload_optimizer.buffer_count`` of at least twice a sub-group's tensors plus gradient.
    - **Writes stay in flight.** A sub-group's write-back is issued and the step goes on; its
      buffers return when the writes complete (upstream waits for every write-back).
    - **Integrity.** State and gradient files get a checksum on write, verified on read; a
      missing, truncated or corrupt file raises :class:`SwapFileError` naming it.

    The staging buffers (``buffer_count`` x the largest sub-group, pinned) and the gradient
    swap-out during backward stay upstream's.
    """

    def __init__(self, swap_config, aio_config, base_folder, optimizer, largest_numel, device, dtype,
                 timers, *, folder: Path, verify: bool, cpu_budget: int) -> None:
        super().__init__(swap_config, aio_config, base_folder, optimizer, largest_numel, device,
                         dtype, timers)
        self.files = SwapFiles(folder, verify=verify)
        self.swap_folder = str(self.files.folder)  # upstream names every state file inside it
        self.reads, self.writes = _io_streams(aio_config, "read"), _io_streams(aio_config, "write")
        self.cpu_budget = cpu_budget
        self.cpu_subgroups: frozenset[int] | None = None  # decided when ZeRO-3 first asks
        self._prefetched: dict[str, list[torch.Tensor]] = {}  # param id -> buffers being read
        self._retiring: list[list[torch.Tensor]] = []  # buffers whose write-back is in flight
        self.bytes_read = self.bytes_written = 0
        self.prefetched_reads = 0  # sub-group reads that were in flight before they were needed
        self.verified_gradient_reads = 0
        atexit.register(_drain_streams, weakref.ref(self))

    def keeps_in_cpu(self, sub_group_id: int, numels: list[int]) -> bool:
        """Whether a sub-group is in the CPU tier; decided at ZeRO-3's first question, the first
        moment every sub-group's size is known (it asks before creating any fp32 partition)."""
        if self.cpu_subgroups is None:
            self.cpu_subgroups = optimizer_cpu_subgroups(
                numels, self.cpu_budget, lambda numel: self.is_swappable_tensor(numel=numel))
        return sub_group_id in self.cpu_subgroups

    # --- reads -------------------------------------------------------------------------------

    def swap_in_optimizer_state(self, parameter, async_parameter=None) -> None:
        swap_info = self._get_param_swap_info(parameter)
        if swap_info is None:
            return
        self._flush_gradient_swapper(self.gradient_swapper)
        buffers = self._prefetched.pop(swap_info.param_id, None)
        if buffers is None:
            buffers = self._allocate(swap_info)
            self._read_states(swap_info, buffers)
        else:
            self.prefetched_reads += 1
        for path in swap_info.get_swap_paths():
            self.reads.wait_for(path)
        swap_info.swap_buffers = buffers.copy()
        swap_info.set_swap_buffers(buffers[:swap_info.num_tensors()],
                                   self._io_aligned_numel(swap_info.numel()))
        if swap_info.has_gradients():
            self._swap_in_gradients(aio_handle=self.aio_handle, parameter=parameter,
                                    dest_buffer=buffers[-1])
        if async_parameter is not None:
            # A sub-group without states yet gets them from this step, outside the staging
            # buffers: its write-back then needs one free buffer to stage them through.
            self._prefetch(async_parameter, spare=0 if swap_info.has_state_tensors else 1)

    def _prefetch(self, parameter, spare: int) -> None:
        """Start reading a sub-group's states, if buffers for it and ``spare`` more are free."""
        swap_info = self._get_param_swap_info(parameter)
        if swap_info is None or swap_info.param_id in self._prefetched:
            return
        buffers = self._allocate(swap_info, spare)
        if buffers is not None:
            self._prefetched[swap_info.param_id] = buffers
            self._read_states(swap_info, buffers)

    def _allocate(self, swap_info, spare: int | None = None) -> list[torch.Tensor] | None:
        """Staging buffers for a sub-group's tensors and gradient; None (a prefetch, which gives
        ``spare``) when fewer than needed are free, an error when a read must happen now."""
        count = swap_info.num_tensors() + (1 if swap_info.has_gradients() else 0)
        numel = self._io_aligned_numel(swap_info.numel())
        required = spare is None
        for attempt in range(2):
            if len(self.swap_buffer_manager.free_buffer_index) >= count + (spare or 0):
                return self.swap_buffer_manager.allocate(num_elems=numel, count=count,
                                                         dtype=swap_info.dtype())
            if attempt == 0:
                self._reclaim()
        if required:
            raise TencacheConfigError(
                f"offload_optimizer.buffer_count = {self.swap_config.buffer_count} is too small: "
                f"an optimizer sub-group needs {count} staging buffers")
        return None

    def _read_states(self, swap_info, buffers: list[torch.Tensor]) -> None:
        numel = self._io_aligned_numel(swap_info.numel())
        self.reads.new_batch()
        for path, buffer in zip(swap_info.get_swap_paths(), buffers):
            key = _file_key(path)
            self.writes.wait_for(path)  # a read must see the last write of its file
            _check_readable(self, key)
            view = buffer.narrow(0, 0, numel)
            self.reads.submit(path, lambda aio, view=view, path=path: aio.async_pread(view, path, 0),
                              path, functools.partial(self.files.verify_read, key,
                                                      buffer.narrow(0, 0, swap_info.numel())))
            self.bytes_read += view.numel() * view.element_size()

    def _swap_in_pinned_gradients(self, aio_handle, parameter, gradient_tensor) -> None:
        swap_info = self.swap_params_info[OptimizerSwapper.parameter_id(parameter)]
        fragments = list(swap_info.swapped_gradients.values())
        for fragment in fragments:
            _check_readable(self, _file_key(fragment.path))
        super()._swap_in_pinned_gradients(aio_handle, parameter, gradient_tensor)
        for fragment in fragments:
            self.files.verify_read(_file_key(fragment.path),
                                   gradient_tensor.narrow(0, fragment.offset, fragment.length))
        self.verified_gradient_reads += len(fragments) if self.files.verify else 0

    # --- writes ------------------------------------------------------------------------------

    def _swap_out_optimizer_state(self, swap_info) -> None:
        tensors, paths = swap_info.get_swap_buffers_and_paths(True)
        self.writes.new_batch()
        for tensor, path in zip(tensors, paths):
            self._write(tensor, path, swap_info.numel())
        unpinned, unpinned_paths = swap_info.get_swap_buffers_and_paths(False)
        if unpinned:  # Adam's states after its first step
            self.write_states(unpinned, unpinned_paths)

    def _swap_out_unpinned_tensors(self, aio_handle, unpinned_tensors, dest_paths,
                                   pinned_buffers) -> None:
        """Tensors outside the staging buffers (the first master weights, Adam's new states),
        copied into ``pinned_buffers`` in turn and written, as upstream does, with checksums."""
        if not pinned_buffers:
            raise TencacheConfigError(
                f"offload_optimizer.buffer_count = {self.swap_config.buffer_count} leaves no "
                "staging buffer for the optimizer states' first write")
        for start in range(0, len(unpinned_tensors), len(pinned_buffers)):
            self.writes.new_batch()
            for tensor, path, buffer in zip(unpinned_tensors[start:], dest_paths[start:],
                                            pinned_buffers):
                buffer.narrow(0, 0, tensor.numel()).copy_(tensor.view(-1))
                self._write(buffer, path, tensor.numel())
            self.writes.wait_all()

    def _write(self, buffer: torch.Tensor, path: str, numel: int) -> None:
        key = _file_key(path)
        self.writes.wait_for(path)  # the file's previous write first
        view = buffer.narrow(0, 0, self._io_aligned_numel(numel))  # survives release_memory()
        nbytes = view.numel() * view.element_size()
        self.files.ensure_space(nbytes)
        self.files.wrote(key, buffer.narrow(0, 0, numel), nbytes)
        self.writes.submit(path, lambda aio: aio.async_pwrite(view, path, 0), path, lambda: None)
        self.bytes_written += nbytes

    def swap_out_gradients(self, parameter, gradient_offsets, gradient_tensors) -> None:
        super().swap_out_gradients(parameter, gradient_offsets, gradient_tensors)
        swap_info = self.swap_params_info.get(OptimizerSwapper.parameter_id(parameter))
        if swap_info is None:
            return
        # The same split upstream made: each swappable fragment went to its own file.
        tensors, offsets = self._adjust_for_misaligned_lengths(tensors=gradient_tensors,
                                                               offsets=gradient_offsets)
        for tensor, offset in zip(tensors, offsets):
            if self.is_swappable_tensor(tensor=tensor):
                path = swap_info.swapped_gradients[offset].path
                self.files.wrote(_file_key(path), tensor,
                                 tensor.numel() * tensor.element_size())

    def release_swap_buffers(self, parameter) -> None:
        """Upstream frees the buffers at once; here they return when their writes complete."""
        swap_info = self._get_param_swap_info(parameter)
        if swap_info is None:
            return
        swap_info.release_memory()
        self._retiring.append(swap_info.swap_buffers)
        swap_info.swap_buffers = []

    def _reclaim(self) -> None:
        """Complete the write-backs in flight and take their buffers back."""
        self.writes.wait_all()
        for buffers in self._retiring:
            self.swap_buffer_manager.free(buffers)
        self._retiring = []

    # --- checkpoints ---------------------------------------------------------------------------

    def materialize(self, parameters: list[torch.Tensor]) -> list[torch.Tensor]:
        """Give the streamed sub-groups' master weights and states their values in plain memory,
        for a checkpoint to save (upstream saves the empty placeholders of swapped tensors)."""
        held = []
        for parameter in parameters:
            self.swap_in_optimizer_state(parameter)
            swap_info = self._get_param_swap_info(parameter)
            for tensor in swap_info.get_compute_tensors():
                tensor.data = tensor.data.clone()
                held.append(tensor)
            self.swap_buffer_manager.free(swap_info.swap_buffers)
            swap_info.swap_buffers = []
            parameter.grad = None  # it pointed into a staging buffer
        return held

    def write_states(self, tensors: list[torch.Tensor], paths: list[str]) -> None:
        """Write tensors held outside the staging buffers (Adam's new states, a checkpoint's
        values) into these state files, with checksums, staged through the free buffers; the
        writes are complete on return."""
        self._reclaim()
        buffers = self.swap_buffer_manager.allocate_all(num_elems=self.largest_numel, dtype=self.dtype)
        try:
            self._swap_out_unpinned_tensors(self.aio_handle, tensors, paths, buffers)
        finally:
            self.swap_buffer_manager.free(buffers)

    def pre_backward(self) -> None:
        # The gradient swap-out takes every free buffer: the last step's write-backs end first.
        self._reclaim()
        super().pre_backward()

    def purge_state(self) -> None:
        self._reclaim()
        super().purge_state()


def _file_key(path: str) -> str:
    """The :class:`SwapFiles` key of a file upstream named inside the tier's folder."""
    return Path(path).name.removesuffix(".swp")


def _io_streams(aio_config: Mapping[str, Any], what: str) -> IOStreams:
    """``aio.queue_depth`` handles of DeepSpeed's async I/O op, used as independent streams: that
    many batches of reads (or writes) may be in flight at once."""
    handle = AsyncIOBuilder().load(verbose=False).aio_handle
    return IOStreams([handle(block_size=aio_config[aio_keys.AIO_BLOCK_SIZE],
                             queue_depth=aio_config[aio_keys.AIO_QUEUE_DEPTH],
                             single_submit=aio_config[aio_keys.AIO_SINGLE_SUBMIT],
                             overlap_events=aio_config[aio_keys.AIO_OVERLAP_EVENTS],
                             intra_op_parallelism=aio_config[aio_keys.AIO_INTRA_OP_PARALLELISM])
                      for _ in range(aio_config[aio_keys.AIO_QUEUE_DEPTH])], what)


def _check_readable(store: TieredParameterSwapper | TieredOptimizerSwapper, key) -> None:
    """Before a read is issued: DeepSpeed's aio aborts the process on a file shorter than the read
    (an assertion), which would hide which file and why; the I/O in flight ends first."""
    try:
        store.files.check_readable(key)
    except SwapFileError:
        store.reads.drain()
        store.writes.drain()
        raise


def _drain_streams(ref: weakref.ref) -> None:
    store = ref()
    if store is not None:
        store.reads.wait_all()
        store.writes.wait_all()


def _swapper_factory(ds_config: DeepSpeedConfig, model_dtype: torch.dtype):
    """What ``zero.Init`` calls by the upstream swapper's name: ours when the config asks for it."""
    if ds_config is not None and nvme_tier_active(ds_config._param_dict):
        return TieredParameterSwapper(ds_config, model_dtype)
    return AsyncPartitionedParameterSwapper(ds_config, model_dtype)
