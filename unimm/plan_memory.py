"""``unimm plan-memory``: per-GPU memory of a recipe's parallel layout, on one CPU machine.

How it is measured. The model is built on the meta device and sharded by the real
``unimm.titan.parallelize.parallelize_unimm`` (torchtitan's ``ParallelDims`` meshes, expert
parallelism, FSDP2 ``fully_shard`` with the ``efsdp`` mesh for experts) inside a *fake*
process group (``torch.testing._internal.distributed.fake_pg.FakeStore`` with the ``fake``
backend): one process plays rank 0 of ``--gpus`` ranks, no collective runs, no weights are
allocated. The sharded parameters are DTensors whose local shard is what rank 0 keeps.
The recipe is loaded as the ranks of a ``--gpus`` job with ``--gpus-per-node`` GPUs a node
load it (``unimm.titan.launch.JobShape``), so the paper recipes' layouts are the real ones:
HSDP replicated across nodes and sharded within a node, or FSDP with expert parallelism
inside a node for MoE (``recipes/config_registry.py``, ``_paper_layout``).

Exact (to the byte, for the largest shard, which is rank 0's; FSDP2 pads every rank's shard
to that size):

- parameters: the local shard of every parameter, in the parameter's storage dtype (fp32:
  FSDP2 keeps the sharded parameters in fp32 and casts to ``training.mixed_precision_param``
  only when it all-gathers, so the sharded fp32 parameters *are* the master weights and there
  is no separate master copy);
- gradients: one sharded gradient per parameter, same size and dtype (FSDP2 reduce-scatters
  into the sharded parameter's dtype);
- optimizer: AdamW's two moments (``exp_avg``, ``exp_avg_sq``) per sharded element, in the
  parameter's dtype (and one fp32 ``step`` scalar per parameter tensor);
- buffers (RoPE table, router biases, counters): replicated on every GPU.

Estimated (clearly an estimate; the real number depends on kernels and the allocator):

- FSDP transient: the largest FSDP unit all-gathered in the mixed-precision parameter dtype,
  twice (the current unit and the prefetched next one), plus its unsharded gradient in the
  reduce dtype before the reduce-scatter;
- activations, per GPU, for ``local_batch_size * seq_len`` tokens, ``a`` = bytes of the
  compute dtype (``training.mixed_precision_param``), counted per token and layer:

  ``none`` (nothing recomputed) — attention: block input (the attention-norm input) D, norm
  output D, q/k/v projections D + 2 Dkv, rotated q and k D + Dkv, attention output D (all
  ``a`` bytes) and the attention log-sum-exp (fp32, one per head); FFN: ffn-norm input and
  output 2 D; a SwiGLU saves its gate and up projections, silu(gate) and the product, 4 H.
  MoE: router logits and probabilities (fp32, 2 E_routed), the gathered token copies k D,
  4 k He in the experts, the expert outputs k D. Modality FFN: the same engine, k = 1, no
  router. MoT: as the dense block (each token runs through one copy).

  ``selective`` (torchtitan's per-op policy, unimm's save list): the block input D, the
  outputs of every other matmul of the block (wq, wv, w1 / router, w2 in a dense block), the
  attention output and log-sum-exp, top-k values and indices, and every grouped-GEMM output
  (2 k He + k D); the elementwise ops are recomputed.

  ``full``: the block input D per layer, plus, transiently, one layer's ``none`` activations
  while it is recomputed in backward.

  Outside the blocks, for every mode: the final norm's output D, the rows with a next-token
  target gathered for the LM head (``unimm.flops.TYPICAL_MIX.lm_targets`` of all positions) D,
  which the chunked cross-entropy saves for backward, and, transiently, one chunk of
  ``loss.lm_chunk_rows`` rows of logits: V (a + 4 + 4) (the logits, their fp32 copy and its
  gradient); the full [targets, V] logits never exist (``unimm.losses.chunked_cross_entropy_sum``).
  Not counted: the flow head's outputs (latent width, small), masks, the data batch, the
  CUDA context, NCCL buffers and allocator fragmentation.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from unimm.errors import ConfigError

GiB = 1024**3
AC_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class Layout:
    gpus: int
    gpus_per_node: int
    dp_replicate: int
    dp_shard: int
    ep: int

    @property
    def efsdp(self) -> int:
        return self.dp_shard // self.ep

    @property
    def nodes(self) -> int:
        return self.gpus // self.gpus_per_node


def check_job(gpus: int, gpus_per_node: int) -> None:
    """A one-line ConfigError when ``gpus`` cannot be ``gpus_per_node`` GPUs on each of a whole number of nodes."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {gpus}")
    if gpus_per_node < 1 or gpus % gpus_per_node:
        raise ConfigError(f"--gpus-per-node {gpus_per_node} must divide --gpus {gpus}")


