"""The only module that touches DeepSpeed internals. Written against deepspeed==0.19.8.

It translates; :mod:`ds_tencache.controller` decides. Three bindings:

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

Name-mangled upstream members used here (``_PartitionedParameterCoordinator__*``) are listed in
``UPSTREAM_MEMBERS``; ``tests/integration/test_tencache_upstream.py`` fails loudly when an upgrade
renames one.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

import torch
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.runtime.zero.partitioned_param_coordinator import (PartitionedParameterCoordinator,
                                                                   iter_params)
from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
from deepspeed.utils import z3_leaf_module

from ds_tencache.config import TencacheConfig, from_ds_config
from ds_tencache.controller import CacheController, Mode, PlanInputs
from ds_tencache.metrics import MetricsReporter
from ds_tencache.profile import Phase, TensorInfo

DEEPSPEED_VERSION = "0.19.8"
_MANGLED = "_PartitionedParameterCoordinator__"
# Private upstream members this adapter reads or overrides; checked by a test on upgrade.
UPSTREAM_MEMBERS = ("all_gather_params", "release_param", "params_to_release", "prefetch_bucket_sz",
                    "max_n_available_params")

logger = logging.getLogger("ds_tencache")


class TencacheCoordinator(PartitionedParameterCoordinator):
    """ZeRO-3's parameter coordinator, driven by a :class:`CacheController` after warm-up."""

    controller: CacheController
    offload_device: str

    @classmethod
    def adopt(cls, stock: PartitionedParameterCoordinator, controller: CacheController,
              offload_device: str) -> TencacheCoordinator:
        """Take over a freshly built stock coordinator's state (streams, registry, limits).

        Copying the state, rather than calling the constructor again, keeps this adapter
        independent of the constructor's long and changing argument list.
        """
        coordinator = cls.__new__(cls)
        coordinator.__dict__.update(stock.__dict__)
        coordinator.controller = controller
        coordinator.offload_device = offload_device
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
        self._apply_mode()

    def fetch_sub_module(self, current_submodule: torch.nn.Module, forward: bool) -> None:
        name, params, ids = self._module_info(current_submodule)
        start = time.perf_counter()
        group = self.controller.begin_group(
            name, Phase.FORWARD if forward else Phase.BACKWARD, ids,
            [p.ds_status != ZeroParamStatus.NOT_AVAILABLE for p in params], start)
        self._apply_mode()  # the controller may just have abandoned its plan
        self._release(group.evict)
        super().fetch_sub_module(current_submodule, forward)
        end = time.perf_counter()
        prefetch = self.controller.end_group(end, end - start)
        if prefetch:
            missing = {param for param in map(self._params_by_id.__getitem__, prefetch)
                       if param.ds_status == ZeroParamStatus.NOT_AVAILABLE}
            if missing:
                getattr(self, _MANGLED + "all_gather_params")(missing, forward)

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
        """Planned: nothing is released after use; the plan's evictions decide."""
        if self.controller.mode is Mode.PLANNED:
            return set()
        return PartitionedParameterCoordinator._PartitionedParameterCoordinator__params_to_release(
            self, submodule, step_id)

    def _PartitionedParameterCoordinator__all_gather_params(self, params, forward):
        """Every all-gather, stock or planned, is counted with the bytes it really moves."""
        missing = sum(_nbytes(p) for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE)
        start = time.perf_counter()
        PartitionedParameterCoordinator._PartitionedParameterCoordinator__all_gather_params(
            self, params, forward)
        self.controller.record_gather(missing, time.perf_counter() - start,
                                      f"{self.offload_device}_to_device")

    # --- helpers --------------------------------------------------------------------------------

    def _release(self, param_ids) -> None:
        release = getattr(self, _MANGLED + "release_param")
        for param_id in param_ids:
            param = self._params_by_id[param_id]
            if param.ds_status == ZeroParamStatus.AVAILABLE and not param.ds_active_sub_modules:
                release(param)

    def _apply_mode(self) -> None:
        """Stock prefetching runs only while profiling; the plan prefetches by itself."""
        if self.controller.mode is not self._mode:
            self._mode = self.controller.mode
            bucket = 0 if self._mode is Mode.PLANNED else self._stock_prefetch_bucket
            setattr(self, _MANGLED + "prefetch_bucket_sz", bucket)


def _nbytes(param: torch.nn.Parameter) -> int:
    return param.ds_numel * param.dtype.itemsize


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
                     module: torch.nn.Module) -> CacheController:
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
    return CacheController(config.warmup_steps, budget, reporter, lookahead_bytes=lookahead,
                           profile_path=config.profile_path if rank0 else None)


def tencache_controller(engine: Any) -> CacheController | None:
    """The controller of a DeepSpeed engine, or None when tencache is not active on it."""
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    coordinator = getattr(offload, "param_coordinator", None)
    return coordinator.controller if isinstance(coordinator, TencacheCoordinator) else None


# --- activation ----------------------------------------------------------------------------------

def _wrap_initialize_ds_offload(original):
    @functools.wraps(original)
    def initialize_ds_offload(self, *args, **kwargs):
        offload = original(self, *args, **kwargs)
        ds_config = kwargs.get("ds_config")
        config = from_ds_config(ds_config) if isinstance(ds_config, Mapping) else None
        if config is not None:
            stock = offload.param_coordinator
            device = str(getattr(offload.offload_device, "value", offload.offload_device) or "none")
            offload.param_coordinator = TencacheCoordinator.adopt(
                stock, build_controller(config, stock, offload.module), device)
            logger.info("tencache: active (warm-up %d steps, device budget %s)",
                        config.warmup_steps, config.device_budget)
            if config.tier_settings_given() or device == "nvme":
                logger.warning(
                    "tencache: this version caches gathered parameters on the device only; the "
                    "pinned-pool/NVMe tier is not implemented yet, so %s stay with stock "
                    "ZeRO-Infinity", ", ".join(config.tier_settings_given()) or "NVMe offload")
        return offload

    initialize_ds_offload.__tencache_wrapped__ = True
    return initialize_ds_offload


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
    if not getattr(DeepSpeedConfig.__init__, "__tencache_wrapped__", False):
        DeepSpeedConfig.__init__ = _wrap_config_init(DeepSpeedConfig.__init__)
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
