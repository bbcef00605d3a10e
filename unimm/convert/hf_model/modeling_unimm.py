"""unimm for Hugging Face transformers: text generation and the flow head, without unimm.

Shipped inside every folder `unimm convert to-hf` writes and loaded with
``trust_remote_code=True``; it imports only torch and transformers. The computation is
unimm.model.transformer's, laid out under Llama's module names:

- input: text tokens through ``embed_tokens``; each visual latent patch through
  ``latent_proj`` plus an embedding of its flow time t (``modality`` says which is which);
  a dual-encoder model (``understanding_dim`` > 0) reads understanding (I->T) frames instead
  through ``understanding_proj`` of the understanding encoder's latents, with no time embedding
  (``understanding`` marks those positions);
- Llama-style pre-norm blocks: RMSNorm, RoPE (rotate-half layout), grouped-query attention,
  and a SwiGLU FFN that is shared, per modality, or a mixture of experts; or, as a Mixture
  of Transformers (``mot``), norms, attention projections and FFN all per modality under one
  global attention;
- two heads: ``lm_head`` (next text token) and ``flow_head`` (the flow-matching prediction
  for each visual patch).

``UnimmForCausalLM.forward`` and ``generate()`` are text-only. ``forward_flow`` runs a mixed
sequence under the hybrid attention mask (``hybrid_attention_mask``: causal text,
bidirectional inside each image or video frame) and returns both heads' outputs.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, ModelOutput

from .configuration_unimm import SHARED_EXPERT_MODES, UnimmConfig

TEXT, VISION = 0, 1

# transformers 5.24 renamed the generation cache from ``past_key_values`` to ``cache``: generate()
# passes ``cache=`` to forward and reads ``outputs["cache"]``; earlier versions use the old name on
# both sides. forward takes either and returns the field the installed version's outputs declare.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def either_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the generation cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else past_key_values


# -- masks and positions ---------------------------------------------------------------------


def hybrid_attention_mask(document_ids: torch.Tensor, frame_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, L, L] boolean mask of packed mixed rows: a query sees a key iff both lie in the
    same document and the key is not later or both belong to the same frame. document_ids and
    frame_ids are [B, L]; frame id -1 marks text."""
    idx = torch.arange(document_ids.shape[-1], device=document_ids.device)
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    query_frame = frame_ids[:, :, None]
    same_frame = (query_frame >= 0) & (query_frame == frame_ids[:, None, :])
    return (same_document & ((idx[None, :] <= idx[:, None]) | same_frame))[:, None]


def causal_attention_mask(
    padding_mask: torch.Tensor | None, query_len: int, past_len: int, kv_len: int, device
) -> torch.Tensor:
    """[B or 1, 1, q, kv_len] boolean mask for text: causal over cached and new positions, minus
    padding. A padding query keeps itself so that its softmax row is never empty.

    kv_len is how many keys the cache hands back: past + new for a dynamic cache, its whole
    preallocated length for a static one, whose empty slots lie after every query."""
    kv_pos = torch.arange(kv_len, device=device)
    q_pos = torch.arange(past_len, past_len + query_len, device=device)
    mask = (kv_pos[None, :] <= q_pos[:, None])[None]
    if padding_mask is not None:
        keys_BK = padding_mask[:, :kv_len].bool()
        # generate()'s padding mask covers past + new positions only; later slots are masked causally.
        keys_BK = torch.cat([keys_BK, keys_BK.new_ones(keys_BK.shape[0], kv_len - keys_BK.shape[1])], dim=1)
        mask = (mask & keys_BK[:, None]) | (kv_pos[None, :] == q_pos[:, None])
    return mask[:, None]


def default_positions(padding_mask: torch.Tensor | None, query_len: int, past_len: int, device) -> torch.Tensor:
    if padding_mask is None:
        return torch.arange(past_len, past_len + query_len, device=device)[None]
    # Left padding: each row's first real token is position 0, as in training.
    return (padding_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_len : past_len + query_len]


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, L, head_dim] in float32, from the frequencies unimm trains with."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    angles = position_ids[..., None].float() * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x_BHLK: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x = x_BHLK.float()
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos[:, None] + rotated * sin[:, None]).type_as(x_BHLK)


# -- blocks ------------------------------------------------------------------------------------


