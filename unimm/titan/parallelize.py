"""Applies float8, expert parallelism, activation checkpointing, torch.compile and FSDP2 /
HSDP to the unified model.

The model keeps torchtitan's decoder attribute names (tok_embeddings, layers, norm, lm_head,
block.moe) so torchtitan's own FSDP helper shards it: one FSDP unit per block, embeddings and
the final norm + LM head as their own units, the visual adapters with the root, and stacked
expert weights on their own placement (and, with expert parallelism, the expert-FSDP mesh).
With ``data_parallel_replicate_degree`` > 1 the same units are HSDP: sharded over the
``fsdp`` mesh dimension, replicated over ``dp_replicate``.

Float8 (``--training.float8.enable``, paper recipes): torchtitan 0.3.0's float8 converter
(torchao's ``Float8Linear``) swapped in for every torchtitan ``Linear`` of the model whose
dimensions are multiples of 16 and whose name is not filtered (the LM and flow heads and the
router stay in bf16, as torchtitan's recipes keep the output head). torchtitan swaps linears in
a model's config tree; unimm's modules build their linears themselves, so the same swap is
done here on the meta-device modules, before anything wraps them. The grouped GEMMs (MoE and
modality-FFN experts, MoT's per-modality projections) stay in bf16: torchtitan's grouped float8
(``Float8GroupedExpertsConverter``) converts torchtitan's ``GroupedExperts`` on
``torch._grouped_mm``, not unimm's grouped-GEMM custom ops (``unimm.kernels``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torchtitan.config import TORCH_DTYPE_MAP, CompileConfig, ParallelismConfig, TrainingConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import ActivationCheckpointing, SelectiveAC
from torchtitan.distributed.compile import apply_compile
from torchtitan.distributed.fsdp import apply_fsdp_to_decoder
from torchtitan.models.common.linear import Linear

from unimm.errors import ConfigError
from unimm.kernels import GROUPED_GEMM_OPS
from unimm.model.moe import MoE
from unimm.model.transformer import UnimmModel
from unimm.titan.compat import expert_parallel_error, force_sum_reduction_on_gloo


@dataclass(kw_only=True, slots=True)
class Float8Config:
    enable: bool = False
    """Train every eligible linear in float8 (torchao; NVIDIA SM89+ or AMD MI300+)."""
    recipe_name: Literal["rowwise", "rowwise_with_gw_hp"] = "rowwise"
    """torchtitan's float8 recipe (its ``Float8LinearConverter.Config.recipe_name``)."""
    filter_fqns: list[str] = field(default_factory=lambda: ["lm_head", "flow_head", "router.gate"])
    """Linears whose name contains one of these stay in the compute dtype."""
    emulate: bool = False
    """Emulated float8 (any device, eager only): for tests, not speed."""


@dataclass(kw_only=True, slots=True)
class UnimmTrainingConfig(TrainingConfig):
    """torchtitan's training section with unimm's float8 option (``--training.float8.*``)."""

    float8: Float8Config = field(default_factory=Float8Config)


def float8_converter(float8: Float8Config, compile_enabled: bool):
    """torchtitan's float8 converter for ``float8``; a ConfigError saying what is missing
    (torchao, a float8-capable GPU) instead of its ImportError / ValueError."""
    from importlib.util import find_spec

    from torchtitan.components.quantization import Float8LinearConverter

    if find_spec("torchao") is None:
        raise ConfigError(
            "--training.float8.enable needs torchao, which is not installed (pip install torchao, the build "
            "matching your torch); or leave float8 off"
        )
    config = Float8LinearConverter.Config(
        recipe_name=float8.recipe_name, filter_fqns=list(float8.filter_fqns),
        emulate=float8.emulate, model_compile_enabled=compile_enabled,
    )
    try:
        return config.build()
    except (ImportError, ValueError) as err:
        raise ConfigError(f"--training.float8.enable: {err}") from None


