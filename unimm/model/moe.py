"""Fine-grained mixture of experts for the FFN slot (paper §6.1, App. E.7).

Each token runs through ``top_k`` SwiGLU experts of width ``expert_hidden_dim``: its shared
expert(s) (always active, weight 1) plus the top ``top_k - n_shared`` of the routed experts
the router picks. All experts of a layer live in three stacked tensors and run as one grouped
GEMM over token-expert pairs sorted by expert (``unimm.kernels``), so a layer with 1008
experts is three kernel launches, not 1008 matmuls.

Shared-expert modes (Table 2): ``none``; ``global``: expert 0 serves every token;
``per_modality``: expert 0 serves text tokens and expert 1 vision tokens.
Load balancing: a Switch-style auxiliary loss (``aux_loss``), or torchtitan-style
auxiliary-loss-free biases on the routing scores nudged after every optimiser step (``bias``).
Padding positions of a packed row are still routed (their outputs are never used) but are
left out of the balance loss and of the expert-load counters (``valid_BL``).

Each token's k expert outputs are summed in fp32 in a fixed order (``combine_pairs``): no
atomic accumulation, so a step gives the same bits on every run. Under expert parallelism
(``enable_expert_parallel``) the routed experts are sharded over the EP ranks and reached
through torchtitan's all-to-all dispatcher; the shared experts run beside them as a dense FFN
on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

import torch
import torch.nn as nn
from torch.distributed._functional_collectives import all_gather_tensor_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor
from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher
from torchtitan.protocols.module import Module

from unimm.data.batch import VISION
from unimm.kernels import swiglu_experts
from unimm.model.experts import ExpertWeights, ModalityRouting, expert_backend
from unimm.model.init import linear_init

SHARED_EXPERTS = {"none": 0, "global": 1, "per_modality": 2}


@dataclass(kw_only=True, slots=True)
class MoEConfig:
    num_experts: int = 256
    """All experts of a layer, shared ones included."""
    top_k: int = 16
    """Experts each token runs through, its shared expert included."""
    expert_hidden_dim: int = 512
    shared: Literal["none", "global", "per_modality"] = "none"
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    load_balance: Literal["aux_loss", "bias", "none"] = "aux_loss"
    aux_loss_coef: float = 0.01
    bias_update_rate: float = 1e-3
    """Step of the aux-loss-free bias update (torchtitan's load_balance_coeff)."""
    backend: Literal["auto", "triton", "torch_grouped_mm", "loop"] = "auto"

    @property
    def num_shared(self) -> int:
        return SHARED_EXPERTS[self.shared]

    @property
    def num_routed(self) -> int:
        return self.num_experts - self.num_shared

    @property
    def routed_top_k(self) -> int:
        # per_modality keeps two shared experts but each token activates only its own
        return self.top_k - min(self.num_shared, 1)

    def validate(self) -> None:
        if self.shared not in SHARED_EXPERTS:
            raise ValueError(f"moe.shared must be one of {sorted(SHARED_EXPERTS)}, got {self.shared!r}")
        if not 0 < self.routed_top_k <= self.num_routed:
            raise ValueError(
                f"moe.top_k={self.top_k} with shared={self.shared!r} routes {self.routed_top_k} of "
                f"{self.num_routed} routed experts; need 1 <= routed top-k <= routed experts"
            )


class Router(Module):
    """Scores routed experts, picks the top k per token, and measures the balance."""

    def __init__(self, dim: int, config: MoEConfig):
        super().__init__()
        self.config = config
        self.gate = linear_init(dim, config.num_routed, std=0.02)
        # Aux-loss-free balancing shifts selection only, never the mixing weights.
        self.register_buffer("expert_bias", torch.zeros(config.num_routed), persistent=True)

    def _init_self_buffers(self, *, buffer_device=None) -> None:
        self.expert_bias = torch.zeros(self.config.num_routed, device=buffer_device or self.expert_bias.device)

    def forward(
        self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return routed expert ids [T, k], their mixing weights [T, k] and the aux loss
        over the tokens where ``valid_T`` is True (all when None)."""
        logits = self.gate(x_TD).float()
        if self.config.score_func == "softmax":
            scores = logits.softmax(dim=-1)
        else:
            scores = logits.sigmoid()
        k = self.config.routed_top_k
        _, experts_Tk = torch.topk(scores + self.expert_bias, k, dim=-1)
        weights_Tk = scores.gather(-1, experts_Tk)
        if self.config.score_func == "sigmoid":
            weights_Tk = weights_Tk / weights_Tk.sum(-1, keepdim=True)
        return experts_Tk, weights_Tk, self.balance_loss(scores, experts_Tk, valid_T)

    def balance_loss(
        self, scores_TE: torch.Tensor, experts_Tk: torch.Tensor, valid_T: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Switch/GShard loss E * sum_i f_i * P_i: f_i the share of routing slots expert i
        took, P_i its mean routing probability, both over the valid tokens (padding left
        out). 1.0 when perfectly balanced."""
        num_routed, k = scores_TE.shape[-1], experts_Tk.shape[-1]
        probs = scores_TE / scores_TE.sum(-1, keepdim=True)
        if valid_T is None:
            valid_T = torch.ones(len(scores_TE), dtype=torch.bool, device=scores_TE.device)
        weight_T = valid_T.to(probs.dtype)
        n_valid = weight_T.sum().clamp_min(1.0)
        slots = torch.zeros(num_routed, dtype=probs.dtype, device=probs.device)
        slots.index_add_(0, experts_Tk.flatten(), weight_T.repeat_interleave(k))
        return num_routed * ((slots / (n_valid * k)) * ((probs * weight_T[:, None]).sum(0) / n_valid)).sum()


class MoE(Module):
    def __init__(self, dim: int, config: MoEConfig, out_std: float):
        super().__init__()
        config.validate()
        self.config = config
        self.router = Router(dim, config)
        self.experts = ExpertWeights(config.num_experts, dim, config.expert_hidden_dim, out_std)
        # Tokens each expert (shared ones included) received since the counters were last
        # read: for the metrics and the aux-loss-free bias update.
        self.register_buffer("tokens_per_expert", torch.zeros(config.num_experts), persistent=False)

    def _init_self_buffers(self, *, buffer_device=None) -> None:
        self.tokens_per_expert = torch.zeros(
            self.config.num_experts, device=buffer_device or self.tokens_per_expert.device
        )

    def route(self, x_TD: torch.Tensor, modality_T: torch.Tensor, valid_T: torch.Tensor | None = None):
        """Expert ids [T, top_k] over all experts, mixing weights [T, top_k], aux loss
        (over the ``valid_T`` tokens)."""
        routed_Tk, weights_Tk, aux = self.router(x_TD, valid_T)
        routed_Tk = routed_Tk + self.config.num_shared
        n_shared = self.config.num_shared
        if n_shared == 0:
            return routed_Tk, weights_Tk, aux
        shared_T1 = (modality_T == VISION).long()[:, None] if n_shared == 2 else torch.zeros_like(routed_Tk[:, :1])
        experts = torch.cat([shared_T1, routed_Tk], dim=1)
        weights = torch.cat([torch.ones_like(weights_Tk[:, :1]), weights_Tk], dim=1)
        return experts, weights, aux

    # Set by ``enable_expert_parallel``: torchtitan's all-to-all token dispatcher.
    dispatcher: AllToAllTokenDispatcher | None = None

    @property
    def routed_experts(self) -> SimpleNamespace:
        # torchtitan's FSDP helper finds expert weights at block.moe.routed_experts.inner_experts
        # to give them their own shard placement and expert-parallel mesh.
        return SimpleNamespace(inner_experts=self.experts)

    def enable_expert_parallel(self, ep_mesh: DeviceMesh) -> None:
        """Shard the experts over ``ep_mesh`` (dim 0) and route tokens to their owners with
        torchtitan's all-to-all dispatcher. Call on the meta-device model, before FSDP.

        Only the routed experts go through the dispatcher. The shared ones (always active)
        run beside them as a dense FFN on every rank (``_shared_ffn``): routed like the others,
        the rank that holds expert 0 would receive every token of the EP group."""
        ep = ep_mesh.size()
        if self.config.num_experts % ep:
            raise ValueError(
                f"moe.num_experts={self.config.num_experts} must divide by the expert-parallel degree {ep}"
            )
        if self.config.num_experts // ep < self.config.num_shared:
            raise ValueError(
                f"moe.shared={self.config.shared!r} keeps its {self.config.num_shared} shared experts on the "
                f"first expert-parallel rank, which holds num_experts / ep = {self.config.num_experts // ep}; "
                "lower --parallelism.expert_parallel_degree"
            )
        for name, param in list(self.experts.named_parameters(recurse=False)):
            sharded = nn.Parameter(distribute_tensor(param, ep_mesh, [Shard(0)]))
            self.experts.register_parameter(name, sharded)
        self.dispatcher = AllToAllTokenDispatcher(
            AllToAllTokenDispatcher.Config(num_experts=self.config.num_experts, top_k=self.config.routed_top_k)
        )
        self.dispatcher.wire_meshes(ep_mesh=ep_mesh)

    def forward(
        self, x_BLD: torch.Tensor, modality_BL: torch.Tensor, valid_BL: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``valid_BL``: False at padding, which is routed and computed like any token but
        left out of the balance loss and the load counters (None: every position counts)."""
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(B * L, D)
        modality_T = modality_BL.reshape(-1)
        valid_T = None if valid_BL is None else valid_BL.reshape(-1)
        experts_Tk, weights_Tk, aux = self.route(x_TD, modality_T, valid_T)
        # In place (add_, not +=, which would rebind the attribute: a side effect that compile
        # rejects inside activation checkpointing), and only outside backward: eager activation
        # checkpointing re-runs this forward in backward, which would count every token twice.
        # Compiled, the buffer update is the forward graph's epilogue and is never re-run.
        if torch.compiler.is_compiling() or torch._C._current_graph_task_id() == -1:
            with torch.no_grad():
                self.tokens_per_expert.add_(count_per_expert(experts_Tk, self.config.num_experts, valid_T))
        backend = expert_backend(self.config.backend, x_TD)
        if self.dispatcher is None:
            out_TD = run_experts(self.experts, x_TD, experts_Tk, weights_Tk, backend)
        else:
            out_TD = self._run_expert_parallel(x_TD, modality_T, experts_Tk, weights_Tk, backend)
        return out_TD.reshape(B, L, D), aux

    def _run_expert_parallel(self, x_TD, modality_T, experts_Tk, weights_Tk, backend) -> torch.Tensor:
        shared_cols = min(self.config.num_shared, 1)  # route() puts a token's shared expert first
        routed_Tk, routed_weights_Tk = experts_Tk[:, shared_cols:].contiguous(), weights_Tk[:, shared_cols:].contiguous()
        counts_E = count_per_expert(routed_Tk, self.config.num_experts)
        routed_RD, counts_e, metadata = self.dispatcher.dispatch(x_TD, routed_weights_Tk, routed_Tk, counts_E)
        offsets = torch.cumsum(counts_e, 0).to(torch.int32)
        y_RD = swiglu_experts(routed_RD, *self.experts.local(), offsets, backend=backend)
        out_TD = self.dispatcher.combine(y_RD, metadata, x_TD)
        if shared_cols:
            out_TD = out_TD + self._shared_ffn(x_TD, modality_T, backend)
        return out_TD

    def _shared_ffn(self, x_TD: torch.Tensor, modality_T: torch.Tensor, backend: str) -> torch.Tensor:
        """The shared experts as a dense FFN on this rank's tokens (weight 1, as in ``route``).

        Their weights stay rows 0..n_shared-1 of the stacked experts (one checkpoint layout for
        every parallel layout), held by the first EP rank: every rank all-gathers the first
        n_shared rows of its shard over the EP group and keeps the first rank's. The gather's
        backward is a reduce-scatter, which hands the first rank the sum of every rank's
        gradient for them. Traffic per layer: ep x n_shared experts' weights, small beside the
        tokens' all-to-all (T k D)."""
        n_shared = self.config.num_shared
        ep_mesh = self.dispatcher.ep_mesh
        w1, w3, w2 = (
            all_gather_tensor_autograd(w[:n_shared].contiguous(), gather_dim=0, group=ep_mesh)[:n_shared]
            for w in self.experts.local()
        )
        if n_shared == 1:
            offsets = torch.full((1,), len(x_TD), dtype=torch.int32, device=x_TD.device)
            return swiglu_experts(x_TD, w1, w3, w2, offsets, backend=backend)
        # per_modality: expert 0 for text, expert 1 for vision, grouped by modality
        routing = ModalityRouting.of(modality_T)
        y_TD = swiglu_experts(x_TD, w1, w3, w2, routing.offsets, backend=backend, gather_idx=routing.order_T)
        return y_TD[routing.inverse_T]

    def inactive_params(self) -> int:
        inactive_experts = self.config.num_experts - self.config.top_k
        return inactive_experts * self.experts.params_per_expert()


def count_per_expert(
    experts_Tk: torch.Tensor, num_experts: int, valid_T: torch.Tensor | None = None
) -> torch.Tensor:
    """Routing slots per expert, int64 [num_experts]; with ``valid_T``, of the valid tokens only.

    A scatter-add into a fixed-size tensor, not ``bincount`` (whose output size depends on the
    data) nor boolean indexing: static shapes and no host sync, so the layer compiles with
    ``fullgraph=True`` (torchtitan's MoE counts with static-shape ops for the same reason)."""
    flat = experts_Tk.flatten()
    if valid_T is None:
        ones = torch.ones_like(flat)
    else:
        ones = valid_T[:, None].expand_as(experts_Tk).flatten().to(flat.dtype)
    return torch.zeros(num_experts, dtype=flat.dtype, device=flat.device).scatter_add_(0, flat, ones)


def run_experts(
    experts: ExpertWeights,
    x_TD: torch.Tensor,
    experts_Tk: torch.Tensor,
    weights_Tk: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    """Sort token-expert pairs by expert, run one grouped SwiGLU GEMM, weight and sum back."""
    T, k = experts_Tk.shape
    flat_experts = experts_Tk.flatten()
    order = torch.argsort(flat_experts, stable=True)
    token_of_pair = order // k
    offsets = torch.cumsum(count_per_expert(experts_Tk, experts.num_experts), 0).to(torch.int32)
    y_AD = swiglu_experts(x_TD, *experts.local(), offsets, backend=backend, gather_idx=token_of_pair)
    return combine_pairs(y_AD, order, weights_Tk)


def combine_pairs(y_AD: torch.Tensor, order_A: torch.Tensor, weights_Tk: torch.Tensor) -> torch.Tensor:
    """Each token's weighted sum of its k expert outputs, [T, D] in ``y_AD``'s dtype.

    ``y_AD``: the outputs of the T*k token-expert pairs in expert order, row i being pair
    ``order_A[i]`` (pair p = token p // k, slot p % k). The rows go back to pair order through
    the inverse permutation (a scatter of distinct indices: no two writes meet) and each token
    sums its k slots in fp32, in slot order (``WeightedSlotSum``). No atomic accumulation,
    unlike an ``index_add_`` into the tokens (whose CUDA result depends on the order the atomics
    land in): the result is bitwise the same on every run, and the shapes are static (T*k pairs)."""
    T, k = weights_Tk.shape
    pairs_A = torch.arange(len(order_A), device=order_A.device)
    inverse_A = torch.empty_like(order_A).scatter_(0, order_A, pairs_A)
    return WeightedSlotSum.apply(y_AD[inverse_A].reshape(T, k, -1), weights_Tk)


class WeightedSlotSum(torch.autograd.Function):
    """``out_TD = sum_j w_Tk[:, j] * y_TkD[:, j]``, accumulated in fp32 slot by slot and rounded
    once to y's dtype. Only y (in its own dtype) and w are saved for backward: autograd through
    an fp32 upcast would keep a [T, k, D] fp32 copy per layer (2 GiB at the paper's MoE shape)."""

    @staticmethod
    def forward(ctx, y_TkD: torch.Tensor, w_Tk: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(y_TkD, w_Tk)
        w_Tk = w_Tk.float()
        acc_TD = torch.zeros(y_TkD.shape[0], y_TkD.shape[2], dtype=torch.float32, device=y_TkD.device)
        for j in range(y_TkD.shape[1]):
            acc_TD = acc_TD + w_Tk[:, j, None] * y_TkD[:, j].float()
        # copy=True: for fp32 y a plain .to() would return acc_TD itself, and torch 2.11's
        # compile then gives this Function wrong gradients (zeros for y); 2.13 is right either way.
        return acc_TD.to(y_TkD.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):
        y_TkD, w_Tk = ctx.saved_tensors
        grad_TD = grad_TD.float()
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_y = (grad_TD[:, None, :] * w_Tk.float()[:, :, None]).to(y_TkD.dtype)
        if ctx.needs_input_grad[1]:
            slots = [(y_TkD[:, j].float() * grad_TD).sum(-1) for j in range(y_TkD.shape[1])]
            grad_w = torch.stack(slots, dim=1).to(w_Tk.dtype)
        return grad_y, grad_w


def moe_layers(model: torch.nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def update_expert_biases(layers: list[MoE], tokens_per_expert_LE: torch.Tensor) -> None:
    """Aux-loss-free balancing (torchtitan's rule): raise the bias of under-loaded routed
    experts and lower it for over-loaded ones by a fixed step, keeping the mean bias at 0."""
    for layer, load_E in zip(layers, tokens_per_expert_LE):
        routed = load_E[layer.config.num_shared :].float()
        delta = layer.config.bias_update_rate * torch.sign(routed.mean() - routed)
        layer.router.expert_bias += delta - delta.mean()