class UnimmAttention(nn.Module):
    def __init__(self, config: UnimmConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        dim = config.hidden_size
        self.q_proj = self.projection(dim, self.n_heads * self.head_dim)
        self.k_proj = self.projection(dim, self.n_kv_heads * self.head_dim)
        self.v_proj = self.projection(dim, self.n_kv_heads * self.head_dim)
        self.o_proj = self.projection(self.n_heads * self.head_dim, dim)

    def projection(self, in_features: int, out_features: int) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False)

    def project(self, proj: nn.Module, x_BLD: torch.Tensor, modality_BL: torch.Tensor) -> torch.Tensor:
        return proj(x_BLD)

    def forward(self, x_BLD, modality_BL, cos, sin, mask_for_keys, cache: Cache | None, cache_position) -> torch.Tensor:
        """mask_for_keys(kv_len): the [B or 1, 1, L, kv_len] mask for the keys the cache returns."""
        B, L, _ = x_BLD.shape
        q = self.project(self.q_proj, x_BLD, modality_BL).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.project(self.k_proj, x_BLD, modality_BL).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.project(self.v_proj, x_BLD, modality_BL).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # transformers < 5 writes a static cache at cache_kwargs["cache_position"] (slot 0
            # without it); 5.x counts for itself and ignores the extra argument.
            k, v = cache.update(k, v, self.layer_idx, {"cache_position": cache_position})
        out_BHLK = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_for_keys(k.shape[-2]), enable_gqa=True)
        return self.project(self.o_proj, out_BHLK.transpose(1, 2).reshape(B, L, -1), modality_BL)


class UnimmMLP(nn.Module):
    """ffn_kind "shared": one SwiGLU FFN for every token."""

    def __init__(self, config: UnimmConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x_BLD: torch.Tensor, modality_BL: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x_BLD)) * self.up_proj(x_BLD))


class UnimmExperts(nn.Module):
    """Stacked SwiGLU experts laid out for ``x @ w[e]``: gate_proj, up_proj [E, D, H];
    down_proj [E, H, D]."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.up_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))

    def forward(self, x_TD: torch.Tensor, experts_Tk: torch.Tensor, weights_Tk: torch.Tensor) -> torch.Tensor:
        """Sum over each token's k experts of weight * expert(x); experts taken in ascending
        order, the order in which unimm's grouped GEMM accumulates them."""
        out_TD = torch.zeros_like(x_TD)
        for e in experts_Tk.unique().tolist():
            token, slot = (experts_Tk == e).nonzero(as_tuple=True)
            x = x_TD[token]
            y = (F.silu(x @ self.gate_proj[e]) * (x @ self.up_proj[e])) @ self.down_proj[e]
            out_TD.index_add_(0, token, y * weights_Tk[token, slot, None].to(y.dtype))
        return out_TD


class UnimmModalityMLP(nn.Module):
    """ffn_kind "modality": expert 0 runs the text tokens, expert 1 the visual ones."""

    def __init__(self, config: UnimmConfig):
        super().__init__()
        self.experts = UnimmExperts(2, config.hidden_size, config.intermediate_size)

    def forward(self, x_BLD: torch.Tensor, modality_BL: torch.Tensor) -> torch.Tensor:
        B, L, D = x_BLD.shape
        expert_T1 = modality_BL.reshape(-1, 1)
        ones_T1 = torch.ones(expert_T1.shape, dtype=x_BLD.dtype, device=x_BLD.device)
        return self.experts(x_BLD.reshape(-1, D), expert_T1, ones_T1).reshape(B, L, D)


class UnimmRouter(nn.Module):
    def __init__(self, dim: int, num_routed: int, score_func: str):
        super().__init__()
        self.score_func = score_func
        self.gate = nn.Linear(dim, num_routed, bias=False)
        # Learned by load balancing during training: shifts which experts are picked, never
        # their mixing weights.
        self.register_buffer("expert_bias", torch.zeros(num_routed))

    def forward(self, x_TD: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x_TD).float()
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        _, experts_Tk = torch.topk(scores + self.expert_bias, top_k, dim=-1)
        weights_Tk = scores.gather(-1, experts_Tk)
        if self.score_func == "sigmoid":
            weights_Tk = weights_Tk / weights_Tk.sum(-1, keepdim=True)
        return experts_Tk, weights_Tk


