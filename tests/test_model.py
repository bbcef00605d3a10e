"""The unified model: what each position may depend on, and parameter counts."""

import pytest
import torch

from unimm.data.batch import NO_FRAME, TEXT, VISION
from unimm.masks import build_attention_mask
from unimm.model.ffn import FFNConfig
from unimm.model.params import count_params, meta_model
from unimm.model.transformer import UnimmModel

# one row: text(0-2) <boi>(3) frame 0 patches(4-7) <eoi>(8) text(9-10) | doc 1: text(11-12) frame 1 (13-15)
MODALITY = [TEXT] * 4 + [VISION] * 4 + [TEXT] * 5 + [VISION] * 3
FRAMES = [NO_FRAME] * 4 + [0] * 4 + [NO_FRAME] * 5 + [1] * 3
DOCS = [0] * 11 + [1] * 5
POSITIONS = list(range(11)) + list(range(5))
L = len(MODALITY)


def tiny(kind="shared") -> UnimmModel:
    torch.manual_seed(0)
    config = UnimmModel.Config(
        vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
        ffn=FFNConfig(kind=kind, hidden_dim=64), max_seq_len=64, latent_dim=6, rope_theta=10_000.0,
    )
    model = config.build()
    model.init_weights()
    # the flow head starts at zero by design; give it weights so outputs depend on inputs
    torch.nn.init.normal_(model.flow_head.weight, std=0.1)
    return model


def outputs(model, tokens, latents):
    modality = torch.tensor([MODALITY])
    mask = build_attention_mask(torch.tensor([DOCS]), torch.tensor([FRAMES]), "sdpa")
    everywhere = torch.ones(1, L, dtype=torch.bool)
    t = torch.full((1, L), 0.5)
    logits, flow, _ = model(tokens, latents, t, modality, torch.tensor([POSITIONS]), mask, everywhere, everywhere)
    return logits, flow


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50, (1, L), generator=g), torch.randn(1, L, 6, generator=g)


def changed_positions(model, inputs, position, *, latent: bool):
    tokens, latents = inputs
    before = outputs(model, tokens, latents)[1]
    tokens, latents = tokens.clone(), latents.clone()
    if latent:
        latents[0, position] += 1.0
    else:
        tokens[0, position] = (tokens[0, position] + 1) % 50
    after = outputs(model, tokens, latents)[1]  # [L, C]: every position selected
    return set(torch.nonzero((after - before).abs().amax(-1) > 1e-6).flatten().tolist())


@pytest.mark.parametrize("kind", ["shared", "modality"])
def test_dependencies_follow_the_hybrid_mask(inputs, kind):
    model = tiny(kind)
    # a text token affects itself and what comes after it in its document only
    assert changed_positions(model, inputs, 1, latent=False) == set(range(1, 11))
    # the last patch of a frame reaches back to the frame's first patch (bidirectional frame)
    assert changed_positions(model, inputs, 7, latent=True) == set(range(4, 11))
    # the second document sees nothing of the first
    assert changed_positions(model, inputs, 12, latent=False) == {12, 13, 14, 15}
    assert changed_positions(model, inputs, 13, latent=True) == {13, 14, 15}


def test_param_counts_by_hand():
    d, h, v, layers, kv = 32, 64, 50, 2, 2 * (32 // 4)
    attention = d * d + 2 * d * kv + d * d
    block = attention + 3 * d * h + 2 * d
    dense = layers * block + 2 * v * d + d
    shared = count_params(meta_model(tiny("shared").config))
    modality = count_params(meta_model(tiny("modality").config))
    assert shared.total == shared.active == dense
    assert modality.total == dense + layers * 3 * d * h and modality.active == dense
    # adapters: latent projection (6 -> 32 + bias), timestep MLP (256 -> 256 -> 32), flow head (32 -> 6 + bias)
    assert shared.adapter == (6 * d + d) + (256 * 256 + 256 + 256 * d + d) + (d * 6 + 6)
