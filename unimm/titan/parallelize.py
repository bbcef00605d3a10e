"""Applies activation checkpointing, torch.compile and FSDP2 to the unified model.

The model keeps torchtitan's decoder attribute names (tok_embeddings, layers, norm, lm_head,
block.moe) so torchtitan's own FSDP helper shards it: one FSDP unit per block, embeddings and
the final norm + LM head as their own units, the visual adapters with the root, and stacked
expert weights on their own placement (and, with expert parallelism, the expert-FSDP mesh).
"""

from __future__ import annotations

import torch
from torchtitan.config import TORCH_DTYPE_MAP, CompileConfig, ParallelismConfig, TrainingConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.activation_checkpoint import ActivationCheckpointing, SelectiveAC
from torchtitan.distributed.compile import apply_compile
from torchtitan.distributed.fsdp import apply_fsdp_to_decoder

from unimm.kernels import GROUPED_GEMM_OPS
from unimm.model.moe import MoE
from unimm.model.transformer import UnimmModel
from unimm.titan.compat import force_sum_reduction_on_gloo


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
    if parallel_dims.ep_enabled:
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
