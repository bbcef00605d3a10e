"""Generation with the KV cache computes what the full forward pass under the hybrid mask does;
batches give what their rows give alone; ``unimm sample`` refuses bad input clearly."""

import dataclasses
import json

import numpy as np
import pytest
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


def test_a_batch_of_ragged_prompts_gives_what_each_prompt_gives_alone():
    tk = build_tokenizer()
    model = tiny_model("modality")
    prompts = ["a red star", "two small blue squares at the top"]

    def sampler(kv_cache: bool = True):
        return MixedModalSampler(model, tk, FlowMatchingConfig(), 1.0, N, SamplingConfig(euler_steps=2, kv_cache=kv_cache),
                                 generator=torch.Generator().manual_seed(0))

    batch = sampler().text_to_images(prompts)
    one = sampler()
    alone = torch.stack([one.text_to_image(p) for p in prompts])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sampler(kv_cache=False).text_to_images(prompts), batch, atol=1e-5, rtol=1e-5)
    # a video continued from its given first frame: the same rows again, batched and alone
    first = torch.randn(2, 1, N, C, generator=torch.Generator().manual_seed(1))
    videos = sampler().generate_videos(prompts, 1, first)
    one = sampler()
    for b, p in enumerate(prompts):
        torch.testing.assert_close(torch.stack(one.generate_video(p, 1, list(first[b]))), videos[b], atol=1e-5, rtol=1e-5)


def test_a_sequence_longer_than_the_model_is_refused():
    from unimm.sampling import ContextTooLong

    tk = build_tokenizer()
    sampler = MixedModalSampler(tiny_model("shared"), tk, FlowMatchingConfig(), 1.0, N, SamplingConfig(euler_steps=1))
    with pytest.raises(ContextTooLong, match="needs 66 positions, more than the model's max_seq_len 64"):
        sampler.text_to_image("x" * 60)  # <bos> 60 bytes <boi> + 4 patches


# ---------------------------------------------------------------- unimm sample


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory, data_cache):
    """A run folder holding an untrained world_model_cpu checkpoint, and the options to read it."""
    from conftest import small_run_options

    from unimm.convert.dcp_io import save_model_checkpoint
    from unimm.titan.launch import load_recipe, preflight

    options = small_run_options(data_cache)
    config = load_recipe("world_model_cpu", options)
    preflight(config)
    torch.manual_seed(0)
    model = config.model_spec.model.build()
    model.init_weights()
    run = tmp_path_factory.mktemp("run")
    save_model_checkpoint(model.state_dict(), run / "checkpoint" / "step-1")
    return run, options, config


def _sample_args(run, options, *extra):
    from unimm.cli import build_parser

    args, overrides = build_parser().parse_known_args(
        ["sample", "--run", str(run), "--recipe", "world_model_cpu", "--no-progress", *extra, *options]
    )
    args.config_overrides = overrides
    return args


def test_sample_refuses_an_unknown_task(capsys):
    from unimm.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["sample", "--run", "r", "--recipe", "world_model_cpu", "--task", "dream"])
    assert stop.value.code == 2
    assert "argument --task: invalid choice: 'dream'" in capsys.readouterr().err


def test_sample_refuses_a_prompt_longer_than_the_context(untrained_run, tmp_path):
    from unimm.errors import ConfigError

    run, options, config = untrained_run
    args = _sample_args(run, options, "--task", "t2i", "--prompt", "x" * 500, "--out", str(tmp_path))
    with pytest.raises(ConfigError, match=r"--prompt 'x+.*' is 500 tokens: .* needs 518 positions, more than the model's max_seq_len 512"):
        args.func(args)


def test_sample_refuses_a_checkpoint_of_another_architecture(untrained_run, tmp_path):
    from unimm.convert.dcp_io import save_model_checkpoint
    from unimm.errors import ConfigError

    _, options, config = untrained_run
    other = dataclasses.replace(config.model_spec.model, n_layers=2)
    save_model_checkpoint(other.build().state_dict(), tmp_path / "checkpoint" / "step-3")
    args = _sample_args(tmp_path, options, "--task", "t2i")
    with pytest.raises(ConfigError, match=r"step-3 holds another architecture than recipe 'world_model_cpu'.*missing layers\.2\."):
        args.func(args)


@pytest.mark.slow
def test_sample_rolls_out_and_plans_with_a_run(untrained_run, tmp_path):
    run, options, _ = untrained_run
    args = _sample_args(
        run, options, "--task", "rollout", "--task", "plan", "--keys", "WA", "--action", "go to the red disc",
        "--frames", "2", "--euler-steps", "1", "--samples", "4", "--top-k", "2", "--horizon", "2", "--repeats", "1",
        "--random-plans", "4", "--count", "1", "--out", str(tmp_path), "--json",
    )
    assert args.func(args) == 0
    report = json.loads((tmp_path / "samples.json").read_text())
    rows = report["rollout"]
    assert [r["actions"] for r in rows] == [["dx +0.50 dy +0.00 dyaw +0.00", "dx +0.20 dy +0.00 dyaw +0.50"],
                                            ["go to the red disc"] * 2]
    for r in rows:
        assert np.load(tmp_path / r["latents"]).shape == (2, 16, 48)
        assert (tmp_path / r["png"]).is_file() and (tmp_path / r["gif"]).is_file()  # raw pixels decode
    assert report["plan"]["distance"] == "latent_mse"
    plan = json.loads((tmp_path / "plan_eval.json").read_text())
    assert plan["planner"]["samples"] == 4 and plan["episodes"]["world_seeds"] == [1] and len(plan["per_episode"]) == 1
