"""Fails loudly when a DeepSpeed upgrade changes what ds_tencache/deepspeed_hooks.py relies on."""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest

pytestmark = pytest.mark.integration


def _parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_pinned_deepspeed_version():
    import deepspeed

    from ds_tencache.deepspeed_hooks import DEEPSPEED_VERSION

    assert deepspeed.__version__ == DEEPSPEED_VERSION, (
        "ds_tencache's adapter was written against DeepSpeed "
        f"{DEEPSPEED_VERSION}; re-read the coordinator before pinning {deepspeed.__version__}")


def _method_arguments(cls) -> dict[str, list[str]]:
    """Argument names of each method as written (the decorators upstream hide the signatures)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    return {node.name: [a.arg for a in node.args.args]
            for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


def test_coordinator_methods_we_override_keep_their_signatures():
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    methods = _method_arguments(PartitionedParameterCoordinator)
    assert methods["fetch_sub_module"] == ["self", "current_submodule", "forward"]
    assert methods["release_sub_module"] == ["self", "submodule", "forward"]
    assert methods["reset_step"] == ["self"]
    assert methods["__all_gather_params"] == ["self", "params", "forward"]
    assert methods["__release_param"] == ["self", "param", "free_data"]
    assert methods["__params_to_release"] == ["self", "submodule_to_release", "step_id"]


def test_private_state_we_read_still_exists():
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as C

    from ds_tencache.deepspeed_hooks import UPSTREAM_MEMBERS

    source = inspect.getsource(C)
    for member in UPSTREAM_MEMBERS:
        assert f"self.__{member}" in source or f"def __{member}" in source, member


def test_activation_points_still_exist():
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    original = inspect.unwrap(DeepSpeedZeroOptimizer_Stage3.initialize_ds_offload)
    assert "ds_config" in _parameters(original)
    # Every ZeRO-3 hook must look the coordinator up at call time, or swapping it is not enough.
    assert "return self.param_coordinator" in inspect.getsource(DeepSpeedZeRoOffload.get_param_coordinator)
    hooks = inspect.getsource(DeepSpeedZeRoOffload)
    assert "self.param_coordinator.fetch_sub_module" not in hooks
    assert hooks.count("self.get_param_coordinator()") >= 4


def test_swapper_interface_we_replace_keeps_its_signatures():
    """TieredParameterSwapper overrides each upstream method ZeRO-3 calls, with the same arguments,
    and zero.Init still builds its swapper by the name the adapter binds."""
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import AsyncPartitionedParameterSwapper
    from deepspeed.runtime.zero import partition_parameters

    from ds_tencache.deepspeed_hooks import SWAPPER_METHODS, TieredParameterSwapper

    upstream = _method_arguments(AsyncPartitionedParameterSwapper)
    ours = _method_arguments(TieredParameterSwapper)
    assert _parameters(AsyncPartitionedParameterSwapper.__init__) == ["self", "ds_config", "model_dtype"]
    for method in SWAPPER_METHODS:
        assert method in upstream, f"upstream swapper has no {method} any more"
        assert ours[method][:len(upstream[method])] == upstream[method], method
    init_source = inspect.getsource(partition_parameters.Init.__init__)
    assert "AsyncPartitionedParameterSwapper(_ds_config, self.dtype)" in init_source


def test_checkpoint_restore_point_still_exists():
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    methods = _method_arguments(DeepSpeedZeroOptimizer_Stage3)
    assert methods["_rigid_load_state_dict"] == ["self", "state_dict", "load_optimizer_states"]
    source = inspect.getsource(DeepSpeedZeroOptimizer_Stage3._rigid_load_state_dict)
    assert "fp16_param.data.copy_(fp32_param.data)" in source  # the step that needs a host buffer


def test_optimizer_swapper_we_extend_keeps_its_shape():
    """TieredOptimizerSwapper overrides these upstream methods with the same arguments, reads the
    buffer manager's members, and ZeRO-3 still builds its swapper where the adapter wraps."""
    from deepspeed.runtime.swap_tensor.optimizer_utils import OptimizerSwapper
    from deepspeed.runtime.swap_tensor.partitioned_optimizer_swapper import PartitionedOptimizerSwapper
    from deepspeed.runtime.swap_tensor.utils import SwapBufferManager
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    from ds_tencache.deepspeed_hooks import (BUFFER_MANAGER_MEMBERS, OPTIMIZER_SWAPPER_METHODS,
                                             TieredOptimizerSwapper)

    upstream = {**_method_arguments(OptimizerSwapper), **_method_arguments(PartitionedOptimizerSwapper)}
    ours = _method_arguments(TieredOptimizerSwapper)
    for method in OPTIMIZER_SWAPPER_METHODS:
        assert method in upstream, f"upstream optimizer swapper has no {method} any more"
        assert ours[method] == upstream[method], method
    assert _parameters(PartitionedOptimizerSwapper.__init__) == [
        "self", "swap_config", "aio_config", "base_folder", "optimizer", "largest_numel", "device",
        "dtype", "timers"]
    manager = inspect.getsource(SwapBufferManager.__init__)
    for member in BUFFER_MANAGER_MEMBERS:
        assert f"self.{member} =" in manager, member
    stage3 = _method_arguments(DeepSpeedZeroOptimizer_Stage3)
    assert stage3["_configure_tensor_swapping"] == ["self", "offload_optimizer_config", "aio_config"]
    assert stage3["_swappable_optimizer_subgroup"] == ["self", "sub_group_id"]
    configure = inspect.getsource(inspect.unwrap(DeepSpeedZeroOptimizer_Stage3._configure_tensor_swapping))
    assert "self.optimizer_swapper = swapper_type(" in configure
    # The CPU tier relies on ZeRO-3 asking this one method whether a sub-group is swapped.
    init_source = inspect.getsource(DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions)
    assert "if self._swappable_optimizer_subgroup(i):" in init_source


def test_optimizer_checkpoint_points_still_exist():
    """The optimizer tier's checkpoint path: the engine's NVMe switch, the state-file names and
    the order in which torch numbers the sub-groups' states."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.swap_tensor.optimizer_utils import OptimizerSwapper
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    stage3 = _method_arguments(DeepSpeedZeroOptimizer_Stage3)
    assert stage3["_rigid_state_dict"] == ["self"]
    load = inspect.getsource(DeepSpeedEngine.load_checkpoint)
    assert "if load_zero_checkpoint and not self.zero_nvme_offload_optimizer():" in load
    assert "getattr(self.optimizer, \"swap_optimizer\", False)" in inspect.getsource(
        inspect.unwrap(DeepSpeedEngine.zero_nvme_offload_optimizer))
    assert "value.ds_id = state_name + '-' + parameter.ds_id" in inspect.getsource(
        OptimizerSwapper._get_state_tensors)
    assert "self.optimizer.param_groups[param_group_id]['params'].append(" in inspect.getsource(
        DeepSpeedZeroOptimizer_Stage3._set_fp32_optimizer_param_groups)
