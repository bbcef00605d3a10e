"""Planning with a world model: CEM over action sequences, scored on predicted frames
(paper §5.1, App. F.1; NWM's planner).

For a start (context frames) and a goal frame, every candidate action sequence of the
Cross-Entropy Method (`unimm.world_model.cem`, 120 samples, horizon 8, top 5, 3 repeats by
default) is rolled out by the world model, and its cost is the distance (`distances.py`)
between the predicted final frame and the goal. All candidates of one CEM call go through the
model as one batch. The plan is the final elite mean (NWM: "average their actions").

A world model is anything with ``final_frames(context [K, N, C], actions [B, H, 3]) ->
[B, N, C]``: `SamplerWorldModel` rolls a trained model out (`rollout.rollout`); a renderer of
the true world is another (``unimm.world_model.evaluate``'s oracle).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from unimm.world_model.cem import CEMConfig, CEMResult, cem_plan
from unimm.world_model.distances import Distance
from unimm.world_model.rollout import RolloutConfig, rollout


class WorldModel(Protocol):
    def final_frames(self, context_KNC: torch.Tensor, actions_BH3: torch.Tensor) -> torch.Tensor:
        """[B, N, C]: the frame each action sequence ends at, from the given context."""
        ...


class SamplerWorldModel:
    """A trained model as a world model: rollouts through its sampler (guidance, Euler steps
    and noise as the sampler is configured; its generator makes the repeats differ)."""

    def __init__(self, sampler, num_context: int = RolloutConfig.num_context):
        self.sampler, self.num_context = sampler, num_context

    def final_frames(self, context_KNC: torch.Tensor, actions_BH3: torch.Tensor) -> torch.Tensor:
        return rollout(self.sampler, context_KNC, actions_BH3, self.num_context)[:, -1]


@dataclass(frozen=True)
class PlannerConfig:
    cem: CEMConfig = CEMConfig()
    init_mean: Sequence[float] = (0.0, 0.0, 0.0)
    """The first Gaussian's mean and std per action dimension (the data's action statistics)."""
    init_std: Sequence[float] = (1.0, 1.0, 1.0)
    low: Sequence[float] | None = None
    """Per-dimension bounds the candidates and the plan are clipped into (None: unbounded)."""
    high: Sequence[float] | None = None


@dataclass
class PlanResult:
    actions: torch.Tensor  # [H, 3], the plan
    cem: CEMResult
    distance: str  # the name of the distance that scored the candidates


def plan(
    world_model: WorldModel,
    distance: Distance,
    context_KNC: torch.Tensor,
    goal_NC: torch.Tensor,
    config: PlannerConfig = PlannerConfig(),
    seed: int = 0,
) -> PlanResult:
    """CEM's plan from ``context`` to ``goal`` (latents as the model reads them)."""

    def cost(actions_BH3: torch.Tensor) -> torch.Tensor:
        return distance(world_model.final_frames(context_KNC, actions_BH3), goal_NC)

    result = cem_plan(
        cost, config.cem, init_mean=torch.tensor(config.init_mean), init_std=config.init_std,
        low=config.low, high=config.high, seed=seed,
    )
    return PlanResult(result.plan, result, distance.name)


def random_plans(config: PlannerConfig, count: int, seed: int = 0) -> torch.Tensor:
    """[count, H, 3] action sequences drawn as CEM's first candidates are (the first Gaussian,
    clipped): the baseline a plan has to beat."""
    H, D = config.cem.horizon, config.cem.action_dim
    g = torch.Generator().manual_seed(seed)
    mean, std = torch.tensor(config.init_mean).expand(H, D), torch.tensor(config.init_std).expand(H, D)
    samples = mean + std * torch.randn(count, H, D, generator=g)
    if config.low is not None or config.high is not None:
        low = None if config.low is None else torch.tensor(config.low)
        high = None if config.high is None else torch.tensor(config.high)
        samples = torch.clamp(samples, min=low, max=high)
    return samples
