"""IsoFLOP fitting: recovery of known laws, screening of bad runs, CSV errors and the CLI."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

from unimm.scaling import (
    FitOptions,
    FitRejected,
    Run,
    RunTableError,
    assign_budgets,
    cli,
    fit_budget,
    fit_group,
    fit_loss_curve,
    fit_runs,
    read_runs,
    write_runs,
)

HEADER = "run,modality,flops,params,tokens,loss"


def chinchilla_runs(
    alpha: float,
    beta: float,
    *,
    modality: str = "language",
    family: str | None = None,
    noise: float = 0.005,
    seed: int = 0,
) -> tuple[list[Run], float]:
    """An IsoFLOP grid under L(N, D) = E + A/N^alpha + B/D^beta with D = C / (6N).

    Seven sizes per budget over +-0.9 decades, centred 0.15 decades off the true optimum so the
    fitter cannot profit from a symmetric sweep. Returns the runs and the true a.
    """
    E, A, B = 1.69, 406.4, 410.7
    a_true = beta / (alpha + beta)
    # Minimising A/N^alpha + B/(C/6N)^beta at fixed C gives N_opt = G (C/6)^a.
    G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    rng = np.random.default_rng(seed)
    extra = {} if family is None else {"family": family}
    runs = []
    for flops in np.logspace(18, 21, 7):
        for offset in np.linspace(-0.9, 0.9, 7) + 0.15:
            n = G * (flops / 6.0) ** a_true * 10.0**offset
            d = flops / (6.0 * n)
            loss = E + A / n**alpha + B / d**beta + rng.normal(0.0, noise)
            runs.append(Run(f"{family or 'm'}-{flops:.0e}-{offset:+.2f}", modality, flops, n, d, loss, extra))
    return runs, a_true


@pytest.mark.parametrize(("alpha", "beta"), [(0.34, 0.28), (0.40, 0.235)])
def test_recovers_chinchilla_exponents(alpha: float, beta: float) -> None:
    runs, a_true = chinchilla_runs(alpha, beta)
    group = fit_group(runs, FitOptions(n_bootstrap=500))
    optimal = group.optimal
    assert optimal is not None and optimal.a_ci is not None and optimal.b_ci is not None
    b_true = alpha / (alpha + beta)
    assert optimal.a == pytest.approx(a_true, abs=0.01)
    assert optimal.b == pytest.approx(b_true, abs=0.01)
    assert optimal.a_ci[0] <= a_true <= optimal.a_ci[1]
    assert optimal.b_ci[0] <= b_true <= optimal.b_ci[1]
    assert optimal.a + optimal.b == pytest.approx(1.0)
    assert optimal.n_bootstrap == 500
    assert group.dropped == () and group.notes == ()


def test_bootstrap_is_seeded() -> None:
    runs, _ = chinchilla_runs(0.34, 0.28, noise=0.01)
    first = fit_group(runs, FitOptions(n_bootstrap=200, seed=3)).optimal
    again = fit_group(runs, FitOptions(n_bootstrap=200, seed=3)).optimal
    other = fit_group(runs, FitOptions(n_bootstrap=200, seed=4)).optimal
    assert first is not None and again is not None and other is not None
    assert first.a_ci == again.a_ci
    assert first.a_ci != other.a_ci


def test_isoflop_minimum_of_exact_parabola() -> None:
    log10_n = np.linspace(8.4, 10.0, 6)
    loss = 2.1 + 0.3 * (log10_n - 9.2) ** 2
    budget = fit_budget(1e20, [f"r{i}" for i in range(6)], 10.0**log10_n, loss, max_extrapolation=0.25)
    assert budget.parabola.log10_n_opt == pytest.approx(9.2, abs=1e-9)
    assert budget.n_opt == pytest.approx(10.0**9.2, rel=1e-8)
    assert budget.d_opt == pytest.approx(1e20 / (6 * 10.0**9.2), rel=1e-8)
    assert budget.loss_opt == pytest.approx(2.1, abs=1e-12)
    assert budget.parabola.curvature == pytest.approx(0.3, abs=1e-9)
    assert not budget.extrapolated


def test_vertex_just_outside_the_sweep_is_flagged() -> None:
    log10_n = np.array([8.0, 8.5, 9.0])
    budget = fit_budget(
        1e20, ["a", "b", "c"], 10.0**log10_n, 2.0 + (log10_n - 9.2) ** 2, max_extrapolation=0.25
    )
    assert budget.extrapolated
    assert budget.parabola.log10_n_opt == pytest.approx(9.2)


@pytest.mark.parametrize(
    ("log10_n", "loss", "reason"),
    [
        ([8.0, 8.5, 9.0], [2.0, 2.5, 2.0], "opens downward"),
        ([8.0, 8.5, 9.0], [3.0, 2.5, 2.100001], "outside the sampled sizes"),
        ([8.0, 8.0, 9.0], [3.0, 2.9, 2.5], "needs >= 3 sizes"),
    ],
)
def test_unusable_budgets_are_rejected(log10_n: list[float], loss: list[float], reason: str) -> None:
    with pytest.raises(FitRejected, match=reason):
        fit_budget(1e20, ["a", "b", "c"], 10.0 ** np.array(log10_n), np.array(loss), max_extrapolation=0.25)


def test_loss_curve_recovery() -> None:
    flops = np.logspace(18, 22, 9)
    loss = 50.0 * flops**-0.1 + 1.8
    exact = fit_loss_curve(flops, loss)
    assert exact.E == pytest.approx(1.8, abs=2e-3)
    assert exact.alpha == pytest.approx(0.1, abs=1e-3)
    assert exact.A == pytest.approx(50.0, rel=0.01)
    noisy = fit_loss_curve(flops, loss * np.exp(np.random.default_rng(0).normal(0.0, 5e-4, flops.size)))
    assert noisy.E == pytest.approx(1.8, abs=0.03)
    assert noisy.alpha == pytest.approx(0.1, abs=0.005)
    assert noisy.A == pytest.approx(50.0, rel=0.1)


def test_budgets_group_within_tolerance() -> None:
    budgets = assign_budgets(np.array([1e18, 1.0000001e18, 3e18, 1e19, 1.02e19]), rtol=0.05)
    assert budgets[0] == budgets[1] == pytest.approx(1e18)
    assert len(np.unique(budgets)) == 3
    assert budgets[3] == budgets[4] == pytest.approx(math.sqrt(1e19 * 1.02e19))


def test_missing_and_diverged_runs_are_dropped_with_reasons(tmp_path: Path) -> None:
    runs, a_true = chinchilla_runs(0.34, 0.28)
    # One run that never reported a loss, one that blew up, one marked by hand.
    broken = {runs[3].run: math.nan, runs[10].run: 10.4}
    runs = [
        Run(r.run, r.modality, r.flops, r.params, r.tokens, broken.get(r.run, r.loss), {"status": "ok"})
        for r in runs
    ]
    runs[20] = Run(
        runs[20].run,
        "language",
        runs[20].flops,
        runs[20].params,
        runs[20].tokens,
        2.5,
        {"status": "diverged"},
    )
    path = tmp_path / "runs.csv"
    write_runs(path, runs)
    (group,) = fit_runs(read_runs(path), FitOptions(n_bootstrap=200))
    reasons = {item.runs: item.reason for item in group.dropped}
    assert set(reasons) == {(runs[3].run,), (runs[10].run,), (runs[20].run,)}
    assert "no usable loss" in reasons[(runs[3].run,)]
    assert "diverged" in reasons[(runs[10].run,)] and "median" in reasons[(runs[10].run,)]
    assert "status=diverged" in reasons[(runs[20].run,)]
    assert all(item.scope == "run" for item in group.dropped)
    assert group.optimal is not None and group.optimal.a == pytest.approx(a_true, abs=0.015)
    assert len(group.budgets) == 7


def test_budget_with_too_few_points_is_dropped() -> None:
    runs, _ = chinchilla_runs(0.34, 0.28)
    lowest = [run for run in runs if run.flops == runs[0].flops]
    runs = [run for run in runs if run not in lowest[2:]]
    group = fit_group(runs, FitOptions(n_bootstrap=50))
    (dropped,) = group.dropped
    assert dropped.scope == "budget" and dropped.runs == tuple(run.run for run in lowest[:2])
    assert dropped.flops == pytest.approx(1e18)
    assert "needs >= 3 sizes" in dropped.reason
    assert len(group.budgets) == 6


def test_too_few_budgets_leaves_notes_instead_of_laws() -> None:
    runs, _ = chinchilla_runs(0.34, 0.28)
    group = fit_group([run for run in runs if run.flops < 2e18], FitOptions(n_bootstrap=50))
    assert group.optimal is None and group.loss_curve is None
    assert len(group.notes) == 2


def test_csv_round_trip_keeps_extra_columns(tmp_path: Path) -> None:
    runs, _ = chinchilla_runs(0.34, 0.28, family="moe")
    path = tmp_path / "runs.csv"
    write_runs(path, runs)
    assert read_runs(path) == runs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "run,modality,flops,params,tokens\nr1,language,1e18,1e8,1.6e9\n",
            r"missing required column\(s\) 'loss'",
        ),
        (
            f"{HEADER}\nr1,language,1e18,1e8,1.6e9,3.1\nr2,language,lots,1e8,1.6e9,3.0\n",
            r"line 3, column 'flops'.*'lots'",
        ),
        (f"{HEADER}\nr1,language,1e18,0,1.6e9,3.1\n", r"line 2, column 'params'.*positive"),
        (f"{HEADER}\nr1,audio,1e18,1e8,1.6e9,3.1\n", r"line 2, column 'modality'.*'audio'"),
        (
            f"{HEADER}\nr1,language,1e18,1e8,1.6e9,3.1\nr1,language,1e18,2e8,8e8,3.0\n",
            r"line 3, column 'run'.*line 2",
        ),
        (f"{HEADER},family\nr1,vision,1e18,1e8,1.6e9,3.1,\n", r"line 2, column 'family'"),
    ],
)
def test_bad_csv_errors_name_file_line_and_column(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(RunTableError, match=expected) as error:
        read_runs(path)
    assert str(path) in str(error.value)


def test_cli_writes_fits_and_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dense, _ = chinchilla_runs(0.34, 0.28, family="dense")
    vision, _ = chinchilla_runs(0.40, 0.235, modality="vision", family="dense", seed=1)
    vision[0] = Run(
        vision[0].run,
        "vision",
        vision[0].flops,
        vision[0].params,
        vision[0].tokens,
        math.nan,
        vision[0].extra,
    )
    csv_path, out = tmp_path / "runs.csv", tmp_path / "fits"
    write_runs(csv_path, dense + vision)

    # Dispatch as the unimm console script will: register() on an outer parser, then func(args).
    parser = argparse.ArgumentParser(prog="unimm")
    cli.register(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(
        ["isoflop", "fit", "--csv", str(csv_path), "--out", str(out), "--bootstrap", "200"]
    )
    assert args.func(args) == 0

    report = json.loads((out / "fits.json").read_text())
    assert set(report["groups"]) == {"language/dense", "vision/dense"}
    language, vision_fit = report["groups"]["language/dense"], report["groups"]["vision/dense"]
    for group in (language, vision_fit):
        for key in ("a", "b", "A", "alpha", "E"):
            assert isinstance(group[key], float)
        assert len(group["a_ci"]) == 2 and len(group["b_ci"]) == 2
        assert len(group["budgets"]) == 7
        for name in group["plots"]:
            assert (out / name).stat().st_size > 0
        assert len(group["plots"]) == 3
    assert language["a"] > vision_fit["a"]
    assert vision_fit["dropped"] == [
        {
            "scope": "run",
            "runs": [vision[0].run],
            "flops": pytest.approx(1e18),
            "reason": "no usable loss (nan)",
        }
    ]
    assert "language/dense" in capsys.readouterr().out


def test_module_entry_point_reports_bad_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("run,modality,flops,params,tokens\n")
    assert cli.main(["fit", "--csv", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "'loss'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
