"""What torchtitan 0.3.0 needs to run on CPU with gloo, and on torch 2.11 to 2.13. Nothing else.

torchtitan targets CUDA and the torch it was released with. Each function below mends one
measured gap (see ../shared/FINDINGS.md) and says why; `apply()` is idempotent and is called
before the trainer is built, on every device, so CPU runs and GPU runs share one code path.

torch 2.11 (the torch of CUDA images in use today) needs one mend at import time, before
torchtitan loads, so `unimm/__init__.py` imports this module first: torchtitan 0.3.0 imports
`torch.distributed.fsdp.DataParallelMeshDims`, which torch adds in 2.12 (for FSDP over a
full-DTensor mesh: which axes shard and which replicate), and without it does not import at all.
unimm runs FSDP only with `--parallelism.spmd_backend partial_dtensor` (parallelize.py refuses
the others), where torchtitan never builds or passes one, so a stand-in type is enough; were
one ever passed to torch 2.11's `fully_shard`, torch itself would reject the argument.

And one limit no mend lifts: expert parallelism. torchtitan 0.3.0 shards a block's routed
experts and its dense weights over different meshes through FSDP's per-parameter placement
(`ShardPlacementResult` with a mesh), which torch adds in 2.12, and its all-to-all dispatcher
calls a 2.12 function. On torch < 2.12 an expert-parallel layout is refused before launch
(config_checks) and in parallelize, with `expert_parallel_error`'s message.
"""

from __future__ import annotations

import platform
import resource
from dataclasses import dataclass
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.distributed.fsdp as _fsdp

_applied = False

TORCH_FSDP_HAS_MESH_DIMS = hasattr(_fsdp, "DataParallelMeshDims")
try:
    from torch.distributed.fsdp._fully_shard._fsdp_common import ShardPlacementResult  # noqa: F401

    TORCH_FSDP_PER_PARAM_MESH = True
except ImportError:
    TORCH_FSDP_PER_PARAM_MESH = False

if not TORCH_FSDP_HAS_MESH_DIMS:

    @dataclass(frozen=True)
    class DataParallelMeshDims:
        """Import-time stand-in for torch >= 2.12's type of the same name (see the module doc)."""

        shard: str | tuple[str, ...] | None = None
        replicate: str | tuple[str, ...] | None = None

    DataParallelMeshDims.__module__ = "torch.distributed.fsdp"
    _fsdp.DataParallelMeshDims = DataParallelMeshDims


def expert_parallel_error(ep_degree: int) -> str | None:
    """Why this torch cannot run expert parallelism of `ep_degree`, or None where it can."""
    if ep_degree <= 1 or TORCH_FSDP_PER_PARAM_MESH:
        return None
    return (
        f"--parallelism.expert_parallel_degree={ep_degree} needs torch >= 2.12 (this is {torch.__version__}): "
        "torchtitan 0.3.0 shards experts and dense weights on different meshes through FSDP's "
        "per-parameter placement, which torch adds in 2.12. Use expert_parallel_degree 1 (experts "
        "sharded by FSDP like every other weight) or a newer torch."
    )


class _CpuDeviceModule:
    """torch.cpu plus the device-module functions torchtitan calls unconditionally.

    torch.cpu has no memory statistics, names or properties, and its current_device()
    returns a string where torch.distributed.barrier wants an int. Peak memory on CPU is
    reported as the process's peak resident set size, which is what a person would check.
    """

    def __getattr__(self, name):
        return getattr(torch.cpu, name)

    @staticmethod
    def current_device() -> int:
        return 0

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def set_device(device) -> None:
        pass

    @staticmethod
    def get_device_name(device=None) -> str:
        return f"cpu ({platform.processor() or platform.machine()})"

    @staticmethod
    def get_device_properties(device=None):
        import os

        return SimpleNamespace(
            name="cpu", total_memory=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        )

    @staticmethod
    def memory_stats(device=None) -> dict:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"active_bytes.all.peak": peak, "reserved_bytes.all.peak": peak}

    @staticmethod
    def reset_peak_memory_stats(device=None) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass


def _use_cpu_when_no_accelerator() -> None:
    # torchtitan falls back to "cuda" when no accelerator exists and binds the device
    # type/module by value in several modules at import time: rebind them all.
    if torch.cuda.is_available() or torch.accelerator.is_available():
        return
    import torchtitan.components.metrics as metrics
    import torchtitan.distributed.parallel_dims as parallel_dims
    import torchtitan.distributed.utils as dist_utils
    import torchtitan.models.common.token_dispatcher as token_dispatcher
    import torchtitan.tools.utils as tools_utils

    cpu = _CpuDeviceModule()
    for module in (tools_utils, metrics, dist_utils, token_dispatcher):
        module.device_type, module.device_module = "cpu", cpu
    parallel_dims.device_type = "cpu"


def _set_pg_timeout_on_torch_without_public_api() -> None:
    # torchtitan calls torch.distributed.set_timeout after the first step; torch 2.13 only
    # has the private _set_pg_timeout with the same meaning.
    if hasattr(dist, "set_timeout"):
        return
    from torch.distributed.distributed_c10d import _set_pg_timeout

    def set_timeout(timeout: timedelta, group=None) -> None:
        _set_pg_timeout(timeout, group)

    dist.set_timeout = set_timeout


def apply() -> None:
    global _applied
    if _applied:
        return
    _use_cpu_when_no_accelerator()
    _set_pg_timeout_on_torch_without_public_api()
    _applied = True


def force_sum_reduction_on_gloo(model: torch.nn.Module) -> None:
    """FSDP2 reduce-scatters with PREMUL_SUM, which gloo lacks. Summing (and dividing
    ourselves, as torchtitan already does by disabling FSDP's gradient division) is the
    same arithmetic."""
    from torch.distributed.fsdp import FSDPModule

    if not dist.is_initialized() or dist.get_backend() != "gloo":
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
