"""Mixture of Transformers (ffn.kind "mot"): per-modality attention projections, norms and
FFNs under one global attention; its parameter count, its start from a dense checkpoint, and a
debug_cpu_mot run through training, resuming and the Hugging Face round trip."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import losses, starting_weights, train_recipe
from unimm.cli import main
from unimm.convert.dcp_io import DcpCheckpoint, save_model_checkpoint
from unimm.convert.mot import mot_config, mot_state_from_dense
from unimm.data.batch import NO_FRAME, TEXT, VISION
from unimm.flops import model_flops
from unimm.masks import build_attention_mask
from unimm.model.ffn import FFNConfig
from unimm.model.params import count_params, meta_model
from unimm.model.transformer import UnimmModel
from unimm.titan.model_spec import FLAVORS

# one row: text(0-3) frame 0 (4-7) text(8-10) | doc 1: text(11-12) frame 1 (13-15)
MODALITY = [TEXT] * 4 + [VISION] * 4 + [TEXT] * 5 + [VISION] * 3
FRAMES = [NO_FRAME] * 4 + [0] * 4 + [NO_FRAME] * 5 + [1] * 3
DOCS = [0] * 11 + [1] * 5
POSITIONS = list(range(11)) + list(range(5))
B, L = 2, len(MODALITY)

# Modules that belong to one modality without being stacked per modality.
TEXT_ONLY = ("tok_embeddings", "lm_head")
VISION_ONLY = ("latent_proj", "time_embedding", "flow_head")


def tiny(kind: str) -> UnimmModel.Config:
    return UnimmModel.Config(
        vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
        ffn=FFNConfig(kind=kind, hidden_dim=64), max_seq_len=64, latent_dim=6, rope_theta=10_000.0,
    )


def build(config: UnimmModel.Config, state: dict[str, torch.Tensor] | None = None) -> UnimmModel:
    model = config.build()
    model.load_state_dict(starting_weights(config) if state is None else state)
    return model


def rows(values: list[int]) -> torch.Tensor:
    return torch.tensor([values] * B)


def mixed_inputs(config: UnimmModel.Config, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (B, L), generator=g)
    return tokens, torch.randn(B, L, config.latent_dim, generator=g), torch.rand(B, L, generator=g)


def outputs(model, tokens, latents, t, modality, documents, frames, positions, lm=None, flow=None):
    """LM logits and flow outputs, [B, L, .] (every position) unless positions are chosen."""
    everywhere = torch.ones(tokens.shape, dtype=torch.bool)
    mask = build_attention_mask(documents, frames, "sdpa")
    lm = everywhere if lm is None else lm
    flow = everywhere if flow is None else flow
    logits, out, _ = model(tokens, latents, t, modality, positions, mask, lm, flow)
    if lm is everywhere and flow is everywhere:
        return logits.view(*tokens.shape, -1), out.view(*tokens.shape, -1)
    return logits, out


def mixed_outputs(model, config):
    return outputs(model, *mixed_inputs(config), rows(MODALITY), rows(DOCS), rows(FRAMES), rows(POSITIONS))


# -- each modality trains only its own copy ----------------------------------------------------


def gradients(model, config, modality: int) -> dict[str, torch.Tensor]:
    """Gradients of a training loss on a batch of one modality: text rows (causal, LM loss at
    every position) or frames (two bidirectional frames per row, flow loss everywhere)."""
    tokens, latents, t = mixed_inputs(config)
    if modality == TEXT:
        frames, lm, flow = torch.full((B, L), NO_FRAME), torch.ones(B, L, dtype=torch.bool), torch.zeros(B, L, dtype=torch.bool)
    else:
        frames, lm, flow = rows([0] * 8 + [1] * 8), torch.zeros(B, L, dtype=torch.bool), torch.ones(B, L, dtype=torch.bool)
    model.zero_grad(set_to_none=True)
    logits, out = outputs(
        model, tokens, latents, t, torch.full((B, L), modality), torch.zeros(B, L, dtype=torch.long), frames,
        torch.arange(L).expand(B, L), lm, flow,
    )
    (logits.logsumexp(-1).sum() + out.square().sum()).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def is_zero(grad: torch.Tensor | None) -> bool:
    return grad is None or not grad.any()


@pytest.mark.parametrize("modality", [TEXT, VISION])
def test_a_batch_of_one_modality_trains_only_that_modality(modality):
    config = tiny("mot")
    grads = gradients(build(config), config, modality)
    other = 1 - modality
    own_modules, other_modules = (TEXT_ONLY, VISION_ONLY) if modality == TEXT else (VISION_ONLY, TEXT_ONLY)
    # Every parameter belongs to exactly one modality: nothing but attention's mixing is shared.
    stacked = [name for name in grads if name.startswith(("layers.", "norm."))]
    assert len(stacked) + sum(1 for n in grads if n.split(".")[0] in TEXT_ONLY + VISION_ONLY) == len(grads)
    for name in stacked:  # [2, ...]: row 0 text, row 1 vision
        assert grads[name] is not None and grads[name].shape[0] == 2, name
        assert grads[name][modality].any(), f"{name}: no gradient in its own modality's row"
        assert not grads[name][other].any(), f"{name}: gradient in the other modality's row"
    for name, grad in grads.items():
        if name.split(".")[0] in other_modules:
            assert is_zero(grad), name
        elif name.split(".")[0] in own_modules:
            assert not is_zero(grad), name


@torch.no_grad()
def test_cached_generation_matches_full_forward():
    """The sampler's KV cache: text, then a frame's denoising step, then the frame committed."""
    from unimm.flow import FlowMatchingConfig
    from unimm.sampling import MixedModalSampler, SamplingConfig
    from unimm.tokenizer import build_tokenizer

    tk, n = build_tokenizer(), 4
    config = tiny("mot")
    config.vocab_size = 261
    model = build(config).eval()
    sampler = MixedModalSampler(model, tk, FlowMatchingConfig(), 1.0, n, SamplingConfig())
    prefix = [tk.bos_id, *tk.encode("a red star"), tk.boi_id]
    frame, t, p = torch.randn(n, config.latent_dim), 0.3, len(prefix)
    length = p + n + 1
    tokens = torch.tensor([prefix + [tk.pad_id] * n + [tk.eoi_id]])
    modality = torch.tensor([[TEXT] * p + [VISION] * n + [TEXT]])
    frames = torch.tensor([[NO_FRAME] * p + [0] * n + [NO_FRAME]])
    latents = torch.zeros(1, length, config.latent_dim)
    latents[0, p : p + n] = frame
    t_BL = torch.ones(1, length)
    t_BL[0, p : p + n] = t
    mask = build_attention_mask(torch.zeros(1, length, dtype=torch.long), frames, "sdpa")
    h, _ = model.hidden_states(tokens, latents, t_BL, modality, torch.arange(length)[None], mask)
    ctx = sampler.new_context()
    torch.testing.assert_close(sampler.feed_text(ctx, prefix), model.lm_head(h[0, p - 1]), atol=1e-5, rtol=1e-5)
    h_frame = sampler._run(ctx, sampler._pad_tokens(), frame, torch.full((n,), t), VISION, commit=False)
    torch.testing.assert_close(h_frame, h[0, p : p + n], atol=1e-5, rtol=1e-5)
    sampler._run(ctx, sampler._pad_tokens(), frame, torch.full((n,), t), VISION, commit=True)
    torch.testing.assert_close(sampler.feed_text(ctx, [tk.eoi_id]), model.lm_head(h[0, -1]), atol=1e-5, rtol=1e-5)


# -- parameter count ---------------------------------------------------------------------------


def test_param_count_by_hand():
    d, h, v, layers, kv = 32, 64, 50, 2, 2 * (32 // 4)
    attention = d * d + 2 * d * kv + d * d
    block = attention + 3 * d * h + 2 * d  # projections, SwiGLU, attention and FFN pre-norms
    dense = layers * block + 2 * v * d + d  # + embedding, LM head, final norm
    mot = count_params(meta_model(tiny("mot")))
    # two copies of every block and of the final norm; a token runs through one of them
    assert mot.total == 2 * layers * block + 2 * v * d + 2 * d
    assert mot.active == dense == count_params(meta_model(tiny("shared"))).total
    # adapters as the dense model's: latent projection, timestep MLP, flow head
    assert mot.adapter == (6 * d + d) + (256 * 256 + 256 + 256 * d + d) + (d * 6 + 6)
    # a token's FLOPs are the dense model's
    assert model_flops(meta_model(tiny("mot"))) == model_flops(meta_model(tiny("shared")))


def test_paper_size_mot_doubles_the_dense_backbone():
    dense, mot = (count_params(meta_model(FLAVORS[name]())) for name in ("dense_1b5", "mot_2b5"))
    vocab, dim = 128_256, 2048
    assert mot.total == 2 * dense.total - 2 * vocab * dim == 2_471_628_800  # embedding and LM head once
    assert mot.active == dense.total == 1_498_482_688
    assert main(["params", "--recipe", "mot_2b5"]) == 0


# -- starting from a dense checkpoint ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["shared", "modality"])
@torch.no_grad()
def test_mot_from_dense_computes_what_the_dense_model_does(kind):
    source = tiny(kind)
    dense_state = starting_weights(source)
    mot_state = mot_state_from_dense(dense_state, source)
    if kind == "modality":  # the text and vision FFNs carry over as they are
        name = "layers.1.feed_forward.experts.w2"
        assert torch.equal(mot_state[name], dense_state[name])
    dense_logits, dense_flow = mixed_outputs(build(source, dense_state), source)
    mot_logits, mot_flow = mixed_outputs(build(mot_config(source), mot_state), source)
    vision = rows(MODALITY) == VISION
    torch.testing.assert_close(mot_logits[~vision], dense_logits[~vision], rtol=0, atol=1e-5)
    torch.testing.assert_close(mot_flow[vision], dense_flow[vision], rtol=0, atol=1e-5)
    assert dense_flow[vision].abs().mean() > 1e-2


def test_refusals(tmp_path, capsys):
    # a MoE has no per-modality counterpart of its experts
    save_model_checkpoint(starting_weights(FLAVORS["debug_moe"]()), tmp_path / "moe")
    assert main(["convert", "dense-to-mot", "--ckpt", str(tmp_path / "moe"), "--out", str(tmp_path / "a")]) == 2
    assert "this one's FFN is 'moe'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    # Llama has one copy of each weight
    save_model_checkpoint(starting_weights(FLAVORS["debug_mot"]()), tmp_path / "mot")
    out = tmp_path / "llama"
    assert main(["convert", "to-hf", "--ckpt", str(tmp_path / "mot"), "--out", str(out), "--format", "llama"]) == 2
    assert "--format llama cannot hold a Mixture of Transformers" in capsys.readouterr().err
    assert not out.exists()


# -- debug_cpu_mot end to end ------------------------------------------------------------------


def load(checkpoint: Path) -> dict[str, torch.Tensor]:
    return DcpCheckpoint(checkpoint).load()


@pytest.mark.slow
@torch.no_grad()
def test_debug_cpu_mot_from_dense_trains_resumes_and_round_trips(tmp_path, data_cache, capsys):
    # 1. the MoT of a dense debug_cpu checkpoint, through the CLI
    dense = FLAVORS["debug"]()
    dense_state = starting_weights(dense)
    save_model_checkpoint(dense_state, tmp_path / "dense")
    run = tmp_path / "run"
    assert main(["convert", "dense-to-mot", "--ckpt", str(tmp_path / "dense"), "--out", str(run)]) == 0
    assert "model flavor debug_mot" in capsys.readouterr().out
    start = load(run / "checkpoint" / "step-0")
    expected = mot_state_from_dense(dense_state, dense)
    assert start.keys() == expected.keys() and all(torch.equal(start[n], expected[n]) for n in start)
    assert main(["convert", "dense-to-mot", "--ckpt", str(tmp_path / "dense"), "--out", str(run)]) == 2
    assert "exists" in capsys.readouterr().err

    # 2. debug_cpu_mot trains from it, then resumes to step 4
    first = train_recipe("debug_cpu_mot", run, data_cache, steps=2)
    assert f"Loading the checkpoint from {run / 'checkpoint' / 'step-0'}" in first.stdout + first.stderr
    train_recipe("debug_cpu_mot", run, data_cache, steps=4)
    curve = losses(run)
    assert sorted(curve) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(v)) for v in curve.values())
    trained = load(run / "checkpoint" / "step-4")
    assert not torch.equal(trained["layers.0.attention.wq.weight"][TEXT], trained["layers.0.attention.wq.weight"][VISION])

    # 3. Hugging Face: the export computes what the native model does; from-hf brings it back exactly
    hf = tmp_path / "hf"
    assert main(["convert", "to-hf", "--ckpt", str(run / "checkpoint" / "step-4"), "--out", str(hf)]) == 0
    config = FLAVORS["debug_mot"]()
    native = build(config, trained).eval()
    exported = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True).eval()
    tokens, latents, t = mixed_inputs(config)
    logits, flow = mixed_outputs(native, config)
    out = exported.forward_flow(
        input_ids=tokens, latents=latents, timesteps=t, modality=rows(MODALITY),
        attention_mask=exported.hybrid_attention_mask(rows(DOCS), rows(FRAMES)), position_ids=rows(POSITIONS),
    )
    vision = rows(MODALITY) == VISION
    torch.testing.assert_close(out.logits[~vision], logits[~vision], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.flow[vision], flow[vision], rtol=1e-5, atol=1e-5)
    # text generation through the text copy, with and without the KV cache
    greedy = dict(max_new_tokens=6, do_sample=False)
    cached = exported.generate(input_ids=tokens[:1, :5], **greedy)
    torch.testing.assert_close(exported.generate(input_ids=tokens[:1, :5], use_cache=False, **greedy), cached)

    assert main(["convert", "from-hf", "--hf", str(hf), "--out", str(tmp_path / "back")]) == 0
    back = load(tmp_path / "back" / "checkpoint" / "step-0")
    assert back.keys() == trained.keys() and all(torch.equal(back[n], trained[n]) for n in back)
