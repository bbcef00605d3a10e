"""World model (paper §5, App. F.1): rollouts in the training layout, the planner's scoring path,
planning episodes, and the evaluation over them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from unimm.data.batch import VISION
from unimm.data_pipelines import navigation
from unimm.errors import ConfigError
from unimm.flow import FlowMatchingConfig
from unimm.model.ffn import FFNConfig
from unimm.model.transformer import UnimmModel
from unimm.sampling import MixedModalSampler, SamplingConfig
from unimm.tokenizer import build_tokenizer
from unimm.world_model import Action, CEMConfig, format_action, wasd_actions
from unimm.world_model.distances import LatentDistance, PixelDistance, pick_distance
from unimm.world_model.planner import PlannerConfig, plan, random_plans
from unimm.world_model.rollout import rollout
from unimm.world_model.trajectory_metrics import integrate_actions

TK = build_tokenizer()
N, C = 4, 6


def tiny_model(latent_dim: int = C, kind: str = "modality") -> UnimmModel:
    torch.manual_seed(0)
    model = UnimmModel.Config(
        vocab_size=261, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn=FFNConfig(kind=kind, hidden_dim=64),
        max_seq_len=160, latent_dim=latent_dim, rope_theta=10_000.0,
    ).build()
    model.init_weights()
    torch.nn.init.normal_(model.flow_head.weight, std=0.1)
    return model


def sampler_for(model, *, kv_cache: bool = True, seed: int = 0, euler_steps: int = 2) -> MixedModalSampler:
    return MixedModalSampler(
        model, TK, FlowMatchingConfig(), 1.0, N, SamplingConfig(euler_steps=euler_steps, kv_cache=kv_cache),
        generator=torch.Generator().manual_seed(seed),
    )


# ---------------------------------------------------------------- rollouts


class SequenceRecorder:
    """Wraps ``model.hidden_states``: the tokens and modalities of every call."""

    def __init__(self, model):
        self.calls, self._inner = [], model.hidden_states
        model.hidden_states = self

    def __call__(self, tokens_BL, latents_BLC, t_BL, modality_BL, *args, **kwargs):
        self.calls.append((tokens_BL.clone(), modality_BL.clone(), t_BL.clone()))
        return self._inner(tokens_BL, latents_BLC, t_BL, modality_BL, *args, **kwargs)


def test_untrained_rollout_is_in_the_training_layout_step_by_step():
    model = tiny_model()
    rec = SequenceRecorder(model)
    sampler = sampler_for(model, kv_cache=False, euler_steps=1)  # without a cache every call sees the whole row
    context = torch.randn(5, N, C, generator=torch.Generator().manual_seed(1))  # 5 given: the last 4 are read
    rows = [wasd_actions("WA"), [Action.free("go round the pond"), Action(0.1, -0.05, 0.25)]]
    frames = rollout(sampler, context, rows)
    assert frames.shape == (2, 2, N, C) and torch.isfinite(frames).all()
    # one Euler step per frame: a conditional then an unconditional prediction, each call the whole row
    cond_calls = [c for c in rec.calls if (c[2] < 1).any()][::2]
    for step in range(2):
        tokens_BL, modality_BL, t_BL = cond_calls[step]
        for b, row in enumerate(rows):
            action = TK.encode(format_action(row[step]))
            want = [TK.bos_id]
            for _ in range(4):
                want += [TK.boi_id] + [TK.pad_id] * N + [TK.eoi_id]
            want += action + [TK.boi_id] + [TK.pad_id] * N
            got, vision = tokens_BL[b].tolist(), (modality_BL[b] == VISION).tolist()
            # text padding (a shorter action than the other row's) is never seen: leave it out
            kept = [(tok, vis) for tok, vis in zip(got, vision) if vis or tok != TK.pad_id]
            assert [tok for tok, _ in kept] == want, (step, b)
            vision = [vis for _, vis in kept]
            blocks = [i for i in range(1, len(kept)) if vision[i] and not vision[i - 1]]
            assert len(blocks) == 5, "4 context frames and the target, each one <boi> block"
            for start in blocks:
                assert want[start - 1] == TK.boi_id and vision[start : start + N + 1] in ([True] * N + [False], [True] * N)
            assert (t_BL[b, -N:] < 1).all() and (t_BL[b, :-N] == 1).all(), "only the target is noisy"


def test_rollout_with_cache_equals_rollout_without():
    g = torch.Generator().manual_seed(2)
    context = torch.randn(2, 4, N, C, generator=g)
    actions = [wasd_actions("WD"), [Action.free("turn left"), Action(0.5, 0.0, 0.5)]]
    model = tiny_model()
    cached = rollout(sampler_for(model, kv_cache=True, euler_steps=1), context, actions)
    recomputed = rollout(sampler_for(model, kv_cache=False, euler_steps=1), context, actions)
    assert cached.shape == (2, 2, N, C)
    torch.testing.assert_close(cached, recomputed, atol=2e-5, rtol=1e-4)


def test_batched_rollout_rows_are_the_single_rollouts():
    g = torch.Generator().manual_seed(3)
    context = torch.randn(4, N, C, generator=g)
    rows = [wasd_actions("W"), [Action.free("a much longer free-form action text")]]  # ragged: row 0 padded
    model = tiny_model()
    both = rollout(sampler_for(model, seed=5), context, rows)
    # the batch draws each row's noise in turn, so row b alone, after b frames of noise drawn
    # from the same generator, denoises the same noise
    for b in range(2):
        sampler = sampler_for(model, seed=5)
        for _ in range(b):
            torch.randn(N, C, generator=sampler.generator)
        torch.testing.assert_close(rollout(sampler, context, [rows[b]])[0], both[b], atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- the planner's scoring path


class PoseWorld:
    """A fake world model whose frame shows where an action sequence ends: 4 tokens, each
    (x, y, yaw) of the final pose from the origin, as latents a decoder can draw."""

    def final_frames(self, context_KNC, actions_BH3):
        ends = torch.tensor(np.array([integrate_actions((0.0, 0.0, 0.0), a)[-1] for a in actions_BH3.double().numpy()]))
        return ends[:, None, :].expand(-1, 4, 3).float()


def blob_decoder(latents: np.ndarray) -> np.ndarray:
    """uint8 [B, 16, 16, 3]: a Gaussian spot at the pose's (x, y), 4 px per metre around the centre."""
    xy = latents[:, 0, :2]
    grid = (np.arange(16) - 7.5) / 4.0
    d2 = (grid[None, None, :] - xy[:, 0, None, None]) ** 2 + (grid[None, :, None] - xy[:, 1, None, None]) ** 2
    image = np.exp(-d2 / 0.5)
    return np.repeat((255 * image)[..., None], 3, axis=-1).astype(np.uint8)