class UnimmMoE(nn.Module):
    """ffn_kind "moe": shared experts come first (weight 1: "global" expert 0 for every token,
    "per_modality" expert 0 for text and 1 for vision), then the router's top picks."""

    def __init__(self, config: UnimmConfig):
        super().__init__()
        self.num_shared = SHARED_EXPERT_MODES[config.shared_experts]
        self.routed_top_k = config.num_experts_per_tok - min(self.num_shared, 1)
        self.router = UnimmRouter(config.hidden_size, config.num_experts - self.num_shared, config.router_score_func)
        self.experts = UnimmExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size)

    def forward(self, x_BLD: torch.Tensor, modality_BL: torch.Tensor) -> torch.Tensor:
        B, L, D = x_BLD.shape
        x_TD = x_BLD.reshape(-1, D)
        experts_Tk, weights_Tk = self.router(x_TD, self.routed_top_k)
        experts_Tk = experts_Tk + self.num_shared
        if self.num_shared:
            if self.num_shared == 2:
                shared_T1 = (modality_BL.reshape(-1, 1) == VISION).long()
            else:
                shared_T1 = torch.zeros_like(experts_Tk[:, :1])
            experts_Tk = torch.cat([shared_T1, experts_Tk], dim=1)
            weights_Tk = torch.cat([torch.ones_like(weights_Tk[:, :1]), weights_Tk], dim=1)
        return self.experts(x_TD, experts_Tk, weights_Tk).reshape(B, L, D)


MLP_CLASSES = {"shared": UnimmMLP, "modality": UnimmModalityMLP, "moe": UnimmMoE, "mot": UnimmModalityMLP}


