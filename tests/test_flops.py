"""Training FLOPs per token: a count by hand, the mask's real density, and 6ND at paper scale."""

import pytest
import torch

from unimm.data.batch import IGNORE_INDEX, NO_FRAME, TEXT, VISION
from unimm.flops import TYPICAL_MIX, PositionMix, measure_mix, model_flops
from unimm.model.ffn import FFNConfig
from unimm.model.params import count_params, meta_model
from unimm.model.transformer import UnimmModel
from unimm.titan.launch import load_recipe

# One row of 16: doc 0 = text(0-3) frame 0 (4-7, clean: an image being described) text(8-10);
# doc 1 = text(11-12) frame 1 (13-15, noised: an image being generated).
MODALITY = [TEXT] * 4 + [VISION] * 4 + [TEXT] * 5 + [VISION] * 3
FRAMES = [NO_FRAME] * 4 + [0] * 4 + [NO_FRAME] * 5 + [1] * 3
DOCS = [0] * 11 + [1] * 5
TARGETS = {0, 1, 2, 8, 9, 11}
L = 16


def batch():
    inputs = {
        "modality": torch.tensor([MODALITY]),
        "frame_ids": torch.tensor([FRAMES]),
        "document_ids": torch.tensor([DOCS]),
        "denoise": torch.tensor([[i >= 13 for i in range(L)]]),
    }
    labels = torch.tensor([[7 if i in TARGETS else IGNORE_INDEX for i in range(L)]])
    return inputs, labels


def tiny_config(kind: str) -> UnimmModel.Config:
    return UnimmModel.Config(
        vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn=FFNConfig(kind=kind, hidden_dim=64),
        max_seq_len=64, latent_dim=6, time_freq_dim=8,
    )


def test_mask_density_counted_by_hand():
    # Keys each query may see (same document, and earlier or same frame):
    #   text 0-3: 1, 2, 3, 4             frame 0 (4-7): 8 each (0..7)
    #   text 8-10: 9, 10, 11             text 11-12: 1, 2        frame 1 (13-15): 5 each (11..15)
    text_keys = (1 + 2 + 3 + 4) + (9 + 10 + 11) + (1 + 2)  # 43 over 9 text queries
    vision_keys = 4 * 8 + 3 * 5  # 47 over 7 visual queries
    mix = measure_mix(*batch())
    assert mix == PositionMix(
        vision=7 / 16,
        lm_targets=6 / 16,
        denoised=3 / 16,
        text_density=pytest.approx(text_keys / 9 / L),
        vision_density=pytest.approx(vision_keys / 7 / L),
    )
    assert mix.attention_density == pytest.approx((text_keys + vision_keys) / L**2)


@pytest.mark.parametrize("kind", ["shared", "modality"])
def test_flops_per_token_counted_by_hand(kind):
    d, kv, h, v, c, f, layers = 32, 2 * 8, 64, 50, 6, 8, 2  # kv: 2 KV heads of width 32 / 4
    attention_weights = d * d + 2 * d * kv + d * d  # wq, wk, wv, wo
    ffn_weights = 3 * d * h  # one SwiGLU; a modality FFN runs one of its two per token
    backbone = 6 * layers * (attention_weights + ffn_weights)
    lm_head = 6 * d * v
    visual_input = 6 * (c * d + f * f + f * d)  # latent projection, timestep MLP (8 -> 8 -> 32)
    flow_head = 6 * d * c
    per_pair = 12 * layers * d  # q.k and p.v, 2 FLOPs each per query-width element, x3 for training

    flops = model_flops(meta_model(tiny_config(kind)))
    assert (flops.backbone, flops.lm_head, flops.visual_input, flops.flow_head, flops.attention_pair) == (
        backbone, lm_head, visual_input, flow_head, per_pair,
    )
    tokens = flops.per_token(measure_mix(*batch()), seq_len=L)
    # 90 allowed (query, key) pairs of 256 in the row above; 6 targets, 7 visual, 3 noised positions
    assert tokens.mean == pytest.approx(
        backbone + 6 / 16 * lm_head + 7 / 16 * visual_input + 3 / 16 * flow_head + per_pair * 90 / 16
    )
    assert tokens.text == pytest.approx(backbone + lm_head + per_pair * 43 / 9)
    assert tokens.vision == pytest.approx(backbone + visual_input + flow_head + per_pair * 47 / 7)
    norms = (2 * layers + 1) * d
    assert tokens.six_n == 6 * (layers * (attention_weights + ffn_weights) + norms + 2 * v * d)


