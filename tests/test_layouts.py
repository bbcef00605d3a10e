"""Parallel layouts of the paper recipes, derived from the job's shape, and the float8 option."""

from importlib.util import find_spec

import pytest
from torchtitan.distributed import ParallelDims

from unimm.errors import ConfigError
from unimm.titan import compat
from unimm.titan.config_checks import check_config
from unimm.titan.launch import JobShape, expert_parallel_degree, hsdp_degrees, job_shape, load_recipe


def test_degrees_from_the_job_shape():
    assert hsdp_degrees(JobShape(world_size=128, gpus_per_node=8)) == (16, 8)
    assert hsdp_degrees(JobShape(world_size=8, gpus_per_node=8)) == (1, 8)
    # the largest divisor of the GPUs of a node that divides the experts
    assert expert_parallel_degree(JobShape(world_size=64, gpus_per_node=8), 1008) == 8
    assert expert_parallel_degree(JobShape(world_size=48, gpus_per_node=6), 1008) == 6
    assert expert_parallel_degree(JobShape(world_size=48, gpus_per_node=6), 256) == 2
    assert expert_parallel_degree(JobShape(world_size=1, gpus_per_node=1), 1008) == 1


def test_job_shape_from_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert job_shape() == JobShape(world_size=1, gpus_per_node=1)
    monkeypatch.setenv("WORLD_SIZE", "32")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert job_shape().nodes == 4
    monkeypatch.setenv("WORLD_SIZE", "12")
    with pytest.raises(ConfigError, match="WORLD_SIZE=12 is not a multiple of LOCAL_WORLD_SIZE=8"):
        job_shape()


def test_dense_recipe_is_hsdp_replicated_across_nodes(monkeypatch):
    config = load_recipe("dense_1b5", job=JobShape(world_size=128, gpus_per_node=8))
    par = config.parallelism
    assert (par.data_parallel_replicate_degree, par.data_parallel_shard_degree, par.expert_parallel_degree) == (16, -1, 1)
    dims = ParallelDims.from_config(par, 128)  # torchtitan's own resolution of the degrees
    assert (dims.dp_replicate, dims.dp_shard) == (16, 8)
    assert check_config(config, 128) == []
    # under torchrun the recipe reads the job from the environment; an override still wins
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert load_recipe("modality_ffn_2b3").parallelism.data_parallel_replicate_degree == 2
    flat = load_recipe("modality_ffn_2b3", ["--parallelism.data_parallel_replicate_degree", "1"])
    assert ParallelDims.from_config(flat.parallelism, 16).dp_shard == 16
    # the CPU recipes keep plain FSDP
    assert load_recipe("debug_cpu").parallelism.data_parallel_replicate_degree == 1


def test_moe_recipe_shards_its_experts_over_expert_parallel_ranks():
    config = load_recipe("moe_e1008", job=JobShape(world_size=64, gpus_per_node=8))
    par = config.parallelism
    assert (par.data_parallel_replicate_degree, par.data_parallel_shard_degree, par.expert_parallel_degree) == (1, -1, 8)
    dims = ParallelDims.from_config(par, 64)
    assert (dims.dp_shard, dims.ep, dims.dp_shard // dims.ep) == (64, 8, 8)  # efsdp 8
    if compat.TORCH_FSDP_PER_PARAM_MESH:
        assert check_config(config, 64) == []
    else:  # torch < 2.12 cannot run expert parallelism (unimm.titan.compat): refused before launch
        with pytest.raises(ConfigError, match="needs torch >= 2.12"):
            check_config(config, 64)
    single = load_recipe("moe_e1008", job=JobShape(world_size=1, gpus_per_node=1))
    assert single.parallelism.expert_parallel_degree == 1


@pytest.mark.skipif(find_spec("torchao") is not None, reason="torchao is installed here")
def test_float8_without_torchao_is_a_clear_error():
    config = load_recipe("dense_1b5", ["--training.float8.enable"])
    assert config.training.float8.enable and not load_recipe("dense_1b5").training.float8.enable
    with pytest.raises(ConfigError, match=r"--training.float8.enable needs torchao, which is not installed"):
        check_config(config, 1)

    from unimm.titan.parallelize import apply_float8

    with pytest.raises(ConfigError, match="needs torchao"):
        apply_float8(None, config.training.float8, compile_enabled=False)


@pytest.mark.skipif(find_spec("torchao") is None, reason="float8 needs torchao")
def test_float8_reaches_every_eligible_linear():
    from torchtitan.components.quantization import Float8Linear
    from torchtitan.models.common.linear import Linear

    from unimm.model.params import meta_model
    from unimm.titan.parallelize import Float8Config, apply_float8

    model = meta_model(load_recipe("debug_cpu_moe").model_spec.model)
    swapped = apply_float8(model, Float8Config(enable=True, emulate=True), compile_enabled=False)
    kept = [name for name, m in model.named_modules() if type(m) is Linear]
    assert swapped and all(isinstance(model.get_submodule(name), Float8Linear) for name in swapped)
    # only the filtered names (router, heads) stay; every attention projection is float8
    assert kept and all(any(f in name for f in ("router.gate", "lm_head", "flow_head")) for name in kept)
    assert {f"layers.{i}.attention.{w}" for i in range(4) for w in ("wq", "wk", "wv", "wo")} <= set(swapped)