class UnimmDecoderLayer(nn.Module):
    def __init__(self, config: UnimmConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = UnimmAttention(config, layer_idx)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MLP_CLASSES[config.ffn_kind](config)

    def forward(self, h_BLD, modality_BL, cos, sin, mask_for_keys, cache, cache_position) -> torch.Tensor:
        h_BLD = h_BLD + self.self_attn(
            self.input_layernorm(h_BLD), modality_BL, cos, sin, mask_for_keys, cache, cache_position
        )
        return h_BLD + self.mlp(self.post_attention_layernorm(h_BLD), modality_BL)


# -- Mixture of Transformers (ffn_kind "mot") ---------------------------------------------------
# Every weight of a block is a stack of two, row 0 for text positions and row 1 for visual ones:
# norms [2, D], attention projections [2, in, out] (``x @ w[m]``, like the experts), the FFN the
# modality MLP's; the queries, keys and values of all positions meet in one attention.


class UnimmModalityRMSNorm(nn.Module):
    """RMSNorm with one scale per modality: weight [2, D]."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(2, dim))

    def forward(self, x_BLD: torch.Tensor, modality_BL: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x_BLD, (x_BLD.shape[-1],), eps=self.eps) * self.weight[modality_BL]


class UnimmModalityLinear(nn.Module):
    """``x @ weight[m]`` at the positions of modality m: weight [2, in, out]."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(2, in_features, out_features))

    def forward(self, x_BLD: torch.Tensor, modality_BL: torch.Tensor) -> torch.Tensor:
        out = x_BLD.new_zeros(*x_BLD.shape[:-1], self.weight.shape[-1])
        for m in (TEXT, VISION):
            rows = modality_BL == m
            out[rows] = x_BLD[rows] @ self.weight[m]
        return out


class UnimmMoTAttention(UnimmAttention):
    """UnimmAttention with each position's q, k, v and o projections its modality's."""

    def projection(self, in_features: int, out_features: int) -> nn.Module:
        return UnimmModalityLinear(in_features, out_features)

    def project(self, proj: nn.Module, x_BLD: torch.Tensor, modality_BL: torch.Tensor) -> torch.Tensor:
        return proj(x_BLD, modality_BL)


class UnimmMoTDecoderLayer(nn.Module):
    """UnimmDecoderLayer with per-modality norms, attention projections and FFN."""

    def __init__(self, config: UnimmConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = UnimmModalityRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = UnimmMoTAttention(config, layer_idx)
        self.post_attention_layernorm = UnimmModalityRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP_CLASSES[config.ffn_kind](config)

    def forward(self, h_BLD, modality_BL, cos, sin, mask_for_keys, cache, cache_position) -> torch.Tensor:
        attn_BLD = self.self_attn(
            self.input_layernorm(h_BLD, modality_BL), modality_BL, cos, sin, mask_for_keys, cache, cache_position
        )
        h_BLD = h_BLD + attn_BLD
        return h_BLD + self.mlp(self.post_attention_layernorm(h_BLD, modality_BL), modality_BL)


DECODER_LAYER_CLASSES = {"mot": UnimmMoTDecoderLayer}
"""Decoder layers other than UnimmDecoderLayer, by ffn_kind."""


class UnimmTimestepEmbedding(nn.Module):
    """Sinusoidal features of the flow time t in [0, 1], then a small MLP to the model width."""

    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp_in = nn.Linear(freq_dim, freq_dim)
        self.mlp_out = nn.Linear(freq_dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / half)
        angles = 1000.0 * t.float()[..., None] * freqs
        features = torch.cat([angles.cos(), angles.sin()], dim=-1).to(self.mlp_in.weight.dtype)
        return self.mlp_out(F.silu(self.mlp_in(features)))


# -- models ------------------------------------------------------------------------------------


class UnimmPreTrainedModel(PreTrainedModel):
    config_class = UnimmConfig
    base_model_prefix = "model"
    _no_split_modules = ["UnimmDecoderLayer", "UnimmMoTDecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, (UnimmExperts, UnimmModalityLinear)):
            for weight in module.parameters(recurse=False):
                nn.init.normal_(weight, std=self.config.initializer_range)
        elif isinstance(module, UnimmRouter):
            nn.init.zeros_(module.expert_bias)


class UnimmModel(UnimmPreTrainedModel):
    """The decoder without heads: final normed hidden states [B, L, D]."""

    def __init__(self, config: UnimmConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.latent_proj = nn.Linear(config.latent_dim, config.hidden_size)
        self.time_embedding = UnimmTimestepEmbedding(config.time_freq_dim, config.hidden_size)
        if getattr(config, "understanding_dim", 0):  # dual encoder: a second input projection
            self.understanding_proj = nn.Linear(config.understanding_dim, config.hidden_size)
        layer_class = DECODER_LAYER_CLASSES.get(config.ffn_kind, UnimmDecoderLayer)
        self.layers = nn.ModuleList(layer_class(config, i) for i in range(config.num_hidden_layers))
        if config.ffn_kind == "mot":  # the final norm per modality too
            self.norm = UnimmModalityRMSNorm(config.hidden_size, config.rms_norm_eps)
        else:
            self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_init()

    def embed(self, input_ids, latents, timesteps, modality, understanding=None, understanding_latents=None):
        """Text: token embedding; visual: ``latent_proj`` of the (noisy) latent plus its time
        embedding; dual encoder: at ``understanding`` positions instead ``understanding_proj``
        of ``understanding_latents`` alone (clean frames off the flow path: no time)."""
        h_BLD = self.embed_tokens(input_ids)
        dtype = h_BLD.dtype
        if latents is not None:
            vision_BLD = self.latent_proj(latents.to(dtype)) + self.time_embedding(timesteps)
            h_BLD = torch.where((modality == VISION)[..., None], vision_BLD, h_BLD)
        if understanding is None:
            return h_BLD
        if not hasattr(self, "understanding_proj"):
            raise ValueError("understanding latents given to a model without understanding_proj (understanding_dim 0)")
        if understanding_latents is None:
            raise ValueError("an understanding mask needs its understanding_latents [B, L, understanding_dim]")
        understanding_BLD = self.understanding_proj(understanding_latents.to(dtype))
        return torch.where(understanding.bool()[..., None], understanding_BLD, h_BLD)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        latents: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        modality: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        understanding: torch.Tensor | None = None,
        understanding_latents: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """input_ids [B, L]; for mixed rows also latents [B, L, latent_dim], timesteps [B, L]
        (t of each visual position's frame) and modality [B, L] (0 text, 1 vision); for a
        dual-encoder model's understanding frames also ``understanding`` [B, L] (bool, True at
        those visual positions) and ``understanding_latents`` [B, L, understanding_dim].
        attention_mask: a [B, L] padding mask (1 = token) for text, or a [B, 1, L, L] boolean
        mask such as ``hybrid_attention_mask(...)`` for mixed rows. position_ids default to
        0, 1, ... per row (pass per-document positions for packed rows). The cache is taken
        as ``cache`` or ``past_key_values`` (see CACHE_NAME)."""
        cache = either_cache(cache, past_key_values)
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, latents, timesteps, modality, understanding, understanding_latents)
        h_BLD = inputs_embeds
        B, L, _ = h_BLD.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        # int(): a static cache counts its tokens in a tensor.
        past_len = int(cache.get_seq_length()) if cache is not None else 0
        limit = self.config.max_position_embeddings
        if past_len + L > limit:
            # unimm trains no longer row, and its own model refuses positions past its RoPE table.
            raise ValueError(
                f"{past_len + L} positions ({past_len} cached + {L} new) exceed the model's "
                f"max_seq_len={limit} (max_position_embeddings in config.json); shorten the input "
                "or max_new_tokens"
            )
        if modality is None:
            modality = torch.full((B, L), TEXT, dtype=torch.long, device=h_BLD.device)
        padding_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        masks = {}

        def mask_for_keys(kv_len: int) -> torch.Tensor:
            # Built once, when the first layer's cache update says how many keys there are.
            if kv_len not in masks:
                if attention_mask is not None and attention_mask.dim() == 4:
                    masks[kv_len] = attention_mask.bool()
                else:
                    masks[kv_len] = causal_attention_mask(padding_mask, L, past_len, kv_len, h_BLD.device)
            return masks[kv_len]

        if position_ids is None:
            position_ids = default_positions(padding_mask, L, past_len, h_BLD.device)
        cache_position = torch.arange(past_len, past_len + L, device=h_BLD.device)
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        cos, sin = rope_cos_sin(position_ids, head_dim, self.config.rope_theta)
        for layer in self.layers:
            h_BLD = layer(h_BLD, modality, cos, sin, mask_for_keys, cache, cache_position)
        h_BLD = self.norm(h_BLD, modality) if isinstance(self.norm, UnimmModalityRMSNorm) else self.norm(h_BLD)
        return BaseModelOutputWithPast(last_hidden_state=h_BLD, **{CACHE_NAME: cache if use_cache else None})


@dataclass
class UnimmFlowOutput(ModelOutput):
    """Both heads at every position: read ``logits`` at text positions and ``flow`` (the
    flow-matching prediction, velocity or clean latent as trained) at visual ones."""

    logits: torch.FloatTensor | None = None
    flow: torch.FloatTensor | None = None


class UnimmForCausalLM(UnimmPreTrainedModel, GenerationMixin):
    # The mask forward_flow expects, reachable from a model loaded with trust_remote_code.
    hybrid_attention_mask = staticmethod(hybrid_attention_mask)

    def __init__(self, config: UnimmConfig):
        super().__init__(config)
        self.model = UnimmModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.flow_head = nn.Linear(config.hidden_size, config.latent_dim)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Text next-token logits [B, L, V] (the last ``logits_to_keep`` positions if > 0)."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=either_cache(cache, past_key_values),
            use_cache=use_cache,
            inputs_embeds=inputs_embeds,
        )
        h_BLD = out.last_hidden_state
        logits = self.lm_head(h_BLD[:, -logits_to_keep:] if logits_to_keep else h_BLD)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_NAME: getattr(out, CACHE_NAME)})

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """generate() calls this to build a 4D mask in advance for a static cache; its own would
        follow config._attn_implementation (an additive float mask for eager, a BlockMask for
        flex). forward builds the boolean one it needs from the [B, L] padding mask instead."""
        return attention_mask

    def forward_flow(
        self,
        input_ids: torch.LongTensor,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        modality: torch.LongTensor,
        attention_mask: torch.Tensor,
        position_ids: torch.LongTensor | None = None,
        understanding_latents: torch.Tensor | None = None,
        understanding: torch.Tensor | None = None,
    ) -> UnimmFlowOutput:
        """A mixed row (text tokens and noisy latent patches at flow time t) under a [B, 1, L, L]
        mask such as ``hybrid_attention_mask(document_ids, frame_ids)``; see UnimmModel.forward
        for the shapes. Dual encoder: ``understanding`` [B, L] marks the visual positions of
        understanding (I->T) frames, read from ``understanding_latents`` [B, L, understanding_dim]
        (their ``latents`` and ``timesteps`` are not used; the flow there predicts nothing)."""
        h_BLD = self.model(
            input_ids=input_ids,
            latents=latents,
            timesteps=timesteps,
            modality=modality,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            understanding=understanding,
            understanding_latents=understanding_latents,
        ).last_hidden_state
        return UnimmFlowOutput(logits=self.lm_head(h_BLD), flow=self.flow_head(h_BLD))
