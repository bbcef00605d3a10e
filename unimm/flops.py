"""Training FLOPs per token of a model: every matmul, and attention at the mask's real density.

Conventions (the ones behind C = 6ND, so the exact count and 6ND differ only in *what* they
count, never in how):

- a matmul with a ``k x m`` weight costs ``2km`` FLOPs per position forward and twice that
  backward (input and weight gradients): 6 FLOPs per weight and position in training;
- the token embedding is a lookup and costs nothing; norms, activations, RoPE, softmax and
  biases are O(d) per position against O(d^2) for the matmuls and are left out;
- every position runs each layer's attention projections and the *active* FFN weights: all
  of them minus the FFN's ``inactive_params()`` (the other modality's FFN, the experts a MoE
  token is not routed to; a router is a matmul every token runs); in a Mixture of
  Transformers, its own modality's attention projections too;
- the LM head runs at positions with a next-token target, the latent projection and timestep
  MLP at visual positions, the flow head at noised visual positions. A dual encoder's
  understanding frames (visual positions of I->T images) run its ``understanding_proj``
  instead of the latent projection and timestep MLP. (The model computes each visual input
  projection at every position and then selects; that waste is not counted);
- attention scores and values: for every (query, key) pair the mask allows, ``q.k`` and
  ``p.v`` cost ``2 * n_heads * head_dim`` each forward, ``12 * n_heads * head_dim`` per layer in
  training. How many pairs a packed row allows (the mask's density) depends on the data: it is
  measured on a batch (:func:`measure_mix`) or given. Kernels may compute more (dense SDPA
  computes all L^2 pairs, FlexAttention every pair of a partly masked block); this count is
  the useful work, which is what an MFU should divide by.

Positions are all positions of packed rows, padding included (padding runs through the
backbone like text, and the trainer's token count includes it too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from unimm.data.batch import IGNORE_INDEX, VISION
from unimm.masks import build_attention_mask
from unimm.model.params import count_params, inactive_params

FLOPS_PER_WEIGHT = 6  # 2 forward + 4 backward per weight and position
ATTENTION_FLOPS_PER_WIDTH = 12  # (q.k + p.v) x 2 FLOPs x 3 (forward + backward), per query width


@dataclass(frozen=True)
class PositionMix:
    """What a packed batch looks like to the FLOP count, as fractions of its positions."""

    vision: float
    """Positions holding a visual latent patch, understanding frames included."""
    lm_targets: float
    """Positions with a next-token target (LM head)."""
    denoised: float
    """Visual positions trained with the flow loss (flow head)."""
    text_density: float
    """Mean number of keys a text query may attend to, over the row length."""
    vision_density: float
    """The same for a visual query (a frame sees all of itself, so this is higher)."""
    understanding: float = 0.0
    """The part of ``vision`` in a dual encoder's understanding frames (``understanding_proj``
    instead of the latent projection and timestep MLP); 0 for single-encoder data."""

    @property
    def attention_density(self) -> float:
        """Fraction of all (query, key) pairs the mask allows."""
        return (1.0 - self.vision) * self.text_density + self.vision * self.vision_density


# A typical packed row, for torchtitan's MFU, which knows the model and seq_len but not the data.
# Position shares follow the paper mixture's token shares (App. E.8: 50% text, 25% video, 22.5%
# image-text): ~45% of positions are visual, and all of them are noised (App. B: every frame,
# conditioning frames included, gets its own t and a flow loss), ~50% carry a next-token target. The densities are `measure_mix` on
# debug_cpu's procedural mixture at 256 positions (batches of 16 rows: text 0.23-0.26, vision
# 0.23-0.32), rounded: packing several documents per row makes the mask much sparser than
# causal (0.5), and a frame's queries see their whole frame. At 4096 positions web documents
# are longer but rows also hold more of them; measure real shards with `measure_mix` when it
# matters. At the paper's size the attention term is under 10% of the count, so the choice
# moves MFU by a few percent.
TYPICAL_MIX = PositionMix(vision=0.45, lm_targets=0.5, denoised=0.45, text_density=0.25, vision_density=0.3)


@dataclass(frozen=True)
class TokenFlops:
    """Training FLOPs of one position, exact, beside the paper's planning rule."""

    text: float
    """A text position with a target, at the mix's text attention density."""
    vision: float
    """A noised visual position, at the mix's visual attention density."""
    mean: float
    """The average position of the mix: the exact count to multiply by tokens."""
    six_n: float
    """6 N with N the active parameters (paper Table 5 convention): C = 6ND."""