def test_dual_encoder_understanding_frames_counted_by_hand():
    # The batch above from a dual encoder: frame 0 (4-7, clean) is an understanding frame, read
    # through understanding_proj (4 wide -> 32) instead of the latent projection and timestep MLP.
    d, c, f, c_u = 32, 6, 8, 4
    inputs, labels = batch()
    inputs["understanding"] = torch.tensor([[4 <= i < 8 for i in range(L)]])
    mix = measure_mix(inputs, labels)
    assert (mix.vision, mix.understanding, mix.denoised) == (7 / 16, 4 / 16, 3 / 16)
    assert mix.attention_density == measure_mix(*batch()).attention_density  # the mask is the same
    assert measure_mix(*batch()).understanding == 0.0 and TYPICAL_MIX.understanding == 0.0

    config = tiny_config("modality")
    config.understanding_dim = c_u
    flops = model_flops(meta_model(config))
    single = model_flops(meta_model(tiny_config("modality")))
    visual_input = 6 * (c * d + f * f + f * d)
    understanding_input = 6 * c_u * d
    assert (flops.visual_input, flops.understanding_input, single.understanding_input) == (
        visual_input, understanding_input, 0,
    )
    assert (flops.backbone, flops.lm_head, flops.flow_head) == (single.backbone, single.lm_head, single.flow_head)
    tokens = flops.per_token(mix, seq_len=L)
    # 3 generated positions run the latent projection and timestep MLP, 4 understanding ones the second projection
    assert tokens.mean == pytest.approx(
        flops.backbone + 6 / 16 * flops.lm_head + 3 / 16 * visual_input + 4 / 16 * understanding_input
        + 3 / 16 * flops.flow_head + flops.attention_pair * 90 / 16
    )
    # the same batch counted as single-encoder data: every visual position through latent_proj and the time MLP
    assert single.per_token(measure_mix(*batch()), seq_len=L).mean == pytest.approx(
        tokens.mean + 4 / 16 * (visual_input - understanding_input)
    )


def test_paper_dense_model_matches_6nd_up_to_embedding_and_attention():
    config = load_recipe("dense_1b5").model_spec.model
    model = meta_model(config)
    flops = model_flops(model)
    n = count_params(model).active
    seq_len = config.max_seq_len
    text_only = PositionMix(vision=0.0, lm_targets=1.0, denoised=0.0, text_density=0.5, vision_density=0.0)
    tokens = flops.per_token(text_only, seq_len)
    attention = flops.attention_pair * 0.5 * seq_len
    # Without attention, a text position is 6N minus what 6N counts but no matmul computes:
    # the embedding lookup and the RMSNorm scales.
    lookups = config.vocab_size * config.dim + (2 * config.n_layers + 1) * config.dim
    assert tokens.six_n == 6 * n
    assert tokens.text - attention == 6 * (n - lookups)
    assert 0.8 < (tokens.text - attention) / tokens.six_n < 0.85  # the 263M-row embedding of 1.5B
    # At the typical packed-mask density the attention term is under 10% of 6N (see TYPICAL_MIX).
    typical = flops.per_token(TYPICAL_MIX, seq_len)
    assert 0.0 < flops.attention_pair * TYPICAL_MIX.attention_density * seq_len < 0.1 * typical.six_n
    # torchtitan's MFU uses the exact count of the typical position.
    assert config.get_nparams_and_flops(model, seq_len) == (count_params(model).total, round(typical.mean))
