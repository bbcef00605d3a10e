"""Mixture of Transformers (MoT; Liang et al. 2024, paper §6.3; seed 000 §2.1): every
non-embedding weight of a block is modality-specific, attention's mixing is not.

A MoT block keeps two copies of a transformer block, one for text and one for vision. Each
token's attention pre-norm, q/k/v projections, output projection, FFN pre-norm and SwiGLU FFN
are its own modality's; the queries, keys and values of all tokens then meet in ONE attention
under the hybrid mask, so text attends to images and images to text as in the dense model.
One token runs through exactly one copy: active parameters (and FLOPs) equal the dense
model's, total parameters are nearly twice as many.

Every per-modality weight is a stack of two, [2, ...], row 0 text and row 1 vision, and runs on
the grouped-GEMM engine of the experts (``unimm.kernels``) with routing fixed by modality:
the tokens are grouped by modality once per block (``ModalityRouting``, no host sync), each
projection is one grouped GEMM reading its rows through that order, and the results go back
to the token order for the attention and the residual stream. The FFN is the modality FFN
(``ModalityFFN``, same parameter names), so a modality-FFN checkpoint's FFNs carry over as
they are (``unimm.convert.mot``).

The final norm is per modality too (``UnimmModel.norm`` is a ``ModalityRMSNorm``): with it
a text-only input runs through text weights alone, so the text model can be frozen or kept
exactly while the vision copy trains (seed 000's MoT recipe), and BAGEL's MoT does the same
(a separate final norm for its generation expert). It costs one extra row of ``dim`` scales,
and it is no extra freedom for the heads: the LM head reads text positions and the flow
head visual ones.
"""

from __future__ import annotations

from functools import partial
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torchtitan.models.common.rope import ComplexRoPE
from torchtitan.protocols.module import Module

from unimm.masks import AttentionMask
from unimm.model.attention import LayerKVCache, attend, head_dim
from unimm.model.experts import ModalityRouting
from unimm.model.ffn import ModalityFFN
from unimm.model.init import depth_scaled_std

if TYPE_CHECKING:
    from unimm.model.transformer import UnimmModel

NUM_MODALITIES = 2  # TEXT = 0, VISION = 1 (unimm.data.batch)


def _trunc_normal(std: float):
    return partial(nn.init.trunc_normal_, mean=0.0, std=std, a=-3 * std, b=3 * std)


class ModalityRMSNorm(Module):
    """RMSNorm with one scale per modality: weight [2, D], row m for the tokens of modality m."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.empty(NUM_MODALITIES, dim))
        self._param_init = {"weight": nn.init.ones_}

    def forward(self, x_BLD: torch.Tensor, modality_BL: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x_BLD, (self.dim,), eps=self.eps) * self.weight[modality_BL]

    def inactive_params(self) -> int:
        return self.weight[0].numel()


class ModalityLinear(Module):
    """``x @ weight[m]`` for the tokens of modality m: weight [2, in, out], laid out for the
    grouped GEMM like ``ExpertWeights`` (the transpose of ``nn.Linear``'s weight)."""

    def __init__(self, in_features: int, out_features: int, std: float, backend: str = "auto"):
        super().__init__()
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(NUM_MODALITIES, in_features, out_features))
        self._param_init = {"weight": _trunc_normal(std)}

    def forward(self, x_TD: torch.Tensor, routing: ModalityRouting) -> torch.Tensor:
        return routing.linear(x_TD, self.weight, self.backend)

    def inactive_params(self) -> int:
        return self.weight[0].numel()


class ModalityAttention(Module):
    """Grouped-query attention whose q, k, v and output projections are the token's modality's;
    one attention (RoPE, hybrid mask, KV cache) over all tokens, as in ``Attention``."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, init_std: float, backend: str = "auto"):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        head = head_dim(dim, n_heads, n_kv_heads)
        self.wq = ModalityLinear(dim, n_heads * head, 0.02, backend)
        self.wk = ModalityLinear(dim, n_kv_heads * head, 0.02, backend)
        self.wv = ModalityLinear(dim, n_kv_heads * head, 0.02, backend)
        self.wo = ModalityLinear(n_heads * head, dim, init_std, backend)

    def forward(
        self,
        x_BLD: torch.Tensor,
        routing: ModalityRouting,
        rope: ComplexRoPE,
        positions_BL: torch.Tensor,
        mask: AttentionMask,
        kv_cache: LayerKVCache | None = None,
    ) -> torch.Tensor:
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(B * L, D)
        q = rearrange(self.wq(x_TD, routing), "(b l) (h k) -> b l h k", b=B, h=self.n_heads)
        k = rearrange(self.wk(x_TD, routing), "(b l) (h k) -> b l h k", b=B, h=self.n_kv_heads)
        v = rearrange(self.wv(x_TD, routing), "(b l) (h k) -> b h l k", b=B, h=self.n_kv_heads)
        q, k = rope(q, k, positions_BL)
        k = k.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.extend(k, v)
        out_BHLK = attend(q.transpose(1, 2), k, v, mask)
        out_TD = rearrange(out_BHLK, "b h l k -> (b l) (h k)")
        return self.wo(out_TD, routing).reshape(B, L, D)


class MoTBlock(Module):
    """A pre-norm block with every weight per modality; ``TransformerBlock``'s interface and
    parameter names (``attention_norm``, ``attention.w{q,k,v,o}``, ``ffn_norm``,
    ``feed_forward.experts.w{1,2,3}``), each a stack of two."""

    def __init__(self, layer_id: int, config: UnimmModel.Config):
        super().__init__()
        out_std = depth_scaled_std(layer_id)
        backend = config.ffn.backend
        self.attention_norm = ModalityRMSNorm(config.dim, config.norm_eps)
        self.attention = ModalityAttention(config.dim, config.n_heads, config.n_kv_heads, out_std, backend)
        self.ffn_norm = ModalityRMSNorm(config.dim, config.norm_eps)
        self.feed_forward = ModalityFFN(config.dim, config.ffn, out_std)

    # torchtitan's FSDP helper (apply_fsdp_to_decoder) gives the stacked weights of a "MoE"
    # block Shard(1) placement when there are more ranks than experts: every weight of a MoT
    # block is a stack of two, so all of them are its "experts".
    moe_enabled = True

    @property
    def moe(self) -> MoTBlock:
        return self

    @property
    def routed_experts(self) -> SimpleNamespace:
        return SimpleNamespace(inner_experts=SimpleNamespace(num_experts=NUM_MODALITIES, parameters=self.parameters))

    def forward(self, x_BLD, modality_BL, rope, positions_BL, mask: AttentionMask, kv_cache=None, valid_BL=None):
        """Same signature and outputs as ``TransformerBlock.forward`` (the balance loss is 0)."""
        routing = ModalityRouting.of(modality_BL)
        attn_BLD = self.attention(self.attention_norm(x_BLD, modality_BL), routing, rope, positions_BL, mask, kv_cache)
        x_BLD = x_BLD + attn_BLD
        x_BLD = x_BLD + self.feed_forward.run(self.ffn_norm(x_BLD, modality_BL), routing)
        return x_BLD, x_BLD.new_zeros(())
