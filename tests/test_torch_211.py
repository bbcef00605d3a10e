"""torch 2.11 (the torch of CUDA images in use today) through unimm.titan.compat.

The suite runs on one torch. torch 2.11 is simulated: in a child process by deleting
DataParallelMeshDims from torch.distributed.fsdp before unimm (and so torchtitan) is imported,
and for expert parallelism by switching the capability flag off.
"""

import dataclasses
import json
import subprocess
import sys

import pytest
import torch.distributed.fsdp as fsdp

from unimm.errors import ConfigError
from unimm.titan import compat

CHILD = """
import dataclasses, json
import pytest
import torch.distributed.fsdp as fsdp
import torch.distributed.fsdp._fully_shard as inner
real = getattr(fsdp, "DataParallelMeshDims", None)
if real is not None:  # torch >= 2.12: take it away (on torch 2.11 it never was there)
    del fsdp.DataParallelMeshDims, inner.DataParallelMeshDims
import unimm.titan.trainer  # imports torchtitan.trainer and torchtitan.distributed.fsdp
import torchtitan.distributed.full_dtensor as full_dtensor
from unimm.titan import compat
stand_in = fsdp.DataParallelMeshDims
print(json.dumps(dict(
    stand_in=stand_in is not real, flag=compat.TORCH_FSDP_HAS_MESH_DIMS,
    seen_by_torchtitan=full_dtensor.DataParallelMeshDims is stand_in,
    fields=[f.name for f in dataclasses.fields(stand_in)],
    value=repr(stand_in(shard="fsdp", replicate="dp_replicate")))))
"""


def test_torchtitan_imports_without_the_torch_2_12_type():
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["stand_in"] and result["seen_by_torchtitan"] and result["flag"] is False
    # torch's fields, so torchtitan's keyword constructions of it would still work
    assert result["fields"] == ["shard", "replicate"]
    if compat.TORCH_FSDP_HAS_MESH_DIMS:
        assert result["fields"] == [f.name for f in dataclasses.fields(fsdp.DataParallelMeshDims)]
    assert "shard='fsdp'" in result["value"]


@pytest.mark.skipif(not compat.TORCH_FSDP_HAS_MESH_DIMS, reason="torch < 2.12: the stand-in is in place (test above)")
def test_nothing_changes_where_torch_has_the_type():
    from torch.distributed.fsdp._fully_shard import _fsdp_api

    assert compat.TORCH_FSDP_HAS_MESH_DIMS and compat.TORCH_FSDP_PER_PARAM_MESH
    assert fsdp.DataParallelMeshDims is _fsdp_api.DataParallelMeshDims  # torch's own, not the stand-in
    assert compat.expert_parallel_error(8) is None


def test_expert_parallelism_is_refused_before_launch_on_torch_2_11(monkeypatch):
    from unimm.titan.config_checks import check_config
    from unimm.titan.launch import JobShape, load_recipe

    monkeypatch.setattr(compat, "TORCH_FSDP_PER_PARAM_MESH", False)
    config = load_recipe("moe_e1008", job=JobShape(world_size=64, gpus_per_node=8))
    assert config.parallelism.expert_parallel_degree == 8
    with pytest.raises(ConfigError, match=r"--parallelism.expert_parallel_degree=8 needs torch >= 2.12"):
        check_config(config, 64)
    single = load_recipe("moe_e1008", job=JobShape(world_size=1, gpus_per_node=1))
    assert check_config(single, 1) == []  # no expert parallelism: nothing to refuse
