"""What torchtitan 0.3.0 needs to run on CPU with gloo, and on torch 2.13. Nothing else.

torchtitan targets CUDA and the torch it was released with. Each function below mends one
measured gap (see ../shared/FINDINGS.md) and says why; `apply()` is idempotent and is called
before the trainer is built, on every device, so CPU runs and GPU runs share one code path.
"""

from __future__ import annotations

import platform
import resource
from datetime import timedelta
from types import SimpleNamespace

import torch
import torch.distributed as dist

_applied = False


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
