"""IsoFLOP scaling-law fits (paper §7, Chinchilla "approach 2").

For one (modality, family) group of runs:

1. per compute budget C, a parabola of loss in log10 N; its vertex is N_opt(C) and L_opt(C), and
   D_opt(C) = C / (6 N_opt) (N is active parameters for MoE, as in the FLOP count);
2. power laws N_opt = k_N C^a and D_opt = k_D C^b by least squares in log-log space, with
   bootstrap percentile intervals (points resampled within each budget, everything refitted).
   Because D_opt is derived from N_opt, b = 1 - a holds exactly, in every replicate too;
3. L(C) = A C^-alpha + E through the per-budget minima, E by grid search.

The numerical pieces are plain functions of numpy arrays; :func:`fit_group` and :func:`fit_runs`
tie them to the run table and record every budget they could not use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from unimm.scaling.table import MODALITIES, Dropped, Run, assign_budgets, screen_runs


class FitRejected(ValueError):
    """A budget whose IsoFLOP curve gives no trustworthy minimum; the message says why."""


@dataclass(frozen=True)
class Parabola:
    """loss = loss_min + curvature * (log10 N - log10_n_opt)^2"""

    curvature: float
    log10_n_opt: float
    loss_min: float

    def __call__(self, log10_n: np.ndarray | float) -> np.ndarray:
        return self.loss_min + self.curvature * (np.asarray(log10_n, dtype=float) - self.log10_n_opt) ** 2


@dataclass(frozen=True, eq=False)
class BudgetFit:
    flops: float
    runs: tuple[str, ...]
    params: np.ndarray
    loss: np.ndarray
    parabola: Parabola
    extrapolated: bool  # minimum outside the sampled sizes, but within the allowed margin

    @property
    def n_opt(self) -> float:
        return float(10.0**self.parabola.log10_n_opt)

    @property
    def d_opt(self) -> float:
        return self.flops / (6.0 * self.n_opt)

    @property
    def loss_opt(self) -> float:
        return self.parabola.loss_min


@dataclass(frozen=True)
class PowerLaw:
    """y = coef * C^exponent"""

    coef: float
    exponent: float

    def __call__(self, flops: np.ndarray | float) -> np.ndarray:
        return self.coef * np.asarray(flops, dtype=float) ** self.exponent


@dataclass(frozen=True)
class OptimalScaling:
    n_opt: PowerLaw  # N_opt = k_N C^a
    d_opt: PowerLaw  # D_opt = k_D C^b
    a_ci: tuple[float, float] | None  # None when no bootstrap replicate could be fitted
    b_ci: tuple[float, float] | None
    n_bootstrap: int  # replicates that gave a fit

    @property
    def a(self) -> float:
        return self.n_opt.exponent

    @property
    def b(self) -> float:
        return self.d_opt.exponent


@dataclass(frozen=True)
class LossCurve:
    """L(C) = A * C^-alpha + E, with C in FLOPs."""

    A: float
    alpha: float
    E: float
    rmse_log: float  # root-mean-square error of log L at the fitted points

    def __call__(self, flops: np.ndarray | float) -> np.ndarray:
        return self.A * np.asarray(flops, dtype=float) ** -self.alpha + self.E


@dataclass(frozen=True)
class FitOptions:
    budget_rtol: float = 0.05  # FLOPs within 5% are one budget (see table.assign_budgets)
    diverge_factor: float = 1.5  # loss above 1.5 x its budget's median: diverged run
    max_extrapolation: float = 0.25  # vertex may lie this fraction of the sampled log-range outside it
    n_bootstrap: int = 1000
    ci: float = 0.95
    seed: int = 0


@dataclass(frozen=True)
class GroupFit:
    modality: str
    family: str | None
    budgets: tuple[BudgetFit, ...]  # ascending compute
    optimal: OptimalScaling | None
    loss_curve: LossCurve | None
    dropped: tuple[Dropped, ...]
    notes: tuple[str, ...]  # laws that could not be fitted, and why

    @property
    def name(self) -> str:
        return self.modality if self.family is None else f"{self.modality}/{self.family}"


def fit_parabola(log10_n: np.ndarray, loss: np.ndarray) -> Parabola:
    curvature, vertex, minimum = _fit_parabolas(
        np.asarray(log10_n, float)[None], np.asarray(loss, float)[None]
    )
    if np.isnan(curvature[0]):
        raise FitRejected("a parabola needs points at >= 3 distinct model sizes")
    return Parabola(float(curvature[0]), float(vertex[0]), float(minimum[0]))


def fit_budget(
    flops: float, runs: Sequence[str], params: np.ndarray, loss: np.ndarray, max_extrapolation: float
) -> BudgetFit:
    """The IsoFLOP minimum of one budget; :class:`FitRejected` when it has none worth using."""
    params, loss = np.asarray(params, dtype=float), np.asarray(loss, dtype=float)
    log10_n = np.log10(params)
    sizes = len(np.unique(log10_n))
    if sizes < 3:
        raise FitRejected(
            f"{len(params)} usable point(s) at {sizes} distinct size(s); a parabola needs >= 3 sizes"
        )
    parabola = fit_parabola(log10_n, loss)
    if not parabola.curvature > 0:
        raise FitRejected("parabola opens downward: the loss has no minimum over the sampled sizes")
    lo, hi = _vertex_window(log10_n, max_extrapolation)
    if not lo <= parabola.log10_n_opt <= hi:
        raise FitRejected(
            f"minimum at N={10**parabola.log10_n_opt:.3g} lies too far outside the sampled sizes "
            f"[{params.min():.3g}, {params.max():.3g}]"
        )
    extrapolated = not log10_n.min() <= parabola.log10_n_opt <= log10_n.max()
    return BudgetFit(float(flops), tuple(runs), params, loss, parabola, extrapolated)


def fit_power_law(flops: np.ndarray, values: np.ndarray) -> PowerLaw:
    """Least squares of log10 values on log10 flops; needs >= 2 distinct budgets."""
    slope, intercept = np.polyfit(np.log10(flops), np.log10(values), 1)
    return PowerLaw(float(10.0**intercept), float(slope))


def fit_optimal_scaling(
    budgets: Sequence[BudgetFit],
    *,
    n_bootstrap: int,
    rng: np.random.Generator,
    ci: float = 0.95,
    max_extrapolation: float = FitOptions.max_extrapolation,
) -> OptimalScaling:
    """N_opt ~ C^a and D_opt ~ C^b over >= 2 budgets, with bootstrap percentile intervals.

    Each replicate resamples the points of every budget with replacement and refits its
    parabola under the same acceptance rules as :func:`fit_budget`, so the interval reflects
    how well each budget pins down its minimum rather than just the scatter of the N_opt.
    """
    if len(budgets) < 2:
        raise ValueError("power laws in C need >= 2 budgets")
    flops = np.array([budget.flops for budget in budgets])
    n_opt = np.array([budget.n_opt for budget in budgets])
    vertices = np.stack(
        [_bootstrap_vertices(budget, n_bootstrap, rng, max_extrapolation) for budget in budgets], axis=1
    )
    a_samples, b_samples = [], []
    for replicate in vertices:
        ok = np.isfinite(replicate)
        if ok.sum() >= 2:
            n_sample = 10.0 ** replicate[ok]
            a_samples.append(fit_power_law(flops[ok], n_sample).exponent)
            b_samples.append(fit_power_law(flops[ok], flops[ok] / (6.0 * n_sample)).exponent)
    return OptimalScaling(
        n_opt=fit_power_law(flops, n_opt),
        d_opt=fit_power_law(flops, flops / (6.0 * n_opt)),
        a_ci=_percentile_interval(a_samples, ci),
        b_ci=_percentile_interval(b_samples, ci),
        n_bootstrap=len(a_samples),
    )


def fit_loss_curve(flops: np.ndarray, loss: np.ndarray, grid_size: int = 4000) -> LossCurve:
    """L(C) = A C^-alpha + E: for each E on a grid over [0, min L) a line through
    log(L - E) vs log C gives A and alpha; the E kept is the one whose curve best fits log L.

    The error is measured on log L, not on log(L - E): the latter is a different quantity for
    every E and blows up as E nears min L, which would bias the choice towards small E.
    """
    flops, loss = np.asarray(flops, dtype=float), np.asarray(loss, dtype=float)
    if len(np.unique(flops)) < 3:
        raise ValueError("L(C) has three parameters: it needs >= 3 budgets")
    floors = np.linspace(0.0, loss.min(), grid_size, endpoint=False)
    log_c = np.log(flops)
    centred = log_c - log_c.mean()
    reducible = np.log(loss[None, :] - floors[:, None])  # one row per candidate E
    slope = (reducible - reducible.mean(axis=1, keepdims=True)) @ centred / (centred @ centred)
    intercept = reducible.mean(axis=1) - slope * log_c.mean()
    predicted = np.exp(intercept[:, None] + slope[:, None] * log_c[None, :]) + floors[:, None]
    error = np.mean((np.log(loss)[None, :] - np.log(predicted)) ** 2, axis=1)
    best = int(np.argmin(error))
    return LossCurve(
        A=float(np.exp(intercept[best])),
        alpha=float(-slope[best]),
        E=float(floors[best]),
        rmse_log=float(np.sqrt(error[best])),
    )


def fit_group(runs: Sequence[Run], options: FitOptions = FitOptions()) -> GroupFit:
    """Every fit for the runs of one (modality, family) group."""
    keys = {(run.modality, run.family) for run in runs}
    if len(keys) != 1:
        raise ValueError(
            f"fit_group takes the runs of one (modality, family) group, got {sorted(keys, key=str)}"
        )
    ((modality, family),) = keys
    budgets_of_runs = assign_budgets(np.array([run.flops for run in runs]), options.budget_rtol)
    keep, dropped = screen_runs(runs, budgets_of_runs, options.diverge_factor)

    budgets: list[BudgetFit] = []
    for flops in np.unique(budgets_of_runs[keep]):
        members = [run for run, ok, c in zip(runs, keep, budgets_of_runs, strict=True) if ok and c == flops]
        names = tuple(run.run for run in members)
        try:
            budgets.append(
                fit_budget(
                    float(flops),
                    names,
                    np.array([run.params for run in members]),
                    np.array([run.loss for run in members]),
                    options.max_extrapolation,
                )
            )
        except FitRejected as rejected:
            dropped.append(Dropped("budget", names, float(flops), str(rejected)))

    notes: list[str] = []
    optimal = loss_curve = None
    if len(budgets) >= 2:
        optimal = fit_optimal_scaling(
            budgets,
            n_bootstrap=options.n_bootstrap,
            rng=np.random.default_rng(options.seed),  # per group, so results do not depend on group order
            ci=options.ci,
            max_extrapolation=options.max_extrapolation,
        )
    else:
        notes.append(f"N_opt/D_opt power laws need >= 2 usable budgets, have {len(budgets)}")
    if len(budgets) >= 3:
        loss_curve = fit_loss_curve(
            np.array([budget.flops for budget in budgets]), np.array([budget.loss_opt for budget in budgets])
        )
    else:
        notes.append(f"L(C) = A C^-alpha + E needs >= 3 usable budgets, have {len(budgets)}")
    return GroupFit(modality, family, tuple(budgets), optimal, loss_curve, tuple(dropped), tuple(notes))


def fit_runs(runs: Sequence[Run], options: FitOptions = FitOptions()) -> list[GroupFit]:
    """:func:`fit_group` for each modality, and each family when the table has that column."""
    groups: dict[tuple[str, str | None], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.modality, run.family), []).append(run)
    order = sorted(groups, key=lambda key: (MODALITIES.index(key[0]), key[1] or ""))
    return [fit_group(groups[key], options) for key in order]


def _fit_parabolas(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares parabola through each row of (x, y), as (curvature, vertex x, vertex y).

    Batched so the bootstrap refits thousands of resamples at once. Rows with fewer than three
    distinct x have no unique parabola and come back as NaN.
    """
    rows = len(x)
    curvature, vertex, minimum = np.full(rows, np.nan), np.full(rows, np.nan), np.full(rows, np.nan)
    distinct = 1 + (np.diff(np.sort(x, axis=1), axis=1) > 0).sum(axis=1)
    solvable = distinct >= 3
    if not solvable.any():
        return curvature, vertex, minimum
    # Centring each row keeps the normal equations well conditioned (log10 N is around 9).
    centre = x[solvable].mean(axis=1, keepdims=True)
    u = x[solvable] - centre
    design = np.stack([u**2, u, np.ones_like(u)], axis=-1)
    gram = design.transpose(0, 2, 1) @ design
    moments = design.transpose(0, 2, 1) @ y[solvable][..., None]
    c2, c1, c0 = np.linalg.solve(gram, moments)[..., 0].T
    with np.errstate(divide="ignore", invalid="ignore"):  # c2 == 0: collinear points, rejected later
        curvature[solvable] = c2
        vertex[solvable] = centre[:, 0] - c1 / (2.0 * c2)
        minimum[solvable] = c0 - c1**2 / (4.0 * c2)
    return curvature, vertex, minimum


