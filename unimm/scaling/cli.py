"""``unimm isoflop plan|collect|fit``: an IsoFLOP sweep from plan to scaling laws.

- ``plan``: budgets x a model-size grid -> ``DIR/plan.json`` and launch scripts (:mod:`.plan`);
- ``collect``: held-out losses of the finished runs -> a run table CSV (:mod:`.collect`);
- ``fit``: ``DIR/fits.json`` (schema in :func:`fits_report`) and PNG figures from a run table.

:func:`register` adds the ``isoflop`` verb to the ``unimm`` console script; each sub-verb sets
``func`` (taking the parsed arguments, returning an exit status) for the caller to dispatch.
``python -m unimm.scaling.cli VERB ...`` runs the same verbs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unimm.errors import ConfigError
from unimm.scaling.fit import BudgetFit, FitOptions, GroupFit, fit_runs
from unimm.scaling.plots import plot_group
from unimm.scaling.table import RunTableError, read_runs, write_runs

if TYPE_CHECKING:
    from unimm.scaling.plan import SweepPlan

DEFAULTS = FitOptions()


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    isoflop = subparsers.add_parser("isoflop", help="IsoFLOP scaling-law analysis (paper section 7)")
    _add_verbs(isoflop.add_subparsers(dest="isoflop_verb", required=True, metavar="VERB"))
    return isoflop


def main(argv: list[str] | None = None) -> int:
    # The unimm console script owns argument handling (plan passes --section.key overrides on).
    from unimm.cli import main as unimm_main

    return unimm_main(["isoflop", *(sys.argv[1:] if argv is None else argv)])


# plan and collect build models and data (torch, torchtitan): imported when used, so that
# `unimm isoflop fit` and every other verb start without them. Options left unset on the
# command line (None) take the defaults of the dataclasses they fill (unimm.scaling.plan,
# unimm.scaling.collect), which document them.


def run_plan(args: argparse.Namespace) -> int:
    from unimm.scaling.plan import SizeRule, SlurmOptions, SweepSpec, plan_sweep, write_plan

    sizes = SizeRule(
        d_models=tuple(args.d_model),
        **_given(
            args,
            aspect="aspect",
            head_dim="head_dim",
            kv_group="kv_group",
            ffn_multiple="ffn_multiple",
            ffn_round="ffn_round",
        ),
    )
    spec = SweepSpec(
        recipe=args.recipe,
        budgets=tuple(args.budgets),
        sizes=sizes,
        mixture=None if args.mixture is None else parse_mixture(args.mixture),
        batch_rows=args.batch_rows,
        overrides=tuple(args.config_overrides),
        **_given(args, warmup_fraction="warmup_fraction", min_steps="min_steps"),
    )
    slurm = SlurmOptions(
        **_given(
            args,
            nodes="slurm_nodes",
            gpus_per_node="slurm_gpus_per_node",
            time="slurm_time",
            partition="slurm_partition",
        )
    )
    plan = plan_sweep(spec)  # ConfigError: reported by the unimm console script
    paths = write_plan(plan, args.out, nproc=args.nproc, slurm=slurm)
    print(plan_table(plan))
    print(f"wrote {', '.join(str(path) for path in paths)}")
    return 0


def plan_table(plan: SweepPlan) -> str:
    lines = [f"{plan.tokens_per_step:,} tokens per step ({plan.seq_len} positions per row)"]
    lines.append(f"{'run':<24} {'N (active)':>12} {'steps':>7} {'tokens D':>12} {'D/N':>7} {'C = 6ND':>10}")
    for run in plan.runs:
        lines.append(
            f"{run.name:<24} {run.params:>12,} {run.steps:>7} {run.tokens:>12,} "
            f"{run.tokens / run.params:>7.2f} {run.flops:>10.3g}"
        )
    for point in plan.skipped:
        lines.append(f"skipped C={point.budget:.3g} d_model={point.d_model}: {point.reason}")
    for budget in sorted(plan.spec.budgets):
        sizes = sum(run.budget == budget for run in plan.runs)
        if sizes < 3:
            lines.append(f"warning: budget C={budget:.3g} has {sizes} size(s); a parabola needs >= 3")
    return "\n".join(lines)


def parse_mixture(items: list[str]) -> dict[str, float]:
    """``["text=0.5", "image_text=0.25"]`` -> ``{"text": 0.5, "image_text": 0.25}``."""
    mixture = {}
    for item in items:
        name, _, weight = item.partition("=")
        try:
            mixture[name] = float(weight)
        except ValueError:
            raise ConfigError(f"--mixture entries are SOURCE=WEIGHT, got {item!r}") from None
    return mixture


def run_collect(args: argparse.Namespace) -> int:
    from unimm.scaling.collect import HeldOut, collect
    from unimm.scaling.plan import read_plan

    given = _given(args, seed="heldout_seed", batches="eval_batches", timesteps="timesteps", noise_seed="noise_seed")
    text, image = args.heldout_text or args.heldout_shards, args.heldout_image or args.heldout_shards
    heldout = HeldOut(**given, text=text or "", image=image or "")
    plan = read_plan(args.plan)
    results = collect(plan, args.plan.parent, heldout)
    csv_path = args.csv or args.plan.parent / "runs.csv"
    write_runs(csv_path, [row for result in results for row in result.rows()])
    bad = [result for result in results if result.status != "ok"]
    print(f"{len(results) - len(bad)} of {len(results)} runs evaluated; wrote {csv_path}")
    for result in bad:
        print(f"  not usable: {result.run.name} ({result.status}: {result.note})")
    return 0 if len(bad) < len(results) else 1


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
    _add_plan(verbs)
    _add_collect(verbs)
    _add_fit(verbs)


def _given(args: argparse.Namespace, **fields: str) -> dict[str, Any]:
    """``{field: args.<option>}`` for the options given on the command line."""
    given = {name: getattr(args, option) for name, option in fields.items()}
    return {name: value for name, value in given.items() if value is not None}


def _add_plan(verbs: argparse._SubParsersAction) -> None:
    plan = verbs.add_parser(
        "plan",
        help="plan an IsoFLOP sweep: budgets x model sizes -> plan.json and launch scripts",
        description="Every budget C x every size trains D = C / (6 N) tokens (N active parameters). "
        "Further --section.key VALUE options are given to every run.",
    )
    plan.add_argument("--recipe", required=True, help="a resizable recipe (debug_sweep, dense_sweep)")
    plan.add_argument("--budgets", type=float, nargs="+", required=True, help="compute budgets C in FLOPs")
    plan.add_argument("--d-model", type=int, nargs="+", required=True, help="model widths of the size grid")
    plan.add_argument("--aspect", type=int, help="d_model / n_layers")
    plan.add_argument("--head-dim", type=int, help="width of an attention head")
    plan.add_argument("--kv-group", type=int, help="query heads per KV head")
    plan.add_argument("--ffn-multiple", type=float, help="FFN width / d_model")
    plan.add_argument("--ffn-round", type=int, help="FFN width rounded up to a multiple of this")
    plan.add_argument("--mixture", nargs="+", metavar="SOURCE=WEIGHT", help="source weights (default: the recipe's)")
    plan.add_argument("--batch-rows", type=int, help="global batch in rows (default: the recipe's)")
    plan.add_argument("--warmup-fraction", type=float, help="warmup steps / run steps")
    plan.add_argument("--min-steps", type=int, help="leave out points with fewer steps")
    plan.add_argument("--out", type=Path, required=True, help="sweep folder: plan, launch scripts, run folders")
    plan.add_argument("--nproc", type=int, default=1, help="processes per run in launch_local.sh")
    plan.add_argument("--slurm-nodes", type=int, help="nodes per run")
    plan.add_argument("--slurm-gpus-per-node", type=int, help="GPUs per node")
    plan.add_argument("--slurm-time", help="time limit per run")
    plan.add_argument("--slurm-partition")
    plan.set_defaults(func=run_plan, takes_overrides=True)


def _add_collect(verbs: argparse._SubParsersAction) -> None:
    collect_ = verbs.add_parser(
        "collect",
        help="held-out losses of a planned sweep's runs -> run table CSV",
        description="Runs are looked up next to the plan file; missing, diverged and unfinished "
        "runs are reported and written with a status, which the fit drops.",
    )
    collect_.add_argument("--plan", type=Path, required=True, help="plan.json written by isoflop plan")
    collect_.add_argument("--csv", type=Path, help="output run table (default: runs.csv beside the plan)")
    collect_.add_argument("--heldout-seed", type=int, help="procedural_seed of the held-out split")
    collect_.add_argument("--heldout-text", metavar="DIR", help="held-out text shards instead of a procedural split")
    collect_.add_argument("--heldout-image", metavar="DIR", help="held-out image-text shards instead of a procedural split")
    collect_.add_argument("--heldout-shards", metavar="DIR", help="one held-out shard folder holding both sets")
    collect_.add_argument("--eval-batches", type=int, help="batches per held-out set")
    collect_.add_argument("--timesteps", type=int, help="fixed flow times of the vision loss")
    collect_.add_argument("--noise-seed", type=int, help="seed of the fixed flow noise")
    collect_.set_defaults(func=run_collect)


def _add_fit(verbs: argparse._SubParsersAction) -> None:
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