@dataclass(frozen=True)
class ModelFlops:
    """Training FLOPs of one position through each part of a model; no data dependence."""

    backbone: int
    """Attention projections and active FFN weights of every layer (every position)."""
    lm_head: int
    visual_input: int
    """Latent projection and timestep MLP."""
    flow_head: int
    attention_pair: int
    """One allowed (query, key) pair through every layer's scores and values."""
    active_params: int
    """N of C = 6ND: ``count_params(model).active``."""
    understanding_input: int = 0
    """A dual encoder's ``understanding_proj`` (C_u x D), run at understanding positions in
    place of ``visual_input``; 0 for a single-encoder model."""

    def per_token(self, mix: PositionMix, seq_len: int) -> TokenFlops:
        def attention(density: float) -> float:
            return self.attention_pair * density * seq_len

        return TokenFlops(
            text=self.backbone + self.lm_head + attention(mix.text_density),
            vision=self.backbone + self.visual_input + self.flow_head + attention(mix.vision_density),
            mean=self.backbone
            + mix.lm_targets * self.lm_head
            + (mix.vision - mix.understanding) * self.visual_input
            + mix.understanding * self.understanding_input
            + mix.denoised * self.flow_head
            + attention(mix.attention_density),
            six_n=6.0 * self.active_params,
        )


def model_flops(model: nn.Module) -> ModelFlops:
    """Per-part FLOPs of a unimm model (build it on the meta device: only shapes are read)."""
    backbone = attention_pair = 0
    for layer in model.layers.values():
        ffn = layer.feed_forward
        ffn_active = _matmul_weights(ffn) - inactive_params(ffn)
        # a MoT token runs its own modality's projections only
        attention_active = _matmul_weights(layer.attention) - inactive_params(layer.attention)
        backbone += FLOPS_PER_WEIGHT * (attention_active + ffn_active)
        query_width = model.config.dim // model.config.n_heads * model.config.n_heads  # n_heads * head_dim
        attention_pair += ATTENTION_FLOPS_PER_WIDTH * query_width
    return ModelFlops(
        backbone=backbone,
        lm_head=FLOPS_PER_WEIGHT * _matmul_weights(model.lm_head),
        visual_input=FLOPS_PER_WEIGHT * _matmul_weights(model.latent_proj, model.time_embedding),
        flow_head=FLOPS_PER_WEIGHT * _matmul_weights(model.flow_head),
        attention_pair=attention_pair,
        active_params=count_params(model).active,
        understanding_input=FLOPS_PER_WEIGHT * _matmul_weights(*_understanding_proj(model)),
    )


def measure_mix(inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> PositionMix:
    """The position mix of a packed batch (the loader's ``(inputs, labels)``).

    The densities evaluate the model's own mask (``unimm.masks``) densely, ``B x L x L``
    booleans: fine for the few rows an estimate needs, even at 4096 positions.
    """
    allowed_BLL = build_attention_mask(inputs["document_ids"], inputs["frame_ids"], "sdpa")[:, 0]
    return mix_with_density(inputs, labels, allowed_BLL.sum(-1).double() / labels.shape[1])


def mix_with_density(inputs: dict[str, torch.Tensor], labels: torch.Tensor, density_BL: torch.Tensor) -> PositionMix:
    """The position mix of a packed batch given each query's attended fraction of the row
    (``measure_mix`` evaluates the mask densely; the trainer counts keys per query)."""
    vision_BL = inputs["modality"] == VISION
    understanding_BL = inputs.get("understanding")  # dual-encoder batches only
    positions = labels.numel()
    return PositionMix(
        vision=float(vision_BL.sum()) / positions,
        lm_targets=float((labels != IGNORE_INDEX).sum()) / positions,
        denoised=float(inputs["denoise"].sum()) / positions,
        text_density=_mean_or_zero(density_BL[~vision_BL]),
        vision_density=_mean_or_zero(density_BL[vision_BL]),
        understanding=0.0 if understanding_BL is None else float(understanding_BL.sum()) / positions,
    )


def _understanding_proj(model: nn.Module) -> tuple[nn.Module, ...]:
    return (model.understanding_proj,) if hasattr(model, "understanding_proj") else ()


def _matmul_weights(*modules: nn.Module) -> int:
    # Weights of linear maps are the >= 2-D parameters; biases and norm scales are 1-D.
    return sum(p.numel() for module in modules for p in module.parameters() if p.dim() >= 2)


def _mean_or_zero(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else 0.0
