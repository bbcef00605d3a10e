"""``unimm isoflop fit --csv FILE --out DIR``: fit the scaling laws of a run table.

Writes ``DIR/fits.json`` (schema in :func:`fits_report`) and PNG figures, and prints a summary.
:func:`register` adds the ``isoflop`` verb to the ``unimm`` console script; each sub-verb sets
``func`` (taking the parsed arguments, returning an exit status) for the caller to dispatch.
Before that wiring exists the same sub-verbs run as ``python -m unimm.scaling.cli fit ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from unimm.scaling.fit import BudgetFit, FitOptions, GroupFit, fit_runs
from unimm.scaling.plots import plot_group
from unimm.scaling.table import RunTableError, read_runs

DEFAULTS = FitOptions()


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    isoflop = subparsers.add_parser("isoflop", help="IsoFLOP scaling-law analysis (paper section 7)")
    _add_verbs(isoflop.add_subparsers(dest="isoflop_verb", required=True, metavar="VERB"))
    return isoflop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m unimm.scaling.cli", description="IsoFLOP scaling-law analysis"
    )
    _add_verbs(parser.add_subparsers(dest="isoflop_verb", required=True, metavar="VERB"))
    args = parser.parse_args(argv)
    return args.func(args)


def run_fit(args: argparse.Namespace) -> int:
    options = FitOptions(
        budget_rtol=args.budget_rtol,
        diverge_factor=args.diverge_factor,
        max_extrapolation=args.max_extrapolation,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
    )
    try:
        runs = read_runs(args.csv)
    except (OSError, RunTableError) as error:
        print(f"isoflop fit: error: {error}", file=sys.stderr)
        return 2
    groups = fit_runs(runs, options)
    args.out.mkdir(parents=True, exist_ok=True)
    plots = {group.name: [path.name for path in plot_group(group, args.out)] for group in groups}
    report = fits_report(groups, source=args.csv, options=options, plots=plots)
    (args.out / "fits.json").write_text(json.dumps(report, indent=2) + "\n")
    print(summary_table(groups))
    print(f"wrote {args.out / 'fits.json'} and {sum(map(len, plots.values()))} figure(s) to {args.out}")
    return 0


def fits_report(
    groups: list[GroupFit], *, source: str | Path, options: FitOptions, plots: dict[str, list[str]]
) -> dict[str, Any]:
    """The fits.json document.

    ``{"source", "settings", "groups": {name: group}}`` where ``name`` is the modality, or
    ``modality/family`` when the table has a family column, and each group holds
    ``modality, family``; the exponents ``a, a_ci, b, b_ci, a_plus_b, n_opt_coef, d_opt_coef,
    n_bootstrap`` (N_opt = n_opt_coef * C^a, D_opt = d_opt_coef * C^b); the loss curve
    ``A, alpha, E, loss_rmse_log`` (L = A C^-alpha + E); ``budgets`` (one entry per usable budget:
    ``flops, n_opt, d_opt, loss_opt, curvature, extrapolated, points``); ``dropped`` (``scope,
    runs, flops, reason`` for every run or budget left out); ``notes`` (laws not fitted, and
    why) and ``plots`` (file names in the output folder). A law that could not be fitted has null
    values; intervals are ``[low, high]`` at ``settings.ci``.
    """
    return {
        "source": str(source),
        "settings": asdict(options),
        "groups": {group.name: _group_report(group, plots.get(group.name, [])) for group in groups},
    }


def summary_table(groups: list[GroupFit]) -> str:
    header = ["group", "budgets", "dropped", "a [95% CI]", "b [95% CI]", "A", "alpha", "E"]
    widths = [20, 7, 7, 22, 22, 9, 6, 6]
    rows = [header]
    for group in groups:
        optimal, curve = group.optimal, group.loss_curve
        a = "-" if optimal is None else _with_interval(optimal.a, optimal.a_ci)
        b = "-" if optimal is None else _with_interval(optimal.b, optimal.b_ci)
        loss = ["-"] * 3 if curve is None else [f"{curve.A:.3g}", f"{curve.alpha:.3f}", f"{curve.E:.3f}"]
        dropped = sum(len(item.runs) for item in group.dropped)
        rows.append([group.name, str(len(group.budgets)), str(dropped), a, b, *loss])
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(line.rstrip() for line in lines)


def _add_verbs(verbs: argparse._SubParsersAction) -> None:
    fit = verbs.add_parser(
        "fit",
        help="fit N_opt ~ C^a, D_opt ~ C^b and L(C) = A C^-alpha + E from a run table",
        description="Columns: run, modality (language|vision), flops, params, tokens, loss; "
        "optional family (fitted separately) and status (diverged|failed drops the run).",
    )
    fit.add_argument("--csv", type=Path, required=True, help="run table")
    fit.add_argument("--out", type=Path, required=True, help="folder for fits.json and the figures")
    fit.add_argument("--bootstrap", type=int, default=DEFAULTS.n_bootstrap, help="bootstrap replicates")
    fit.add_argument("--seed", type=int, default=DEFAULTS.seed, help="bootstrap RNG seed")
    fit.add_argument(
        "--budget-rtol",
        type=float,
        default=DEFAULTS.budget_rtol,
        help="relative FLOP tolerance within a budget",
    )
    fit.add_argument(
        "--diverge-factor",
        type=float,
        default=DEFAULTS.diverge_factor,
        help="drop a run whose loss exceeds this multiple of its budget's median",
    )
    fit.add_argument(
        "--max-extrapolation",
        type=float,
        default=DEFAULTS.max_extrapolation,
        help="drop a budget whose minimum lies outside its sampled log10 N range by more than this "
        "fraction of that range",
    )
    fit.set_defaults(func=run_fit)


def _group_report(group: GroupFit, plots: list[str]) -> dict[str, Any]:
    optimal, curve = group.optimal, group.loss_curve
    return {
        "modality": group.modality,
        "family": group.family,
        "a": None if optimal is None else optimal.a,
        "a_ci": None if optimal is None or optimal.a_ci is None else list(optimal.a_ci),
        "b": None if optimal is None else optimal.b,
        "b_ci": None if optimal is None or optimal.b_ci is None else list(optimal.b_ci),
        "a_plus_b": None if optimal is None else optimal.a + optimal.b,
        "n_opt_coef": None if optimal is None else optimal.n_opt.coef,
        "d_opt_coef": None if optimal is None else optimal.d_opt.coef,
        "n_bootstrap": None if optimal is None else optimal.n_bootstrap,
        "A": None if curve is None else curve.A,
        "alpha": None if curve is None else curve.alpha,
        "E": None if curve is None else curve.E,
        "loss_rmse_log": None if curve is None else curve.rmse_log,
        "budgets": [_budget_report(budget) for budget in group.budgets],
        "dropped": [asdict(item) for item in group.dropped],
        "notes": list(group.notes),
        "plots": plots,
    }


def _budget_report(budget: BudgetFit) -> dict[str, Any]:
    return {
        "flops": budget.flops,
        "n_opt": budget.n_opt,
        "d_opt": budget.d_opt,
        "loss_opt": budget.loss_opt,
        "curvature": budget.parabola.curvature,
        "extrapolated": budget.extrapolated,
        "points": [
            {"run": run, "params": float(params), "loss": float(loss)}
            for run, params, loss in zip(budget.runs, budget.params, budget.loss, strict=True)
        ],
    }


def _with_interval(value: float, interval: tuple[float, float] | None) -> str:
    return f"{value:.3f}" if interval is None else f"{value:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]"


if __name__ == "__main__":
    sys.exit(main())