@pytest.mark.parametrize("distance", [LatentDistance(), PixelDistance(blob_decoder)], ids=["latent", "decoded_pixels"])
def test_planner_reaches_the_goal_of_a_known_world(distance):
    truth = np.array([[0.5, 0.0, 0.4], [0.4, 0.1, 0.3], [0.5, -0.1, 0.0]])
    goal = PoseWorld().final_frames(None, torch.tensor(truth)[None])[0]
    config = PlannerConfig(
        cem=CEMConfig(num_samples=120, horizon=3, top_k=5, iterations=4, repeats=1),
        init_mean=(0.05, 0.0, 0.0), init_std=(0.33, 0.08, 0.32), low=navigation.ACTION_LOW, high=navigation.ACTION_HIGH,
    )
    result = plan(PoseWorld(), distance, torch.zeros(4, 4, 3), goal, config, seed=0)
    assert result.distance == distance.name and result.cem.evaluations == 4 * 120
    end = integrate_actions((0, 0, 0), result.actions.double().numpy())[-1]
    goal_end = integrate_actions((0, 0, 0), truth)[-1]
    miss = np.hypot(*(end[:2] - goal_end[:2]))
    random_miss = np.mean([np.hypot(*(integrate_actions((0, 0, 0), a)[-1][:2] - goal_end[:2]))
                           for a in random_plans(config, 200).double().numpy()])
    assert miss < 0.15 < random_miss / 4, (miss, random_miss)


def test_distance_choice_is_named_and_lpips_needs_its_weights():
    latent, note = pick_distance("auto", None)
    assert latent.name == "latent_mse" and "LPIPS cannot run here" in note
    pixel, _ = pick_distance("pixel", blob_decoder)
    assert pixel.name == "pixel_mse"
    with pytest.raises(ConfigError, match="--distance pixel: the run's latents have no decoder"):
        pick_distance("pixel", None)
    a, b = torch.zeros(2, 4, 3), torch.ones(4, 3)
    torch.testing.assert_close(LatentDistance()(a, b), torch.ones(2))


def test_random_plans_follow_the_action_prior_within_the_bounds():
    mean, std = navigation.action_prior()
    config = PlannerConfig(cem=CEMConfig(horizon=8), init_mean=mean, init_std=std,
                           low=navigation.ACTION_LOW, high=navigation.ACTION_HIGH)
    plans = random_plans(config, 500, seed=1)
    assert plans.shape == (500, 8, 3)
    assert (plans >= torch.tensor(navigation.ACTION_LOW)).all() and (plans <= torch.tensor(navigation.ACTION_HIGH)).all()
    # the prior is the navigation world's actions: half WASD, half uniform in the box, by hand
    rng = np.random.default_rng(0)
    drawn = np.array([navigation._random_action(rng)[0] for _ in range(20000)])
    np.testing.assert_allclose(mean, drawn.mean(0), atol=0.01)
    np.testing.assert_allclose(std, drawn.std(0), atol=0.01)
    assert mean == pytest.approx((0.05, 0.0, 0.0)) and std[1] == pytest.approx(math.sqrt(0.04 / 6))


# ---------------------------------------------------------------- episodes