def apply_float8(model: torch.nn.Module, float8: Float8Config, compile_enabled: bool) -> list[str]:
    """Swap the eligible torchtitan ``Linear`` modules of ``model`` for torchtitan's
    ``Float8Linear`` (same shapes, same per-parameter init); returns their names."""
    converter = float8_converter(float8, compile_enabled)
    from torchtitan.components.quantization import Float8Linear

    swapped = []
    for fqn, module in list(model.named_modules()):
        if type(module) is not Linear:
            continue
        config = Linear.Config(in_features=module.in_features, out_features=module.out_features, bias=module.bias is not None)
        if not converter.filter_fn(config, fqn):
            continue
        with torch.device(module.weight.device):
            new = Float8Linear.Config(
                in_features=module.in_features, out_features=module.out_features, bias=module.bias is not None,
                param_init=module._param_init, _torchao_config=converter.torchao_config,
            ).build()
        parent_name, _, attr = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, new)
        swapped.append(fqn)
    return swapped


# Ops whose outputs selective activation checkpointing saves on top of torchtitan's default list
# (aten matmuls, SDPA, topk, ...): the expert engine's grouped GEMMs (torch.library custom ops,
# which torchtitan's list cannot know) and FlexAttention (already in torchtitan's list; named
# here so that this is the one place to read what unimm saves).
SAC_SAVE_OPS = frozenset({*GROUPED_GEMM_OPS, torch._higher_order_ops.flex_attention})


class UnimmSelectiveAC(SelectiveAC):
    """torchtitan's per-op selective AC with the grouped GEMMs and FlexAttention saved, so the
    backward's recomputation of a block never re-runs them."""

    def get_save_ops(self) -> set:
        return super().get_save_ops() | SAC_SAVE_OPS


def build_activation_checkpointing(ac_config, dump_folder: str = "") -> ActivationCheckpointing:
    """The policy of ``--activation_checkpoint`` (``full``, ``selective``, ``memory-budget``;
    ``none`` is no config): torchtitan's, with unimm's save list for ``selective``."""
    if type(ac_config) is SelectiveAC.Config:
        return UnimmSelectiveAC(ac_config, dump_folder=dump_folder)
    return ac_config.build(dump_folder=dump_folder)


def parallelize_unimm(
    model: UnimmModel,
    *,
    parallel_dims: ParallelDims,
    training: TrainingConfig,
    parallelism: ParallelismConfig,
    compile_config: CompileConfig,
    ac_config,
    dump_folder: str,
) -> UnimmModel:
    unsupported = {
        "tensor parallel": parallel_dims.tp_enabled,
        "context parallel": parallel_dims.cp_enabled,
        "pipeline parallel": parallel_dims.pp_enabled,
    }
    if any(unsupported.values()):
        names = ", ".join(name for name, on in unsupported.items() if on)
        raise ValueError(
            f"unimm runs data parallel (FSDP2 / HSDP) only; {names} requested in --parallelism.*"
        )
    if parallelism.spmd_backend != "partial_dtensor":
        raise ValueError(
            "unimm needs --parallelism.spmd_backend partial_dtensor (its modules carry no "
            f"sharding annotations for {parallelism.spmd_backend!r})"
        )
    float8 = getattr(training, "float8", None)
    if float8 is not None and float8.enable:
        apply_float8(model, float8, compile_config.enable and "model" in compile_config.components)
    if parallel_dims.ep_enabled:
        unsupported = expert_parallel_error(parallel_dims.ep)
        if unsupported:
            raise ValueError(unsupported)
        ep_mesh = parallel_dims.get_mesh("ep")
        routed = [m for m in model.modules() if isinstance(m, MoE)]
        if not routed:
            raise ValueError("--parallelism.expert_parallel_degree > 1 needs a recipe with MoE layers")
        for moe in routed:
            moe.enable_expert_parallel(ep_mesh)
    if ac_config is not None:
        build_activation_checkpointing(ac_config, dump_folder).apply(model)
    if compile_config.enable and "model" in compile_config.components:
        apply_compile(model, compile_config=compile_config, parallel_dims=parallel_dims)

    mesh_names = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
    apply_fsdp_to_decoder(
        model,
        parallel_dims.get_mesh(mesh_names),
        param_dtype=TORCH_DTYPE_MAP[training.mixed_precision_param],
        reduce_dtype=TORCH_DTYPE_MAP[training.mixed_precision_reduce],
        pp_enabled=False,
        cpu_offload=training.enable_cpu_offload,
        reshard_after_forward_policy=parallelism.fsdp_reshard_after_forward,
        ep_degree=parallel_dims.ep,
        edp_mesh=parallel_dims.get_mesh("efsdp") if parallel_dims.ep_enabled else None,
    )
    force_sum_reduction_on_gloo(model)
    return model