def _vertex_window(log10_n: np.ndarray, max_extrapolation: float) -> tuple[float, float]:
    lo, hi = float(log10_n.min()), float(log10_n.max())
    margin = max_extrapolation * (hi - lo)
    return lo - margin, hi + margin


def _bootstrap_vertices(
    budget: BudgetFit,
    n_bootstrap: int,
    rng: np.random.Generator,
    max_extrapolation: float,
    max_draws: int = 100,
) -> np.ndarray:
    """log10 N_opt of ``n_bootstrap`` resamples of one budget; NaN where none was acceptable.

    A resample that repeats sizes (fewer than three distinct) or whose parabola would be
    rejected is redrawn, i.e. the bootstrap is conditioned on a usable fit. A budget with exactly
    three points therefore always resamples to itself and adds no spread: its own uncertainty
    cannot be estimated from three points.
    """
    x, y = np.log10(budget.params), budget.loss
    lo, hi = _vertex_window(x, max_extrapolation)
    vertices = np.full(n_bootstrap, np.nan)
    pending = np.arange(n_bootstrap)
    for _ in range(max_draws):
        if not pending.size:
            break
        draw = rng.integers(0, len(x), size=(pending.size, len(x)))
        curvature, vertex, _ = _fit_parabolas(x[draw], y[draw])
        ok = (curvature > 0) & (vertex >= lo) & (vertex <= hi)
        vertices[pending[ok]] = vertex[ok]
        pending = pending[~ok]
    return vertices


def _percentile_interval(samples: Sequence[float], ci: float) -> tuple[float, float] | None:
    if not samples:
        return None
    tail = 100.0 * (1.0 - ci) / 2.0
    lo, hi = np.percentile(samples, [tail, 100.0 - tail])
    return float(lo), float(hi)