def test_episode_file_round_trip(tmp_path):
    path = navigation.write_episodes(tmp_path / "ep.npz", 2, seed=1, image_size=8, horizon=3, progress=False)
    episodes = navigation.read_episodes(path)
    assert len(episodes) == 2
    for i, e in enumerate(episodes):
        fresh = navigation.planning_episode(i, 1, image_size=8, horizon=3)
        np.testing.assert_array_equal(e.context_frames, fresh.context_frames)
        np.testing.assert_array_equal(e.goal_frame, fresh.goal_frame)
        np.testing.assert_allclose(e.poses, fresh.poses)
        assert e.context_frames.shape == (4, 8, 8, 3) and e.poses.shape == (4, 3) and e.horizon == 3
        np.testing.assert_allclose(e.poses[0], e.context_poses[-1])
        np.testing.assert_allclose(integrate_actions(e.poses[0], e.actions)[:, :2], e.poses[:, :2], atol=1e-9)
        # the goal is the view at the last pose of the walk
        np.testing.assert_array_equal(e.goal_frame, navigation.view(navigation.texture_map(1), tuple(e.poses[-1]), 8))
    # held out: episodes of seed 1 never repeat the training stream's walks, seed 0's
    training = navigation.navigation_sample(0, 1, image_size=8)
    assert not np.allclose(training["poses"][0], episodes[0].context_poses[0])


def _rewrite(src, dst, **changes):
    with np.load(src) as data:
        arrays = {k: data[k] for k in data.files}
    arrays.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del arrays[k]
    with open(dst, "wb") as f:
        np.savez(f, **arrays)
    return dst


def test_episode_file_of_the_wrong_format_names_the_file_and_key(tmp_path):
    good = navigation.write_episodes(tmp_path / "ep.npz", 1, image_size=8, horizon=2, progress=False)
    with np.load(good) as data:
        poses, actions = data["poses"].copy(), data["actions"].copy()
    cases = {
        "goal_frames": dict(goal_frames=None),
        "format": dict(format=np.array("something else")),
        "actions": dict(actions=actions.astype(np.int64)),
        "context_poses": dict(context_poses=poses[:, :2]),
    }
    for key, change in cases.items():
        bad = _rewrite(good, tmp_path / f"bad_{key}.npz", **change)
        with pytest.raises(ConfigError, match=rf"episode file {bad}: .*'{key}'"):
            navigation.read_episodes(bad)
    moved = poses.copy()
    moved[0, -1, 0] += 1.0
    bad = _rewrite(good, tmp_path / "bad_walk.npz", poses=moved)
    with pytest.raises(ConfigError, match="key 'poses' of episode 0 is not the walk of its 'actions'"):
        navigation.read_episodes(bad)
    text = tmp_path / "notes.npz"
    text.write_text("not an archive")
    with pytest.raises(ConfigError, match=f"episode file {text}: not an .npz"):
        navigation.read_episodes(text)
    with pytest.raises(ConfigError, match="no such file"):
        navigation.read_episodes(tmp_path / "missing.npz")


# ---------------------------------------------------------------- the evaluation


def test_planning_evaluation_writes_errors_of_every_method(tmp_path):
    from unimm.data_pipelines.raw_pixels import RawPixels
    from unimm.world_model.evaluate import PlanEvalSettings, evaluate_planning
    from unimm.world_model.trajectory_metrics import trajectory_errors

    path = navigation.write_episodes(tmp_path / "ep.npz", 2, image_size=4, horizon=2, progress=False)
    episodes = navigation.read_episodes(path)
    encoder = RawPixels(4, 2)  # 4 tokens of 12 channels
    sampler = MixedModalSampler(tiny_model(latent_dim=12), TK, FlowMatchingConfig(), 1.0, N,
                                SamplingConfig(euler_steps=1), generator=torch.Generator().manual_seed(0))
    settings = PlanEvalSettings(cem=CEMConfig(num_samples=6, horizon=2, top_k=2, repeats=1), distance="auto",
                                random_plans=8, oracle=True)
    report = evaluate_planning(sampler, encoder, None, episodes, settings, tmp_path / "out", episodes_path=path,
                               training_seed=0, progress=False)
    assert json.loads((tmp_path / "out" / "plan_eval.json").read_text()) == report
    assert (tmp_path / "out" / "plan_eval.png").stat().st_size > 0
    assert report["distance"] == "latent_mse" and "LPIPS" in report["distance_note"]  # no lpips here
    assert set(report["mean"]) == {"cem", "random", "mean_action", "oracle"}
    row, truth = report["per_episode"][0], episodes[0].poses
    # the CEM plan's errors are those of its own actions, integrated from the start pose
    errors = trajectory_errors(truth, integrate_actions(truth[0], np.array(row["cem_plan"])))
    assert row["cem"]["ate"] == pytest.approx(errors.ate, abs=1e-3)
    assert report["mean"]["cem"]["ate"] == pytest.approx(np.mean([r["cem"]["ate"] for r in report["per_episode"]]))
    rows = report["per_episode"]
    assert set(report["cem_wins"]) == {"random", "mean_action", "oracle"}
    assert report["cem_wins"]["random"]["ate"] == sum(r["cem"]["ate"] < r["random"]["ate"] for r in rows)
    with pytest.raises(ConfigError, match="the world the run trained in"):
        evaluate_planning(sampler, encoder, None, episodes, settings, tmp_path / "out", episodes_path=path,
                          training_seed=1, progress=False)
