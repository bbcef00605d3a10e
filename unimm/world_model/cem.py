"""Cross-Entropy Method planning over continuous action sequences (paper §5, App. F.1; NWM).

The paper plans with CEM "following NWM": N = 120 candidate action sequences from a Gaussian,
an 8-step horizon, the top K = 5 by cost, "average their actions for the final plan", and "each
evaluation instance repeats this process 3 times". In NWM's released planner (`planning_eval.py`,
README command `--num_samples 120 --topk 5 --opt_steps 1 --num_repeat_eval 3`) the 3 is
`num_repeat_eval`: the world model is stochastic, so every candidate is rolled out and scored 3
times and its cost is the mean (variance reduction); the Gaussian is refitted `opt_steps` = 1
time. The defaults here follow that reading: `repeats=3` cost evaluations per candidate,
`iterations=1` sample-score-refit round. For a deterministic cost set `repeats=1`; to let the
distribution converge raise `iterations`.

One iteration, with mean mu and std sigma of shape [horizon, action_dim]:

    a_n = clip(mu + sigma * eps_n, low, high),  eps_n ~ N(0, I),  n = 1..N
    c_n = (1/R) * sum_r cost(a)[n]                      (R = repeats)
    E   = the K candidates with the lowest c_n
    mu  = mean_{n in E} a_n,  sigma = max(std_{n in E} a_n, min_std)

The final plan is the elite mean mu (clipped); the lowest-cost candidate seen is returned too.
Randomness comes only from a seeded `torch.Generator`, so a plan is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["CEMConfig", "CEMIteration", "CEMResult", "cem_plan"]

CostFn = Callable[[torch.Tensor], torch.Tensor]  # [N, horizon, action_dim] -> [N], lower is better


@dataclass(frozen=True)
class CEMConfig:
    """Paper / NWM settings by default (see the module docstring for `repeats` vs `iterations`)."""

    num_samples: int = 120
    horizon: int = 8
    top_k: int = 5
    iterations: int = 1  # NWM opt_steps: sample -> score -> refit rounds
    repeats: int = 3  # NWM num_repeat_eval: cost evaluations per candidate, averaged
    action_dim: int = 3  # (dx, dy, dyaw)
    min_std: float = 0.0  # floor on the refitted std, per dimension

    def __post_init__(self) -> None:
        for name in ("num_samples", "horizon", "top_k", "iterations", "repeats", "action_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"CEM {name} must be a positive integer, got {v!r}")
        if self.top_k > self.num_samples:
            raise ValueError(f"CEM top_k ({self.top_k}) cannot exceed num_samples ({self.num_samples})")
        if not self.min_std >= 0:
            raise ValueError(f"CEM min_std must be >= 0, got {self.min_std!r}")


@dataclass
class CEMIteration:
    mean: torch.Tensor  # [horizon, action_dim], the distribution sampled in this iteration
    std: torch.Tensor
    elite_costs: torch.Tensor  # [top_k], ascending
    best_cost: float  # lowest cost in this iteration
    mean_cost: float  # mean over the finite costs of this iteration


@dataclass
class CEMResult:
    plan: torch.Tensor  # [horizon, action_dim], the final elite mean (the paper's plan)
    best_actions: torch.Tensor  # [horizon, action_dim], the lowest-cost candidate sampled
    best_cost: float
    plan_cost: float | None  # cost of `plan` when cem_plan(score_plan=True), else None
    history: list[CEMIteration] = field(default_factory=list)
    evaluations: int = 0  # candidate sequences passed to the cost function, in total


def _per_step(value, horizon: int, dim: int, name: str, device, dtype) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.dim() == 0:
        t = t.expand(dim)
    if t.shape == (dim,):
        t = t.expand(horizon, dim)
    if t.shape != (horizon, dim):
        raise ValueError(f"CEM {name} must be a scalar, [{dim}] or [{horizon}, {dim}], got shape {tuple(t.shape)}")
    return t.clone()


def _score(cost: CostFn, actions: torch.Tensor, repeats: int) -> torch.Tensor:
    total = None
    for _ in range(repeats):
        c = cost(actions.clone())
        c = torch.as_tensor(c)
        if c.shape != (actions.shape[0],):
            raise ValueError(f"CEM cost must return shape [{actions.shape[0]}], got {tuple(c.shape)}")
        c = c.detach().to(device=actions.device, dtype=torch.float64)
        total = c if total is None else total + c
    scores = total / repeats
    return torch.where(torch.isnan(scores), torch.full_like(scores, float("inf")), scores)


def cem_plan(
    cost: CostFn,
    config: CEMConfig = CEMConfig(),
    *,
    init_mean: float | Sequence[float] | torch.Tensor = 0.0,
    init_std: float | Sequence[float] | torch.Tensor = 1.0,
    low: float | Sequence[float] | torch.Tensor | None = None,
    high: float | Sequence[float] | torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int = 0,
    score_plan: bool = False,
    dtype: torch.dtype = torch.float32,
) -> CEMResult:
    """Minimise `cost` over action sequences [horizon, action_dim] with CEM.

    cost: batched, `cost(actions[N, horizon, action_dim]) -> [N]`, lower is better (NaN counts as
        +inf). Called `repeats` times per iteration on the same candidates; costs are averaged.
    init_mean, init_std: the first Gaussian, a scalar, one value per action dimension, or one per
        step and dimension (NWM uses dataset priors here).
    low, high: per-dimension bounds (same shapes); samples and the plan are clipped into them.
    generator: a torch.Generator on the device of `init_mean`; if None, one seeded with `seed`.
    score_plan: also score the final plan (costs `repeats` more calls on a batch of 1).
    """
    H, D = config.horizon, config.action_dim
    device = init_mean.device if isinstance(init_mean, torch.Tensor) else torch.device("cpu")
    mean = _per_step(init_mean, H, D, "init_mean", device, dtype)
    std = _per_step(init_std, H, D, "init_std", device, dtype)
    if not torch.isfinite(mean).all() or not torch.isfinite(std).all() or (std < 0).any():
        raise ValueError("CEM init_mean must be finite and init_std finite and >= 0")
    lo = None if low is None else _per_step(low, H, D, "low", device, dtype)
    hi = None if high is None else _per_step(high, H, D, "high", device, dtype)
    if lo is not None and hi is not None and (lo > hi).any():
        raise ValueError(f"CEM bounds need low <= high, got low={lo[0].tolist()} high={hi[0].tolist()}")

    def clip(x: torch.Tensor) -> torch.Tensor:
        if lo is not None or hi is not None:
            x = torch.clamp(x, min=lo, max=hi)
        return x

    if generator is None:
        generator = torch.Generator(device=device).manual_seed(seed)

    history: list[CEMIteration] = []
    best_actions, best_cost = clip(mean.clone()), float("inf")
    evaluations = 0
    for _ in range(config.iterations):
        eps = torch.randn((config.num_samples, H, D), generator=generator, device=device, dtype=dtype)
        samples = clip(mean + std * eps)
        scores = _score(cost, samples, config.repeats)
        evaluations += config.num_samples * config.repeats
        if torch.isinf(scores).all():
            raise ValueError("CEM cost returned no finite value for any candidate")
        order = torch.argsort(scores, stable=True)
        elite_idx = order[: config.top_k]
        elites = samples[elite_idx]
        finite = scores[torch.isfinite(scores)]
        history.append(CEMIteration(mean.clone(), std.clone(), scores[elite_idx].clone(),
                                    float(scores[order[0]]), float(finite.mean())))
        if float(scores[order[0]]) < best_cost:
            best_cost, best_actions = float(scores[order[0]]), samples[order[0]].clone()
        mean = elites.mean(dim=0)
        std = elites.std(dim=0) if config.top_k > 1 else torch.zeros_like(mean)
        std = std.clamp(min=config.min_std)

    plan = clip(mean)
    plan_cost = None
    if score_plan:
        plan_cost = float(_score(cost, plan.unsqueeze(0), config.repeats)[0])
        evaluations += config.repeats
    return CEMResult(plan, best_actions, best_cost, plan_cost, history, evaluations)
