"""Planning evaluation over a fixed episode set (paper §5.1, App. F.1): CEM against random
action sequences, ATE and RPE against the ground-truth trajectories.

    python -m unimm.world_model.evaluate --run runs/wm --recipe world_model_cpu --episodes episodes.npz
    unimm sample --run runs/wm --recipe world_model_cpu --task plan --episodes episodes.npz   # the same

For every episode (`unimm.data_pipelines.navigation`: context frames, goal frame, true poses)
the planner (`planner.py`: CEM with 120 samples, horizon 8, top 5, 3 repeats by default) finds
an action sequence with the run's model as the world model; the plan's poses (the actions
integrated from the start pose) are scored against the true poses: ATE (start-aligned) and
RPE (one-step translation and rotation), as NWM does. Baselines on the same episodes:

- ``random``: action sequences drawn as CEM's first candidates are (the clipped Gaussian of
  the world's action statistics), ``--random-plans`` per episode, their errors averaged;
- ``mean_action``: the Gaussian's mean at every step (what averaging alone gives, no model);
- ``oracle`` (``--oracle``): CEM with the true renderer as the world model, the planner's ceiling.

Writes OUT/plan_eval.json (settings, per-episode and mean errors, the distance used) and
OUT/plan_eval.png (planned vs true trajectories). Episodes must be held out: a run trained on
procedural data of seed s refuses episodes drawn in world s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from unimm.data_pipelines import navigation
from unimm.errors import ConfigError
from unimm.world_model.cem import CEMConfig
from unimm.world_model.distances import DISTANCES, LatentDistance, pick_distance
from unimm.world_model.planner import PlannerConfig, SamplerWorldModel, plan, random_plans
from unimm.world_model.trajectory_metrics import integrate_actions, trajectory_errors
from unimm.world_model.visuals import plot_trajectories

METRICS = ("ate", "rpe_trans", "rpe_rot")
PLAN_EPISODES = 8
ROLLOUT_EPISODES = 1


def navigation_planner(cem: CEMConfig) -> PlannerConfig:
    """CEM over the navigation world's actions: the first Gaussian is the data's action
    statistics (`navigation.action_prior`), candidates clipped to its action box."""
    mean, std = navigation.action_prior()
    return PlannerConfig(cem=cem, init_mean=mean, init_std=std, low=navigation.ACTION_LOW, high=navigation.ACTION_HIGH)


class FrameEncoder:
    """uint8 frames -> latents as the model reads them (the run's encoder, then its normaliser)."""

    def __init__(self, encoder, normalizer, device):
        self.encoder, self.normalizer, self.device = encoder, normalizer, device

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        latents = self.encoder.encode(frames)
        if self.normalizer is not None:
            latents = self.normalizer.normalize(latents)
        return torch.from_numpy(np.asarray(latents, dtype=np.float32)).to(self.device)


class RenderedWorld:
    """The true world as a world model: the view at the pose an action sequence reaches."""

    def __init__(self, episode: navigation.Episode, encode: FrameEncoder):
        self.episode, self.encode = episode, encode
        self.world = navigation.texture_map(episode.world_seed)

    def final_frames(self, context_KNC: torch.Tensor, actions_BH3: torch.Tensor) -> torch.Tensor:
        start = self.episode.poses[0]
        ends = [integrate_actions(start, a)[-1] for a in actions_BH3.double().cpu().numpy()]
        views = np.stack([navigation.view(self.world, tuple(p), self.episode.image_size) for p in ends])
        return self.encode(views)


@dataclass(frozen=True)
class PlanEvalSettings:
    cem: CEMConfig = CEMConfig()
    distance: str = "auto"
    random_plans: int = 120
    oracle: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.distance not in DISTANCES:
            raise ConfigError(f"--distance must be one of {', '.join(DISTANCES)}, got {self.distance!r}")
        if self.random_plans < 1:
            raise ConfigError(f"--random-plans must be >= 1, got {self.random_plans}")


@dataclass
class _Method:
    errors: list[dict[str, float]] = field(default_factory=list)

    def mean(self) -> dict[str, float]:
        return {m: float(np.mean([e[m] for e in self.errors])) for m in METRICS}


def _wins(rows: list[dict], others: list[str]) -> dict[str, dict[str, int]]:
    """Per baseline and metric: on how many episodes the CEM plan's error is the lower one
    (means can hide one lucky episode)."""
    return {name: {m: sum(row["cem"][m] < row[name][m] for row in rows) for m in METRICS} for name in others}


def _errors(truth: np.ndarray, actions: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    poses = integrate_actions(truth[0], actions)
    return asdict(trajectory_errors(truth, poses)), poses


def check_episodes(episodes: list[navigation.Episode], path: Path, image_size: int, horizon: int,
                   training_seed: int | None) -> None:
    """Episodes the run can read, held out from its training world, as long as the plans."""
    sizes = {e.image_size for e in episodes}
    if sizes != {image_size}:
        raise ConfigError(
            f"episode file {path}: views of {sorted(sizes)} px, but the run's encoder reads {image_size} px: "
            f"write episodes with python -m unimm.data_pipelines.navigation --image-size {image_size}"
        )
    horizons = {e.horizon for e in episodes}
    if horizons != {horizon}:
        raise ConfigError(f"episode file {path}: episodes of {sorted(horizons)} steps, the planner's --horizon is {horizon}")
    if training_seed is not None and any(e.world_seed == training_seed for e in episodes):
        raise ConfigError(
            f"episode file {path}: episodes in world seed {training_seed}, the world the run trained in "
            f"(--dataloader.procedural_seed): draw held-out episodes with another --seed (default {navigation.EPISODE_SEED})"
        )


def evaluate_planning(
    sampler, encoder, normalizer, episodes: list[navigation.Episode], settings: PlanEvalSettings,
    out: Path, *, episodes_path: Path, training_seed: int | None, extra: dict | None = None, progress: bool = True,
) -> dict:
    """Plan every episode with CEM (and the baselines); write plan_eval.json and .png to ``out``."""
    check_episodes(episodes, episodes_path, encoder.image_size, settings.cem.horizon, training_seed)
    decode = getattr(encoder, "decode", None)
    decoder = None
    if decode is not None:
        def decoder(latents: np.ndarray) -> np.ndarray:
            return decode(normalizer.denormalize(latents) if normalizer is not None else latents)
    distance, note = pick_distance(settings.distance, decoder)
    config = navigation_planner(settings.cem)
    encode = FrameEncoder(encoder, normalizer, sampler.device)
    model = SamplerWorldModel(sampler)
    steps = len(episodes) * settings.cem.iterations * settings.cem.repeats * settings.cem.horizon * sampler.config.euler_steps
    bar = tqdm(total=steps, desc="CEM planning (denoising steps)", unit="step", disable=not progress, file=sys.stderr)
    sampler.progress = bar
    methods = {name: _Method() for name in ("cem", "random", "mean_action", *(("oracle",) if settings.oracle else ()))}
    rows, panels, started = [], [], time.perf_counter()
    mean_plan = np.tile(np.asarray(config.init_mean, dtype=np.float64), (settings.cem.horizon, 1))
    try:
        for e, episode in enumerate(episodes):
            t0 = time.perf_counter()
            context, goal = encode(episode.context_frames), encode(episode.goal_frame[None])[0]
            seed = settings.seed + e
            result = plan(model, distance, context, goal, config, seed=seed)
            cem_actions = result.actions.double().cpu().numpy()
            row = {"index": episode.index, "world_seed": episode.world_seed}
            row["cem"], cem_poses = _errors(episode.poses, cem_actions)
            row["cem_plan"] = cem_actions.round(4).tolist()
            row["cem_best_cost"] = result.cem.best_cost
            randoms = random_plans(config, settings.random_plans, seed=seed).double().numpy()
            random_errors = [_errors(episode.poses, a)[0] for a in randoms]
            row["random"] = {m: float(np.mean([r[m] for r in random_errors])) for m in METRICS}
            row["mean_action"], _ = _errors(episode.poses, mean_plan)
            paths = {"truth": episode.poses, "cem": cem_poses, "random": _errors(episode.poses, randoms[0])[1],
                     "mean_action": integrate_actions(episode.poses[0], mean_plan)}
            if settings.oracle:
                oracle = plan(RenderedWorld(episode, encode), LatentDistance(), context, goal, config, seed=seed)
                row["oracle"], paths["oracle"] = _errors(episode.poses, oracle.actions.double().numpy())
            row["truth_actions"] = episode.actions.round(4).tolist()
            row["seconds"] = round(time.perf_counter() - t0, 2)
            for name, method in methods.items():
                method.errors.append(row[name])
            rows.append(row)
            panels.append({"title": f"episode {episode.index}: ATE cem {row['cem']['ate']:.2f} / random {row['random']['ate']:.2f}",
                           "paths": paths})
    finally:
        sampler.progress = None
        bar.close()
    means = {name: method.mean() for name, method in methods.items()}
    cem = settings.cem
    report = {
        **(extra or {}),
        "episodes": {"file": str(episodes_path), "count": len(episodes),
                     "world_seeds": sorted({e.world_seed for e in episodes}), "training_seed": training_seed},
        "planner": {"method": "CEM", "samples": cem.num_samples, "horizon": cem.horizon, "top_k": cem.top_k,
                    "repeats": cem.repeats, "iterations": cem.iterations, "init_mean": list(config.init_mean),
                    "init_std": list(config.init_std), "low": list(config.low), "high": list(config.high)},
        "sampling": {"euler_steps": sampler.config.euler_steps, "cfg_scale": sampler.config.cfg_scale},
        "distance": distance.name,
        "distance_note": note,
        "random_plans": settings.random_plans,
        "metrics": {"ate": "absolute trajectory error, start-aligned (m)", "rpe_trans": "relative pose error, 1 step (m)",
                    "rpe_rot": "relative pose error, 1 step (rad)"},
        "mean": means,
        "cem_beats_random": {m: means["cem"][m] < means["random"][m] for m in METRICS},
        "cem_wins": _wins(rows, [name for name in methods if name != "cem"]),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "per_episode": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_eval.json").write_text(json.dumps(report, indent=2))
    plot_trajectories(out / "plan_eval.png", panels[:8])
    return report


def summary(report: dict) -> str:
    """A few lines for a person: the mean errors of each method and the distance used."""
    lines = [f"distance: {report['distance']} ({report['distance_note']})"]
    for name, errors in report["mean"].items():
        lines.append(f"{name:>12}: " + "  ".join(f"{m} {errors[m]:.3f}" for m in METRICS))
    beats = report["cem_beats_random"]
    lines.append("CEM beats random on " + (", ".join(m for m in METRICS if beats[m]) or "nothing"))
    count = report["episodes"]["count"]
    for name, wins in report["cem_wins"].items():
        lines.append(f"CEM better than {name} on " + ", ".join(f"{m} {wins[m]}/{count}" for m in METRICS) + " episodes")
    return "\n".join(lines)


def add_planning_arguments(parser: argparse.ArgumentParser) -> None:
    """The planner's and the evaluation's options (shared with ``unimm sample --task plan``)."""
    defaults = CEMConfig()
    parser.add_argument("--episodes", type=Path, default=None, metavar="FILE",
                        help="episode file (python -m unimm.data_pipelines.navigation; default: --count held-out episodes drawn now)")
    parser.add_argument("--count", type=int, default=None, metavar="N",
                        help=f"episodes to use, the first N (default: {PLAN_EPISODES} to plan, {ROLLOUT_EPISODES} to roll out)")
    parser.add_argument("--samples", type=int, metavar="N", default=defaults.num_samples, help=f"CEM candidates (default: {defaults.num_samples})")
    parser.add_argument("--horizon", type=int, metavar="N", default=defaults.horizon, help=f"CEM horizon, actions per plan (default: {defaults.horizon})")
    parser.add_argument("--top-k", type=int, metavar="N", default=defaults.top_k, help=f"CEM elites (default: {defaults.top_k})")
    parser.add_argument("--repeats", type=int, metavar="N", default=defaults.repeats, help=f"rollouts per candidate, costs averaged (default: {defaults.repeats})")
    parser.add_argument("--iterations", type=int, metavar="N", default=defaults.iterations, help=f"CEM refits (default: {defaults.iterations})")
    parser.add_argument("--distance", choices=DISTANCES, default="auto",
                        help="planning cost: auto (LPIPS when its weights are here and the latents decode, else latent), latent, pixel, lpips")
    parser.add_argument("--random-plans", type=int, default=120, metavar="N", help="random action sequences per episode, the baseline (default: 120)")
    parser.add_argument("--oracle", action="store_true", help="also plan with the true renderer as the world model (the ceiling)")


def settings_from(args: argparse.Namespace) -> PlanEvalSettings:
    try:
        cem = CEMConfig(num_samples=args.samples, horizon=args.horizon, top_k=args.top_k, iterations=args.iterations,
                        repeats=args.repeats)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return PlanEvalSettings(cem=cem, distance=args.distance, random_plans=args.random_plans, oracle=args.oracle, seed=args.seed)


def load_episodes(args: argparse.Namespace, image_size: int, out: Path) -> tuple[list[navigation.Episode], Path]:
    """The first ``--count`` episodes of ``--episodes``, or as many drawn now (held-out seed) and
    written to OUT/episodes.npz so the evaluation can be repeated on the same set."""
    count = PLAN_EPISODES if args.count is None else args.count
    if count < 1:
        raise ConfigError(f"--count must be >= 1, got {count}")
    path = args.episodes
    if path is None:
        path = navigation.write_episodes(out / "episodes.npz", count, image_size=image_size, horizon=args.horizon, progress=False)
    return navigation.read_episodes(path)[:count], path


def training_seed(config) -> int | None:
    """The world seed a run trained in: procedural data's seed; None for shards written elsewhere."""
    return None if config.dataloader.shards else int(config.dataloader.procedural_seed)


def main(argv: list[str] | None = None) -> int:
    from unimm.sampling_cli import add_run_arguments, load_run

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    add_planning_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args, overrides = parser.parse_known_args(argv)
    args.config_overrides = overrides
    try:
        settings = settings_from(args)
        run = load_run(args)
        out = Path(args.out or Path(args.run) / "samples")
        episodes, path = load_episodes(args, run.encoder.image_size, out)
        report = evaluate_planning(
            run.sampler, run.encoder, run.normalizer, episodes, settings, out, episodes_path=path,
            training_seed=training_seed(run.config), extra=run.describe(),
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else f"{summary(report)}\nwrote {out / 'plan_eval.json'} and {out / 'plan_eval.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
