"""Grouped-query self-attention with RoPE over packed positions and the hybrid mask."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torchtitan.models.common.attention import FlexAttention
from torchtitan.models.common.rope import ComplexRoPE
from torchtitan.protocols.module import Module

from unimm.masks import AttentionMask
from unimm.model.init import linear_init


def flex_inductor_options() -> dict:
    """torchtitan's Inductor options for FlexAttention (``FlexAttention.inductor_configs``:
    autotuned block-sparse kernels, no CUDA graphs), less any the installed torch lacks."""
    import torch._inductor.config as inductor_config

    def known(key: str) -> bool:
        node = inductor_config
        for part in key.split("."):
            if not hasattr(node, part):
                return False
            node = getattr(node, part)
        return True

    return {k: v for k, v in FlexAttention.inductor_configs.items() if known(k)}


@functools.cache
def _compiled_flex_attention():
    # Eager flex_attention materialises the full score matrix; compiled, it is the fused
    # block-sparse kernel. Compiled once per process, the way torchtitan compiles its own.
    return torch.compile(flex_attention, options=flex_inductor_options())


def attend(q_BHLK, k_BHLK, v_BHLK, mask: AttentionMask) -> torch.Tensor:
    if isinstance(mask, BlockMask):
        flex = _compiled_flex_attention() if q_BHLK.is_cuda else flex_attention
        return flex(q_BHLK, k_BHLK, v_BHLK, block_mask=mask, enable_gqa=True)
    return F.scaled_dot_product_attention(q_BHLK, k_BHLK, v_BHLK, attn_mask=mask, enable_gqa=True)


def head_dim(dim: int, n_heads: int, n_kv_heads: int) -> int:
    """The width of one head of a grouped-query attention; a ValueError if the sizes do not split."""
    if dim % n_heads or n_heads % n_kv_heads:
        raise ValueError(f"dim ({dim}) must divide by n_heads ({n_heads}) and n_heads by n_kv_heads ({n_kv_heads})")
    return dim // n_heads


class Attention(Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, init_std: float):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        head = head_dim(dim, n_heads, n_kv_heads)
        self.wq = linear_init(dim, n_heads * head, std=0.02)
        self.wk = linear_init(dim, n_kv_heads * head, std=0.02)
        self.wv = linear_init(dim, n_kv_heads * head, std=0.02)
        self.wo = linear_init(n_heads * head, dim, std=init_std)

    def forward(
        self,
        x_BLD: torch.Tensor,
        rope: ComplexRoPE,
        positions_BL: torch.Tensor,
        mask: AttentionMask,
        kv_cache: "LayerKVCache | None" = None,
    ) -> torch.Tensor:
        """With ``kv_cache`` (generation), keys and values of earlier positions come from the
        cache and ``mask`` is [B, 1, new, cached + new]."""
        q = rearrange(self.wq(x_BLD), "b l (h k) -> b l h k", h=self.n_heads)
        k = rearrange(self.wk(x_BLD), "b l (h k) -> b l h k", h=self.n_kv_heads)
        v = rearrange(self.wv(x_BLD), "b l (h k) -> b h l k", h=self.n_kv_heads)
        q, k = rope(q, k, positions_BL)
        k = k.transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.extend(k, v)
        out_BHLK = attend(q.transpose(1, 2), k, v, mask)
        return self.wo(rearrange(out_BHLK, "b h l k -> b l (h k)"))


class LayerKVCache:
    """Keys and values [B, H_kv, S, K] of the positions generated so far, for one layer.

    ``commit`` is False while a frame is being denoised: each Euler step attends to the
    cache plus the current noisy frame, and only the finished frame is kept.
    """

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.commit = True

    def extend(self, k_new: torch.Tensor, v_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = k_new if self.k is None else torch.cat([self.k, k_new], dim=2)
        v = v_new if self.v is None else torch.cat([self.v, v_new], dim=2)
        if self.commit:
            self.k, self.v = k, v
        return k, v

