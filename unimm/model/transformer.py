"""The unified decoder: one transformer over text tokens and visual latent patches.

Read top to bottom: inputs are embedded per modality (token embedding for text; a linear
projection of the noisy latent plus a timestep embedding for visual patches), pass through
Llama-style pre-norm blocks under the hybrid mask, and leave through two heads: the LM head
at text positions and a linear flow head at visual positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
import torch.nn as nn
from torchtitan.models.common.embedding import Embedding
from torchtitan.models.common.linear import Linear
from torchtitan.models.common.rope import ComplexRoPE
from torchtitan.protocols.model import BaseModel
from torchtitan.protocols.module import Module, ModuleDict

from unimm.data.batch import VISION
from unimm.errors import ConfigError
from unimm.masks import AttentionMask, MaskBackend
from unimm.model.attention import Attention
from unimm.model.ffn import FFNConfig, build_ffn
from unimm.model.init import depth_scaled_std, linear_init, rms_norm
from unimm.model.mot import ModalityRMSNorm, MoTBlock


class TimestepEmbedding(Module):
    """Sinusoidal features of the flow time t in [0, 1], then a small MLP to the model width."""

    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp_in = linear_init(freq_dim, freq_dim, std=0.02, bias=True)
        self.mlp_out = linear_init(freq_dim, dim, std=0.02, bias=True)

    def features(self, t: torch.Tensor) -> torch.Tensor:
        """[cos(1000 t f_i), sin(1000 t f_i)] with f_i = 10000^(-i / half), i < half = freq_dim / 2."""
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / half)
        # Scale t to [0, 1000] so the low frequencies still resolve small steps of t.
        angles = 1000.0 * t.float()[..., None] * freqs
        return torch.cat([angles.cos(), angles.sin()], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = self.features(t).to(self.mlp_in.weight.dtype)
        return self.mlp_out(nn.functional.silu(self.mlp_in(features)))


class LMHead(Linear):
    """The LM head: ``head(h_ND)`` gives logits; ``head(h_ND, loss)`` gives
    ``loss(h_ND, weight, bias)`` instead (a chunked cross-entropy, unimm.losses), inside this
    one forward call, so FSDP gathers the weight once and the full logits never exist."""

    @dataclass(kw_only=True, slots=True)
    class Config(Linear.Config):
        pass

    def forward(self, h_ND: torch.Tensor, loss: Callable | None = None) -> torch.Tensor:
        if loss is None:
            return super().forward(h_ND)
        return loss(h_ND, self.weight, self.bias)


class TransformerBlock(Module):
    def __init__(self, layer_id: int, config: "UnimmModel.Config"):
        super().__init__()
        out_std = depth_scaled_std(layer_id)
        self.attention_norm = rms_norm(config.dim, config.norm_eps)
        self.attention = Attention(config.dim, config.n_heads, config.n_kv_heads, out_std)
        self.ffn_norm = rms_norm(config.dim, config.norm_eps)
        self.feed_forward = build_ffn(config.dim, config.ffn, out_std)

    # torchtitan's FSDP helper gives stacked expert weights (MoE, modality FFN) their own
    # shard placement and, under expert parallelism, their own mesh; it looks for them here.
    @property
    def moe_enabled(self) -> bool:
        return hasattr(self.feed_forward, "routed_experts")

    @property
    def moe(self) -> Module:
        return self.feed_forward

    def forward(self, x_BLD, modality_BL, rope, positions_BL, mask: AttentionMask, kv_cache=None, valid_BL=None):
        """Return the block's output and its FFN's load-balancing loss (0 when not routed);
        ``valid_BL`` False at padding (left out of the balance loss and the load counters)."""
        x_BLD = x_BLD + self.attention(self.attention_norm(x_BLD), rope, positions_BL, mask, kv_cache)
        ffn_BLD, balance = self.feed_forward(self.ffn_norm(x_BLD), modality_BL, valid_BL)
        return x_BLD + ffn_BLD, balance


class UnimmModel(BaseModel):
    @dataclass(kw_only=True, slots=True)
    class Config(BaseModel.Config):
        vocab_size: int = 128_256
        dim: int = 2048
        n_layers: int = 16
        n_heads: int = 32
        n_kv_heads: int = 8
        ffn: FFNConfig = field(default_factory=FFNConfig)
        norm_eps: float = 1e-5
        rope_theta: float = 500_000.0
        max_seq_len: int = 4096
        """Longest packed row the model holds (the RoPE table is built to this length)."""
        latent_dim: int = 1152
        """Width of one visual latent patch from the frozen encoder (SigLIP 2 So400m: 1152)."""
        understanding_dim: int = 0
        """Dual encoder (paper §6.3, as in Janus and Bagel): width of the understanding encoder's
        latents (SigLIP 2 So400m: 1152, beside SD-VAE's 16 as ``latent_dim``), read through a
        second input projection ``understanding_proj`` at understanding (I->T) frames; 0: one encoder."""
        time_freq_dim: int = 256
        attn_backend: Literal["auto", "flex", "sdpa"] = "auto"
        """``auto``: FlexAttention on CUDA, dense mask + SDPA elsewhere (no flex backward on CPU)."""

        def update_from_config(self, *, config, **kwargs) -> None:
            seq_len = config.training.seq_len
            if seq_len > self.max_seq_len:
                raise ConfigError(
                    f"training.seq_len={seq_len} exceeds the model's max_seq_len={self.max_seq_len}; "
                    "lower --training.seq_len or raise the recipe's max_seq_len"
                )

        def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
            """Total parameters and the exact training FLOPs of an average position (MFU).

            torchtitan passes no batch, so the attention term uses a typical packed row
            (``unimm.flops.TYPICAL_MIX``); the count itself is ``unimm.flops``'s.
            """
            from unimm.flops import TYPICAL_MIX, model_flops
            from unimm.model.params import count_params

            flops = model_flops(model).per_token(TYPICAL_MIX, seq_len)
            return count_params(model).total, round(flops.mean)

        def mask_backend(self, device: torch.device) -> MaskBackend:
            if self.attn_backend == "auto":
                return "flex" if device.type == "cuda" else "sdpa"
            return self.attn_backend

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.tok_embeddings = Embedding.Config(
            num_embeddings=config.vocab_size,
            embedding_dim=config.dim,
            param_init={"weight": nn.init.normal_},
        ).build()
        self.latent_proj = linear_init(config.latent_dim, config.dim, std=0.02, bias=True)
        if config.understanding_dim:  # dual encoder: understanding frames come in through their own projection
            self.understanding_proj = linear_init(config.understanding_dim, config.dim, std=0.02, bias=True)
        self.time_embedding = TimestepEmbedding(config.time_freq_dim, config.dim)
        self.rope = ComplexRoPE.Config(
            dim=config.dim // config.n_heads, max_seq_len=config.max_seq_len, theta=config.rope_theta
        ).build()
        # ffn.kind "mot": Mixture of Transformers, every block and the final norm per modality
        mot = config.ffn.kind == "mot"
        block = MoTBlock if mot else TransformerBlock
        self.layers = ModuleDict({str(i): block(i, config) for i in range(config.n_layers)})
        self.norm = ModalityRMSNorm(config.dim, config.norm_eps) if mot else rms_norm(config.dim, config.norm_eps)
        head_std = config.dim**-0.5  # as linear_init's truncated normal
        self.lm_head = LMHead.Config(
            in_features=config.dim, out_features=config.vocab_size,
            param_init={"weight": partial(nn.init.trunc_normal_, mean=0.0, std=head_std, a=-3 * head_std, b=3 * head_std)},
        ).build()
        # Zero-initialised like a DiT's final layer: training starts from predicting zero.
        self.flow_head = linear_init(config.dim, config.latent_dim, std=0.0, bias=True)

    # torchtitan's FSDP helper groups these two with the final norm when weights are tied.
    enable_weight_tying = False

    def embed(
        self, tokens_BL, latents_BLC, t_BL, modality_BL, understanding_BL=None, understanding_latents_BLC=None
    ) -> torch.Tensor:
        """Text: token embedding; visual: ``latent_proj`` of the (noisy) latent plus its time
        embedding. Dual encoder: at ``understanding_BL`` positions instead ``understanding_proj``
        of ``understanding_latents_BLC`` alone (clean frames off the flow path: no time)."""
        text_BLD = self.tok_embeddings(tokens_BL)
        vision_BLD = self.latent_proj(latents_BLC.to(text_BLD.dtype)) + self.time_embedding(t_BL)
        h_BLD = torch.where((modality_BL == VISION)[..., None], vision_BLD, text_BLD)
        if understanding_BL is None:
            return h_BLD
        if not self.config.understanding_dim:
            raise ConfigError("understanding latents given to a model without understanding_proj (understanding_dim 0)")
        understanding_BLD = self.understanding_proj(understanding_latents_BLC.to(text_BLD.dtype))
        return torch.where(understanding_BL[..., None], understanding_BLD, h_BLD)

    def hidden_states(
        self, tokens_BL, latents_BLC, t_BL, modality_BL, positions_BL, mask, kv_caches=None, valid_BL=None,
        understanding_BL=None, understanding_latents_BLC=None,
    ):
        """Final normed hidden states [B, L, D] and the per-layer balance losses [n_layers].
        ``kv_caches``: one ``LayerKVCache`` per layer when generating incrementally;
        ``valid_BL``: False at padding (``unimm.data.batch.padding_mask``), None: no padding."""
        h_BLD = self.embed(tokens_BL, latents_BLC, t_BL, modality_BL, understanding_BL, understanding_latents_BLC)
        balance = []
        for i, layer in enumerate(self.layers.values()):
            kv_cache = None if kv_caches is None else kv_caches[i]
            h_BLD, layer_balance = layer(h_BLD, modality_BL, self.rope, positions_BL, mask, kv_cache, valid_BL)
            balance.append(layer_balance)
        h_BLD = self.norm(h_BLD, modality_BL) if isinstance(self.norm, ModalityRMSNorm) else self.norm(h_BLD)
        return h_BLD, torch.stack(balance)

    def forward(
        self,
        tokens_BL: torch.Tensor,
        latents_BLC: torch.Tensor,
        t_BL: torch.Tensor,
        modality_BL: torch.Tensor,
        positions_BL: torch.Tensor,
        attention_mask: AttentionMask,
        lm_positions_BL: torch.Tensor,
        flow_positions_BL: torch.Tensor,
        valid_BL: torch.Tensor | None = None,
        understanding: torch.Tensor | None = None,
        understanding_latents: torch.Tensor | None = None,
        lm_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return LM logits at ``lm_positions`` [N_text, V], flow predictions at
        ``flow_positions`` [N_vis, C] (heads run only where a loss or a sample needs them),
        and each layer's router balance loss [n_layers] (zeros for unrouted FFNs), taken
        over the ``valid_BL`` positions (False at padding; None: all). Dual encoder: the batch's
        ``understanding`` [B, L] and ``understanding_latents`` [B, L, C_u] (unimm.data.batch).

        Positions are boolean [B, L] masks, or int64 index tensors of flat positions
        ``b * L + l`` (unimm.data.wire), which gather rows without waiting for the device to
        count them (a boolean mask does). ``lm_loss(h_ND, weight, bias)``: the LM loss from the
        hidden rows at ``lm_positions`` and the LM head's parameters, returned in place of the
        logits (``LMHead``), so that a chunked cross-entropy (unimm.losses) runs where the
        head's weights are gathered and the full logits never exist."""
        h_BLD, balance = self.hidden_states(
            tokens_BL, latents_BLC, t_BL, modality_BL, positions_BL, attention_mask, valid_BL=valid_BL,
            understanding_BL=understanding, understanding_latents_BLC=understanding_latents,
        )
        h_lm_ND = rows_at(h_BLD, lm_positions_BL)
        lm = self.lm_head(h_lm_ND) if lm_loss is None else self.lm_head(h_lm_ND, lm_loss)
        return lm, self.flow_head(rows_at(h_BLD, flow_positions_BL)), balance


def rows_at(x_BLD: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rows [N, D] of ``x_BLD`` at a boolean [B, L] mask or at int64 flat indices [N]."""
    if positions.dtype == torch.bool:
        return x_BLD[positions]
    return x_BLD.flatten(0, 1).index_select(0, positions)
