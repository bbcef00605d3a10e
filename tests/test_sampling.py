"""Generation with the KV cache computes what the full forward pass under the hybrid mask does."""

import torch

from unimm.data.batch import NO_FRAME, TEXT, VISION
from unimm.flow import FlowMatchingConfig
from unimm.masks import build_attention_mask
from unimm.model.ffn import FFNConfig
from unimm.model.transformer import UnimmModel
from unimm.sampling import MixedModalSampler, SamplingConfig
from unimm.tokenizer import build_tokenizer

N, C = 4, 6


def tiny_model(kind: str) -> UnimmModel:
    torch.manual_seed(0)
    model = UnimmModel.Config(
        vocab_size=261, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
        ffn=FFNConfig(kind=kind, hidden_dim=64), max_seq_len=64, latent_dim=C, rope_theta=10_000.0,
    ).build()
    model.init_weights()
    torch.nn.init.normal_(model.flow_head.weight, std=0.1)
    return model


def test_cached_generation_matches_full_forward():
    tk = build_tokenizer()
    for kind in ("shared", "modality"):
        model = tiny_model(kind)
        sampler = MixedModalSampler(model, tk, FlowMatchingConfig(), 1.0, N, SamplingConfig())
        prefix = [tk.bos_id, *tk.encode("a red star"), tk.boi_id]
        frame, t = torch.randn(N, C), 0.3
        # full forward over prefix + noisy frame + <eoi>
        L = len(prefix) + N + 1
        tokens = torch.tensor([prefix + [tk.pad_id] * N + [tk.eoi_id]])
        modality = torch.tensor([[TEXT] * len(prefix) + [VISION] * N + [TEXT]])
        frames = torch.tensor([[NO_FRAME] * len(prefix) + [0] * N + [NO_FRAME]])
        latents = torch.zeros(1, L, C)
        latents[0, len(prefix) : len(prefix) + N] = frame
        t_BL = torch.ones(1, L)
        t_BL[0, len(prefix) : len(prefix) + N] = t
        mask = build_attention_mask(torch.zeros(1, L, dtype=torch.long), frames, "sdpa")
        with torch.no_grad():
            h, _ = model.hidden_states(tokens, latents, t_BL, modality, torch.arange(L)[None], mask)
        # incremental: the prefix, one denoising evaluation of the frame, then the frame committed
        ctx = sampler.new_context()
        logits = sampler.feed_text(ctx, prefix)
        torch.testing.assert_close(logits, model.lm_head(h[0, len(prefix) - 1]), atol=1e-5, rtol=1e-5)
        h_frame = sampler._run(ctx, sampler._pad_tokens(), frame, torch.full((N,), t), VISION, commit=False)
        torch.testing.assert_close(h_frame, h[0, len(prefix) : len(prefix) + N], atol=1e-5, rtol=1e-5)
        assert ctx.length == len(prefix), "a denoising step leaves the cache as it was"
        sampler._run(ctx, sampler._pad_tokens(), frame, torch.full((N,), t), VISION, commit=True)
        logits = sampler.feed_text(ctx, [tk.eoi_id])
        torch.testing.assert_close(logits, model.lm_head(h[0, -1]), atol=1e-5, rtol=1e-5)


def test_text_to_image_and_back_run_end_to_end():
    tk = build_tokenizer()
    sampler = MixedModalSampler(
        tiny_model("shared"), tk, FlowMatchingConfig(), 1.0, N, SamplingConfig(euler_steps=3, max_new_tokens=5),
        generator=torch.Generator().manual_seed(0),
    )
    latents = sampler.text_to_image("a red star")
    assert latents.shape == (N, C) and torch.isfinite(latents).all()
    assert isinstance(sampler.image_to_text(latents), str)
