"""The paper's method against formulas and hand-built cases (§2.1, App. B, App. D.2, App. E.3):
x-prediction near clean frames, guidance contexts, per-frame noise for every frame, padding
and the MoE router, the default weights / guidance / time grid / timestep embedding, and
loss centering."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unimm.data.batch import NO_FRAME, TEXT, VISION, padding_mask
from unimm.data.packer import Packer
from unimm.data.sequences import LayoutSettings, build_document
from unimm.flow import (
    FlowMatchingConfig,
    euler_step,
    flow_loss_sum,
    frame_noise,
    sample_t,
    time_grid,
)
from unimm.losses import LossCentering, TransfusionLoss
from unimm.masks import build_attention_mask
from unimm.model.ffn import FFNConfig
from unimm.model.moe import MoE, MoEConfig
from unimm.model.transformer import TimestepEmbedding, UnimmModel
from unimm.sampling import MixedModalSampler, SamplingConfig
from unimm.tokenizer import build_tokenizer

TK = build_tokenizer()
N, C = 4, 6


def tiny_model(kind: str = "shared", prediction_head_std: float = 0.1) -> UnimmModel:
    torch.manual_seed(0)
    ffn = FFNConfig(kind=kind, hidden_dim=64, moe=MoEConfig(num_experts=4, top_k=2, expert_hidden_dim=8, backend="loop"))
    model = UnimmModel.Config(
        vocab_size=261, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn=ffn, max_seq_len=128,
        latent_dim=C, rope_theta=10_000.0,
    ).build()
    model.init_weights()
    torch.nn.init.normal_(model.flow_head.weight, std=prediction_head_std)
    return model


def sampler_for(model, flow=None, shift=1.0, **config) -> MixedModalSampler:
    return MixedModalSampler(
        model, TK, flow or FlowMatchingConfig(), shift, N, SamplingConfig(**config),
        generator=torch.Generator().manual_seed(0),
    )


# ------------------------------------------------------------ 1. x-prediction near clean


@pytest.mark.parametrize("t", [0.5, 0.96, 0.99, 0.999, 1.0])
def test_perfect_x_prediction_scores_zero_and_is_the_minimiser(t):
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(8, C, generator=g), torch.randn(8, C, generator=g)
    t_M1 = torch.full((8, 1), t)
    cfg = FlowMatchingConfig(prediction="x", x_pred_min_one_minus_t=0.05)
    pred = z0.clone().requires_grad_(True)
    loss = flow_loss_sum(pred, z0, eps, t_M1, cfg)
    loss.backward()
    assert loss.item() == 0.0
    assert pred.grad.abs().max().item() == 0.0, "the loss's minimiser is z0 itself"
    # away from the floor the x-loss is the v-loss of the implied velocity: |x - z0|^2 / (1 - t)^2
    x = z0 + 0.1
    floor = max(1.0 - t, 0.05)
    assert flow_loss_sum(x, z0, eps, t_M1, cfg).item() == pytest.approx(0.01 * x.numel() / floor**2, rel=1e-4)


@pytest.mark.parametrize("shift", [1.0, 1.2, 3.0])
def test_sampler_last_step_lands_on_a_perfect_x_prediction(shift):
    # a perfect x-denoiser for the frame whose every patch is x_row: it predicts that frame
    # whatever its input (flow head weight 0, bias x_row)
    model = tiny_model()
    x_row = torch.linspace(-1.0, 1.0, C)
    with torch.no_grad():
        model.flow_head.weight.zero_()
        model.flow_head.bias.copy_(x_row)
    sampler = sampler_for(model, FlowMatchingConfig(prediction="x"), shift=shift, euler_steps=25, cfg_scale=1.0)
    ctx = sampler.new_context()
    sampler.feed_text(ctx, [TK.bos_id, TK.boi_id])
    frame = sampler.denoise_frame(ctx)
    torch.testing.assert_close(frame, x_row.expand(N, C), atol=1e-6, rtol=0)


def test_euler_step_of_an_x_prediction_by_hand():
    cfg = FlowMatchingConfig(prediction="x")
    z, x = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5])
    # v = (x - z) / (1 - t) = [-0.5, 2.5] / 0.04; step 0.02 -> z + 0.5 * (x - z)
    torch.testing.assert_close(euler_step(x, z, 0.96, 0.98, cfg), torch.tensor([0.75, -0.75]))
    torch.testing.assert_close(euler_step(x, z, 0.96, 1.0, cfg), x)
    torch.testing.assert_close(euler_step(x, z, 0.2, 0.5, FlowMatchingConfig(prediction="v")), z + 0.3 * x)


# ------------------------------------------------------------ 2. guidance contexts


class Recorder:
    """Wraps ``sampler._prediction``: records (context length, uncond?, z, t, output)."""

    def __init__(self, sampler):
        self.calls, self._inner = [], sampler._prediction
        sampler._prediction = self

    def __call__(self, ctx, z, t):
        out = self._inner(ctx, z, t)
        self.calls.append((ctx.length, ctx.skeleton is None and ctx.uncond is None, z.clone(), t, out))
        return out


def _manual(sampler, segments):
    """A fresh context fed ``segments`` (token lists and frames) in order."""
    ctx = sampler.new_context()
    for seg in segments:
        if isinstance(seg, list):
            sampler.feed_text(ctx, seg)
        else:
            sampler.feed_frame(ctx, seg)
    return ctx


def test_text_to_image_unconditional_context_is_bos_boi():
    sampler = sampler_for(tiny_model(), euler_steps=2)
    rec = Recorder(sampler)
    sampler.text_to_image("a red star")
    uncond = [c for c in rec.calls if c[1]]
    assert [c[0] for c in uncond] == [2, 2], "<bos> <boi>"
    ref = _manual(sampler, [[TK.bos_id, TK.boi_id]])
    torch.testing.assert_close(sampler._prediction._inner(ref, uncond[0][2], uncond[0][3]), uncond[0][4])


def test_video_second_frame_is_guided_against_the_first_frame_without_caption():
    sampler = sampler_for(tiny_model(), euler_steps=2)
    rec = Recorder(sampler)
    frames = sampler.generate_video("a red star", num_frames=2)
    caption = TK.encode("a red star")
    uncond = [c for c in rec.calls if c[1]]
    cond = [c for c in rec.calls if not c[1]]
    # frame 2: <bos> <boi> f1 <eoi> <boi> (N + 4 positions), as a dropped caption leaves it in training
    assert [c[0] for c in uncond] == [2, 2, N + 4, N + 4]
    assert [c[0] for c in cond] == [len(caption) + 2] * 2 + [len(caption) + N + 4] * 2
    ref = _manual(sampler, [[TK.bos_id, TK.boi_id], frames[0], [TK.eoi_id, TK.boi_id]])
    _, _, z, t, out = uncond[2]
    torch.testing.assert_close(sampler._prediction._inner(ref, z, t), out, atol=1e-6, rtol=1e-6)


def test_nwm_target_is_guided_against_its_context_frames_without_the_action():
    sampler = sampler_for(tiny_model(), euler_steps=1)
    rec = Recorder(sampler)
    g = torch.Generator().manual_seed(3)
    context = [torch.randn(N, C, generator=g) for _ in range(4)]
    sampler.predict_frames(context, "dx 0.5 dy 0 dyaw 0")
    (uncond,) = [c for c in rec.calls if c[1]]
    assert uncond[0] == 1 + 4 * (N + 2) + 1, "<bos> 4 x (<boi> frame <eoi>) <boi>"
    segments = [[TK.bos_id]]
    for frame in context:
        segments += [[TK.boi_id], frame, [TK.eoi_id]]
    ref = _manual(sampler, [*segments, [TK.boi_id]])
    torch.testing.assert_close(sampler._prediction._inner(ref, uncond[2], uncond[3]), uncond[4], atol=1e-6, rtol=1e-6)
    # and training drops exactly that text: the action sample's dropped layout
    sample = {"kind": "action", "tokens": np.array(TK.encode("go")), "num_context": 4,
              "latents": np.zeros((5, N, C), np.float32)}
    doc = build_document(sample, TK, np.random.default_rng(0), latent_dim=C, layout=LayoutSettings(cond_dropout=1.0))
    target_start = int(np.flatnonzero(doc.frames == 4)[0])
    assert target_start == uncond[0]


# ------------------------------------------------------------ 3. every frame its own t


def test_every_frame_is_noised_with_its_own_t_by_default():
    rng = np.random.default_rng(0)
    image = {"kind": "image_text", "tokens": np.array(TK.encode("hi")), "directions": ["i2t"],
             "latents": np.ones((1, N, C), np.float32)}
    action = {"kind": "action", "tokens": np.array(TK.encode("go")), "num_context": 2,
              "latents": np.ones((3, N, C), np.float32)}
    docs = [build_document(s, TK, rng, latent_dim=C) for s in (image, action)]
    for doc in docs:
        assert (doc.denoise == (doc.modality == VISION)).all(), "every visual position carries the flow loss"
    row = Packer(64, C, TK.pad_id).next_row(iter(docs + [docs[0]] * 10).__next__)
    batch = {k: torch.from_numpy(v)[None] for k, v in row.items()}
    t, _ = frame_noise(batch["latents"], batch["frame_ids"], batch["denoise"], 3.0, seeds=[1])
    visual = batch["modality"][0] == VISION
    per_frame = {int(f): set(t[0][batch["frame_ids"][0] == f].tolist()) for f in batch["frame_ids"][0][visual].unique()}
    n_frames = int(row["frame_ids"].max()) + 1  # an image doc, an action doc (3 frames), more image docs
    assert n_frames >= 4 and len(per_frame) == n_frames
    assert all(len(v) == 1 for v in per_frame.values()), "one t per frame"
    assert all(next(iter(v)) < 1.0 for v in per_frame.values()), "the caption and action read noisy latents"
    assert len({next(iter(v)) for v in per_frame.values()}) == n_frames, "independent t per frame"
    # the option keeps conditioning frames clean
    clean = LayoutSettings(clean_conditioning_frames=True)
    assert not build_document(image, TK, rng, latent_dim=C, layout=clean).denoise.any()
    act = build_document(action, TK, rng, latent_dim=C, layout=clean)
    assert act.denoise[act.frames == 2].all() and not act.denoise[(act.frames == 0) | (act.frames == 1)].any()


# ------------------------------------------------------------ 4. padding and the router


def test_padding_is_left_out_of_balance_loss_and_expert_counts():
    torch.manual_seed(0)
    moe = MoE(16, MoEConfig(num_experts=6, top_k=2, expert_hidden_dim=8, backend="loop"), out_std=0.02)
    moe.init_states()
    x = torch.randn(1, 7, 16)
    modality = torch.full((1, 7), TEXT)
    valid = torch.tensor([[True] * 4 + [False] * 3])
    _, balance = moe(x, modality, valid)
    counts = moe.tokens_per_expert.clone()
    moe.tokens_per_expert.zero_()
    _, balance_real = moe(x[:, :4], modality[:, :4])
    torch.testing.assert_close(balance, balance_real)
    assert torch.equal(counts, moe.tokens_per_expert) and counts.sum() == 4 * 2


def test_model_router_statistics_ignore_trailing_padding():
    model = tiny_model("moe")
    g = torch.Generator().manual_seed(0)
    L_doc, L_pad = 9, 5
    tokens = torch.randint(0, 256, (1, L_doc), generator=g)
    tokens = torch.cat([tokens, torch.full((1, L_pad), TK.pad_id)], 1)
    modality = torch.full((1, L_doc + L_pad), TEXT)
    docs = torch.tensor([[0] * L_doc + [1] * L_pad])
    positions = torch.tensor([list(range(L_doc)) + list(range(L_pad))])
    frames = torch.full_like(docs, NO_FRAME)
    latents, t = torch.zeros(1, L_doc + L_pad, C), torch.ones(1, L_doc + L_pad)
    valid = ~padding_mask(tokens, modality, TK.pad_id)
    assert valid.sum() == L_doc
    none = torch.zeros_like(valid)

    def run(sl, valid_BL):
        for layer in model.modules():
            if isinstance(layer, MoE):
                layer.tokens_per_expert.zero_()
        mask = build_attention_mask(docs[:, sl], frames[:, sl], "sdpa")
        with torch.no_grad():
            _, _, balance = model(tokens[:, sl], latents[:, sl], t[:, sl], modality[:, sl], positions[:, sl],
                                  mask, none[:, sl], none[:, sl], valid_BL)
        return balance, torch.stack([m.tokens_per_expert.clone() for m in model.modules() if isinstance(m, MoE)])

    padded_balance, padded_counts = run(slice(None), valid)
    doc_balance, doc_counts = run(slice(0, L_doc), None)
    torch.testing.assert_close(padded_balance, doc_balance)
    assert torch.equal(padded_counts, doc_counts)


# ------------------------------------------------------------ 5. defaults


def test_default_loss_weights_are_one_and_three():
    config = TransfusionLoss.Config()
    assert (config.lambda_lm, config.lambda_flow, config.loss_centering) == (1.0, 3.0, False)
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(5, 11, generator=g), torch.randint(0, 11, (5,), generator=g)
    pred, z0, eps = (torch.randn(3, C, generator=g) for _ in range(3))
    t = torch.rand(3, 1, generator=g)
    counts = torch.tensor([5.0, 3.0 * C, 0.0])
    loss_fn = TransfusionLoss(config)
    loss_lm, loss_flow = loss_fn.parts(logits, labels, pred, z0, eps, t, counts)
    loss = loss_fn.combine(loss_lm, loss_flow, torch.tensor(0.0))
    lm = F.cross_entropy(logits, labels)
    flow = (pred - (z0 - eps)).pow(2).mean()
    assert loss_lm.item() == pytest.approx(lm.item(), rel=1e-6)
    assert loss_flow.item() == pytest.approx(flow.item(), rel=1e-6)
    assert loss.item() == pytest.approx(1.0 * lm.item() + 3.0 * flow.item(), rel=1e-6)


def test_guidance_is_three_times_cond_minus_uncond_plus_uncond():
    assert SamplingConfig().cfg_scale == 3.0 and SamplingConfig().euler_steps == 25
    model = tiny_model()
    sampler = sampler_for(model, euler_steps=1)
    frame = sampler.text_to_image("a red star")
    z = torch.randn(N, C, generator=torch.Generator().manual_seed(0))
    cond = _manual(sampler, [[TK.bos_id, *TK.encode("a red star"), TK.boi_id]])
    uncond = _manual(sampler, [[TK.bos_id, TK.boi_id]])
    c, u = sampler._prediction(cond, z, 0.0), sampler._prediction(uncond, z, 0.0)
    # one Euler step from t = 0 to 1 with v = u + 3 (c - u)
    torch.testing.assert_close(frame, z + (u + 3.0 * (c - u)), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0, math.sqrt(72)])
def test_sampler_time_grid_is_the_training_schedule_grid(shift):
    grid = time_grid(25, shift)
    assert len(grid) == 26 and grid[0] == 0.0 and grid[-1] == 1.0
    for k, t in enumerate(grid):
        sigma = 1 - k / 25  # SD3 shift of the uniform grid, by hand
        assert t == pytest.approx(1 - shift * sigma / (1 + (shift - 1) * sigma), abs=1e-12)
    # grid point k is the k/25 quantile of the training's t ~ shift(U[0, 1])
    samples = sample_t(100_000, shift, generator=torch.Generator().manual_seed(0)).double()
    quantiles = torch.quantile(samples, torch.arange(1, 25, dtype=torch.float64) / 25)
    torch.testing.assert_close(quantiles, torch.tensor(grid[1:-1], dtype=torch.float64), atol=5e-3, rtol=0)
    # and it is the grid the sampler evaluates the model on
    sampler = sampler_for(tiny_model(), shift=shift, cfg_scale=1.0)
    rec = Recorder(sampler)
    ctx = _manual(sampler, [[TK.bos_id, TK.boi_id]])
    sampler.denoise_frame(ctx)
    assert [c[3] for c in rec.calls] == pytest.approx(grid[:-1], abs=1e-12)


def test_timestep_embedding_by_hand():
    emb = TimestepEmbedding(4, 8)
    # half = 2: frequencies 1 and 10000^(-1/2) = 0.01; angles 1000 t f
    t = torch.tensor([0.5, 0.0])
    by_hand = torch.tensor([
        [math.cos(500.0), math.cos(5.0), math.sin(500.0), math.sin(5.0)],
        [1.0, 1.0, 0.0, 0.0],
    ])
    torch.testing.assert_close(emb.features(t), by_hand, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(emb(t), emb.mlp_out(F.silu(emb.mlp_in(by_hand))), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------ 6. loss centering


def test_loss_centering_on_a_hand_computed_sequence():
    centering = LossCentering(alpha=0.25, momentum=0.5)
    losses = [(2.0, 1.0), (4.0, 0.5), (1.0, 2.0)]  # (L_LM, L_flow)
    # step 1: c = 0.25 * 1 + 0.75 * 2 = 1.75 starts the EMA
    # step 2: c_current = 0.125 + 3 = 3.125 -> 0.5 * 1.75 + 0.5 * 3.125 = 2.4375
    # step 3: c_current = 0.5 + 0.75 = 1.25 -> 0.5 * 2.4375 + 0.5 * 1.25 = 1.84375
    centers = [1.75, 2.4375, 1.84375]
    for (lm, flow), c in zip(losses, centers):
        w_lm, w_flow = centering.weights(lm, flow)
        assert (w_lm, w_flow) == pytest.approx((c / lm, c / flow))
        centering.update(lm, flow)
        assert centering.center == pytest.approx(c)
        assert centering.metrics() == pytest.approx({"loss/center_c": c, "loss/weight_lm": c / lm, "loss/weight_flow": c / flow})
    # resume: a fresh object with the saved state continues identically
    saved = centering.state_dict()
    resumed = LossCentering(alpha=0.25, momentum=0.5)
    resumed.load_state_dict(saved)
    centering.update(3.0, 1.0)
    resumed.update(3.0, 1.0)
    assert resumed.center == centering.center == pytest.approx(0.5 * 1.84375 + 0.5 * (0.25 + 2.25))


def test_centered_loss_replaces_the_lambdas_with_constant_weights():
    loss_fn = TransfusionLoss(TransfusionLoss.Config(loss_centering=True, center_alpha=0.5, center_momentum=0.9))
    lm = torch.tensor(2.0, requires_grad=True)
    flow = torch.tensor(0.5, requires_grad=True)
    weights = loss_fn.centering.weights(2.0, 0.5)  # c = 1.25
    loss = loss_fn.combine(lm, flow, torch.tensor(0.0), weights)
    loss.backward()
    assert loss.item() == pytest.approx(2 * 1.25)
    assert (lm.grad.item(), flow.grad.item()) == pytest.approx((1.25 / 2.0, 1.25 / 0.5))
    assert TransfusionLoss(TransfusionLoss.Config()).centering is None


def test_trainer_centering_accumulates_microbatches_into_one_step():
    from unimm.titan.trainer import UnimmTrainer

    loss_fn = TransfusionLoss(TransfusionLoss.Config(loss_centering=True, center_alpha=0.5, center_momentum=0.5))
    fake = SimpleNamespace(
        loss_fn=loss_fn, gradient_accumulation_steps=2,
        parallel_dims=SimpleNamespace(dp_enabled=False), model_config=SimpleNamespace(latent_dim=2),
    )
    counts = torch.tensor([4.0, 8.0, 0.0], dtype=torch.float64)  # global: 4 text targets, 8 latent elements
    lm_mask = lambda n: torch.tensor([True] * n + [False] * (4 - n))  # noqa: E731
    denoise_mask = lambda n: torch.tensor([True] * n + [False] * (4 - n))  # noqa: E731
    # microbatch 0: 1 target (CE sum 3 -> share 0.75), 3 positions * 2 = 6 elements (sum 12 -> share 1.5)
    w0 = UnimmTrainer._centering_weights(fake, torch.tensor(0.75), torch.tensor(1.5), lm_mask(1), denoise_mask(3), counts, 0)
    # own means: LM 3, flow 2 -> c = 2.5 on the first step
    assert w0 == pytest.approx((2.5 / 3.0, 2.5 / 2.0)) and loss_fn.centering.steps == 0
    # microbatch 1: 3 targets (sum 3 -> share 0.75), 1 position * 2 = 2 elements (sum 4 -> share 0.5)
    w1 = UnimmTrainer._centering_weights(fake, torch.tensor(0.75), torch.tensor(0.5), lm_mask(3), denoise_mask(1), counts, 1)
    assert w1 == pytest.approx((1.5 / 1.0, 1.5 / 2.0))  # own means LM 1, flow 2 -> c = 1.5
    # the step: L_LM = 1.5, L_flow = 2 -> the center starts at 1.75, once per step
    assert loss_fn.centering.steps == 1 and loss_fn.centering.center == pytest.approx(1.75)
    assert loss_fn.metrics() == pytest.approx({"loss/center_c": 1.75, "loss/weight_lm": 1.75 / 1.5, "loss/weight_flow": 1.75 / 2.0})
    assert loss_fn.state_dict() == {"center": pytest.approx(1.75), "steps": 1}