def check_layout(config, gpus: int, gpus_per_node: int) -> Layout:
    """The layout of ``config.parallelism`` on ``gpus`` GPUs, or a one-line ConfigError naming the setting."""
    check_job(gpus, gpus_per_node)
    par = config.parallelism
    for name in ("tensor_parallel_degree", "context_parallel_degree", "pipeline_parallel_degree"):
        if getattr(par, name) != 1:
            raise ConfigError(f"--parallelism.{name} {getattr(par, name)}: unimm runs data parallel (FSDP2 / HSDP) only")
    replicate = par.data_parallel_replicate_degree
    if replicate < 1 or gpus % replicate:
        raise ConfigError(f"--parallelism.data_parallel_replicate_degree {replicate} must divide --gpus {gpus}")
    shard = par.data_parallel_shard_degree
    if shard == -1:
        shard = gpus // replicate
    if shard < 1 or replicate * shard != gpus:
        raise ConfigError(
            f"--parallelism.data_parallel_shard_degree {par.data_parallel_shard_degree} times "
            f"--parallelism.data_parallel_replicate_degree {replicate} must equal --gpus {gpus} (or shard degree -1)"
        )
    ep = par.expert_parallel_degree
    if ep < 1 or shard % ep:
        raise ConfigError(
            f"--parallelism.expert_parallel_degree {ep} must divide the FSDP shard degree {shard} "
            f"(experts are sharded over ep x efsdp inside each shard group)"
        )
    if ep > 1:
        ffn = config.model_spec.model.ffn
        if ffn.kind != "moe":
            raise ConfigError(f"--parallelism.expert_parallel_degree {ep} needs a recipe with MoE layers (ffn.kind is {ffn.kind!r})")
        if ffn.moe.num_experts % ep:
            raise ConfigError(
                f"--parallelism.expert_parallel_degree {ep} must divide moe.num_experts {ffn.moe.num_experts}"
            )
    return Layout(gpus=gpus, gpus_per_node=gpus_per_node, dp_replicate=replicate, dp_shard=shard, ep=ep)


@contextmanager
def fake_world(world_size: int):
    """A fake default process group of ``world_size`` ranks (this process is rank 0) with
    torchtitan's meshes on the CPU device type; torn down on exit."""
    import torch.distributed as dist
    import torchtitan.distributed.parallel_dims as parallel_dims
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise ConfigError("plan-memory needs its own process group; run it outside torchrun")
    saved = parallel_dims.device_type
    parallel_dims.device_type = "cpu"
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        parallel_dims.device_type = saved


def shard_on_fake_world(config, layout: Layout):
    """The meta model sharded by the real ``parallelize_unimm`` as rank 0 of ``layout``. Call inside ``fake_world``."""
    from torchtitan.distributed import ParallelDims

    from unimm.model.params import meta_model
    from unimm.titan.parallelize import parallelize_unimm

    dims = ParallelDims(
        dp_replicate=layout.dp_replicate, dp_shard=layout.dp_shard, cp=1, tp=1, pp=1, ep=layout.ep,
        world_size=layout.gpus, spmd_backend=config.parallelism.spmd_backend,
    )
    dims.build_mesh()
    model = meta_model(config.model_spec.model)
    compile_off = dataclasses.replace(config.compile, enable=False)
    try:
        return parallelize_unimm(
            model, parallel_dims=dims, training=config.training, parallelism=config.parallelism,
            compile_config=compile_off, ac_config=None, dump_folder="",
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _local(p) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def _gathered_numel(p) -> int:
    """Elements of ``p`` after the FSDP all-gather (the expert-parallel shard stays sharded)."""
    local = _local(p).numel()
    if not hasattr(p, "device_mesh"):
        return local
    mesh = p.device_mesh
    for dim, placement in enumerate(p.placements):
        sharded = placement.is_shard() or type(placement).__name__ == "_StridedShard"
        if sharded and mesh.mesh_dim_names[dim] != "ep":
            local *= mesh.size(dim)
    return local


def fsdp_units(model) -> dict[str, list]:
    """Parameters per FSDP unit (module name -> params), each parameter in its innermost unit."""
    from torch.distributed.fsdp import FSDPModule

    owner: dict[int, str] = {}
    params: dict[int, object] = {}
    for name, module in model.named_modules():  # pre-order: inner units overwrite outer ones
        if isinstance(module, FSDPModule):
            for p in module.parameters():
                owner[id(p)] = name or "<root>"
                params[id(p)] = p
    units: dict[str, list] = {}
    for key, name in owner.items():
        units.setdefault(name, []).append(params[key])
    return units


def state_bytes(model, config) -> dict:
    """Exact per-GPU bytes of parameters, gradients, AdamW state and buffers, and the estimated FSDP transient."""
    from torchtitan.config import TORCH_DTYPE_MAP

    total_numel = local_numel = param_bytes = steps = 0
    for p in model.parameters():
        local = _local(p)
        total_numel += p.numel()
        local_numel += local.numel()
        param_bytes += local.numel() * local.element_size()
        steps += 1
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    mp_bytes = TORCH_DTYPE_MAP[config.training.mixed_precision_param].itemsize
    reduce_bytes = TORCH_DTYPE_MAP[config.training.mixed_precision_reduce].itemsize
    units = fsdp_units(model)
    largest = max((sum(_gathered_numel(p) for p in ps), name) for name, ps in units.items()) if units else (0, "")
    return {
        "total_params": total_numel,
        "local_params": local_numel,
        "params_bytes": param_bytes,
        "grads_bytes": param_bytes,
        "optimizer_bytes": 2 * param_bytes + 4 * steps,
        "master_weights_bytes": 0,
        "buffers_bytes": buffers,
        "fsdp_largest_unit": largest[1],
        "fsdp_largest_unit_params": largest[0],
        "fsdp_transient_bytes_estimate": largest[0] * (2 * mp_bytes + reduce_bytes),
    }


def _ffn_per_token(cfg) -> tuple[dict, dict]:
    """(elements saved with nothing recomputed, elements saved under selective AC) per token of
    one FFN, each as {bytes per element: elements}."""
    D, ffn = cfg.dim, cfg.ffn
    if ffn.kind == "moe":
        moe = ffn.moe
        k, He, E = moe.top_k, moe.expert_hidden_dim, moe.num_routed
        none = {"a": 2 * D + k * D + 4 * k * He + k * D, "fp32": 2 * E}
        # router linear is the block's 5th matmul (saved), then top-k values and int64 indices,
        # and the grouped GEMMs' outputs
        selective = {"a": E + moe.routed_top_k + 2 * k * He + k * D, "int64": moe.routed_top_k}
        return none, selective
    H = ffn.hidden_dim
    if ffn.kind == "modality":
        return {"a": 2 * D + D + 4 * H + D}, {"a": 2 * H + D}
    # shared SwiGLU (and each MoT copy): w1 (5th matmul, saved), w3 (recomputed), w2 (saved)
    return {"a": 2 * D + 4 * H}, {"a": H + D}


def activation_bytes(
    model_config, seq_len: int, local_batch: int, act_bytes: int, lm_chunk_rows: int
) -> dict[str, int]:
    """Estimated activation bytes per GPU for each AC mode (see the module docstring)."""
    from unimm.flops import TYPICAL_MIX

    cfg = model_config
    D, Hq = cfg.dim, cfg.n_heads
    Dkv = cfg.n_kv_heads * (D // Hq)
    tokens = seq_len * local_batch
    sizes = {"a": act_bytes, "fp32": 4, "int64": 8}

    def nbytes(elements: dict) -> int:
        return sum(sizes[kind] * n for kind, n in elements.items())

    ffn_none, ffn_sel = _ffn_per_token(cfg)
    attn_none = {"a": D + D + (D + 2 * Dkv) + (D + Dkv) + D, "fp32": Hq}
    # block input; wq (1st matmul, saved), wk (recomputed), wv (saved), attention output + lse, wo (recomputed)
    attn_sel = {"a": D + D + Dkv + D, "fp32": Hq}
    layer_none = nbytes(attn_none) + nbytes(ffn_none)
    layer_sel = nbytes(attn_sel) + nbytes(ffn_sel)
    layer_full = D * act_bytes
    vocab = cfg.vocab_size
    targets = round(tokens * TYPICAL_MIX.lm_targets)
    outside = (tokens + targets) * D * act_bytes + min(lm_chunk_rows, targets) * vocab * (act_bytes + 8)
    L = cfg.n_layers
    return {
        "none": L * layer_none * tokens + outside,
        "selective": L * layer_sel * tokens + outside,
        "full": L * layer_full * tokens + layer_none * tokens + outside,
    }


def recipe_ac_mode(config) -> str:
    ac = config.activation_checkpoint
    if ac is None:
        return "none"
    owner = type(ac).__qualname__.split(".")[0]
    return {"SelectiveAC": "selective", "FullAC": "full"}.get(owner, owner)


def plan(recipe: str, gpus: int, gpus_per_node: int = 8, overrides: list[str] | None = None) -> dict:
    from torchtitan.config import TORCH_DTYPE_MAP

    from unimm.titan.launch import JobShape, load_recipe

    check_job(gpus, gpus_per_node)
    # the recipe as the ranks of this job load it: its parallel layout follows the job's shape
    config = load_recipe(recipe, overrides, JobShape(world_size=gpus, gpus_per_node=gpus_per_node))
    layout = check_layout(config, gpus, gpus_per_node)
    with fake_world(gpus):
        model = shard_on_fake_world(config, layout)
        state = state_bytes(model, config)
    training = config.training
    act_bytes = TORCH_DTYPE_MAP[training.mixed_precision_param].itemsize
    acts = activation_bytes(
        config.model_spec.model, training.seq_len, training.local_batch_size, act_bytes, config.loss.lm_chunk_rows
    )
    exact = state["params_bytes"] + state["grads_bytes"] + state["optimizer_bytes"] + state["buffers_bytes"]
    return {
        "recipe": recipe,
        "layout": {**asdict(layout), "efsdp": layout.efsdp if layout.ep > 1 else None, "nodes": layout.nodes},
        "method": "real parallelize_unimm on a meta model in a fake process group (rank 0)",
        "seq_len": training.seq_len,
        "local_batch_size": training.local_batch_size,
        "mixed_precision_param": training.mixed_precision_param,
        "mixed_precision_reduce": training.mixed_precision_reduce,
        "recipe_ac": recipe_ac_mode(config),
        **state,
        "exact_state_bytes": exact,
        "activations_bytes_estimate": acts,
        "total_bytes_estimate": {
            mode: exact + state["fsdp_transient_bytes_estimate"] + acts[mode] for mode in AC_MODES
        },
    }


def format_report(report: dict) -> str:
    lay = report["layout"]
    ep = f", ep {lay['ep']} x efsdp {lay['efsdp']} for experts" if lay["ep"] > 1 else ""
    gib = lambda n: f"{n / GiB:9.3f} GiB"  # noqa: E731
    lines = [
        f"{report['recipe']} on {lay['gpus']} GPUs ({lay['nodes']} nodes x {lay['gpus_per_node']}): "
        f"replicate {lay['dp_replicate']} x shard {lay['dp_shard']}{ep}",
        f"parameters {report['total_params']:,} total, {report['local_params']:,} on rank 0 "
        f"(sharded by the real parallelize_unimm in a fake process group)",
        "",
        "per GPU, exact:",
        f"  parameters (fp32 shard = master weights) {gib(report['params_bytes'])}",
        f"  gradients (sharded)                      {gib(report['grads_bytes'])}",
        f"  AdamW state (2 moments)                  {gib(report['optimizer_bytes'])}",
        f"  buffers (replicated)                     {gib(report['buffers_bytes'])}",
        f"  subtotal                                 {gib(report['exact_state_bytes'])}",
        "per GPU, ESTIMATE:",
        f"  FSDP all-gather/reduce transient         {gib(report['fsdp_transient_bytes_estimate'])}"
        f"  (largest unit: {report['fsdp_largest_unit']})",
        f"  activations at seq_len {report['seq_len']}, local batch {report['local_batch_size']}, "
        f"{report['mixed_precision_param']}:",
    ]
    for mode in AC_MODES:
        mark = "  <- recipe" if mode == report["recipe_ac"] else ""
        lines.append(
            f"    AC {mode:<9} activations {gib(report['activations_bytes_estimate'][mode])}   "
            f"total {gib(report['total_bytes_estimate'][mode])}{mark}"
        )
    lines.append("Activations and transients are estimates (unimm/plan_memory.py says what is counted).")
    return "\n".join(lines)


def _run(args) -> int:
    per_node = args.gpus_per_node
    if per_node is None:  # the largest divisor of --gpus up to 8
        per_node = max(d for d in range(1, 9) if args.gpus < 1 or args.gpus % d == 0)
    report = plan(args.recipe, args.gpus, per_node, args.config_overrides)
    print(json.dumps(report) if args.json else format_report(report))
    return 0


def register(verbs) -> None:
    parser = verbs.add_parser(
        "plan-memory",
        help="per-GPU memory of a recipe's parallel layout (meta model, fake process group, one CPU)",
        description=(
            "Shards the recipe's model on the meta device with the real parallelize function in a fake "
            "process group of --gpus ranks and reports per-GPU parameters, gradients, AdamW state (exact) "
            "and activations per activation-checkpointing mode (estimate). The recipe is loaded as the ranks of "
            "that job load it, so the paper recipes' own layouts apply (HSDP replicated across nodes and sharded "
            "within one; MoE: expert parallel inside a node). Further --section.key VALUE options go to the "
            "torchtitan config (e.g. --parallelism.data_parallel_replicate_degree 1)."
        ),
    )
    parser.add_argument("--recipe", required=True, metavar="NAME", help="a recipe of recipes/config_registry.py")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the job (the world size)")
    parser.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node (default: the largest divisor of --gpus up to 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=_run, takes_overrides=True)
