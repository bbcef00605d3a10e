"""PNG figures of the IsoFLOP fits, one file per group and kind.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas directly rather than
through pyplot, so plotting never touches global backend state or needs a display.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from unimm.scaling.fit import GroupFit


def plot_group(group: GroupFit, out_dir: str | Path) -> list[Path]:
    """Every figure the group's fits allow; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", group.name.replace("/", "_"))
    written = []
    if group.budgets:
        written.append(plot_isoflop(group, out_dir / f"isoflop_{slug}.png"))
    if group.optimal is not None:
        written.append(plot_optimal(group, out_dir / f"optimal_{slug}.png"))
    if group.loss_curve is not None:
        written.append(plot_loss_curve(group, out_dir / f"loss_vs_compute_{slug}.png"))
    return written


def plot_isoflop(group: GroupFit, path: Path) -> Path:
    """Loss against N for each budget, its fitted parabola, and the minimum (star)."""
    figure, axes = _figure(ncols=1)
    colours = _budget_colours(len(group.budgets))
    for budget, colour in zip(group.budgets, colours, strict=True):
        log10_n = np.log10(budget.params)
        lo = min(log10_n.min(), budget.parabola.log10_n_opt) - 0.1
        hi = max(log10_n.max(), budget.parabola.log10_n_opt) + 0.1
        grid = np.linspace(lo, hi, 200)
        axes[0].scatter(budget.params, budget.loss, color=colour, s=18, label=f"C = {budget.flops:.2g}")
        axes[0].plot(10.0**grid, budget.parabola(grid), color=colour, lw=1)
        axes[0].scatter([budget.n_opt], [budget.loss_opt], color=colour, marker="*", s=140, edgecolor="black")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("parameters N (active)")
    axes[0].set_ylabel(f"{group.modality} loss")
    axes[0].set_title(f"IsoFLOP curves: {group.name}")
    axes[0].legend(fontsize="small")
    return _save(figure, path)


def plot_optimal(group: GroupFit, path: Path) -> Path:
    """N_opt(C) and D_opt(C) with their power laws and bootstrap intervals."""
    if group.optimal is None:
        raise ValueError(f"{group.name}: no N_opt/D_opt fit to plot")
    figure, axes = _figure(ncols=2)
    flops = np.array([budget.flops for budget in group.budgets])
    grid = np.geomspace(flops.min() / 2, flops.max() * 2, 100)
    series = (
        ("N_opt", "a", [b.n_opt for b in group.budgets], group.optimal.n_opt, group.optimal.a_ci),
        ("D_opt", "b", [b.d_opt for b in group.budgets], group.optimal.d_opt, group.optimal.b_ci),
    )
    for ax, (label, symbol, values, law, interval) in zip(axes, series, strict=True):
        ci = "" if interval is None else f" [{interval[0]:.3f}, {interval[1]:.3f}]"
        ax.scatter(flops, values, color="black", zorder=3)
        ax.plot(
            grid,
            law(grid),
            color="tab:blue",
            label=f"{label} ∝ C^{symbol}, {symbol} = {law.exponent:.3f}{ci}",
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        _major_labels_only(ax)
        ax.set_xlabel("compute C (FLOPs)")
        ax.set_ylabel(label)
        ax.legend(fontsize="small")
    figure.suptitle(f"compute-optimal allocation: {group.name}")
    return _save(figure, path)


def plot_loss_curve(group: GroupFit, path: Path) -> Path:
    """Per-budget minimum loss against C, the fitted A C^-alpha + E and its floor E."""
    curve = group.loss_curve
    if curve is None:
        raise ValueError(f"{group.name}: no L(C) fit to plot")
    figure, axes = _figure(ncols=1)
    flops = np.array([budget.flops for budget in group.budgets])
    grid = np.geomspace(flops.min() / 2, flops.max() * 2, 100)
    axes[0].scatter(flops, [budget.loss_opt for budget in group.budgets], color="black", zorder=3)
    axes[0].plot(grid, curve(grid), label=f"{curve.A:.3g} C^-{curve.alpha:.3f} + {curve.E:.3f}")
    axes[0].axhline(curve.E, color="gray", ls="--", lw=1, label="E (irreducible)")
    axes[0].set_xscale("log")
    _major_labels_only(axes[0])
    axes[0].set_xlabel("compute C (FLOPs)")
    axes[0].set_ylabel(f"IsoFLOP minimum {group.modality} loss")
    axes[0].set_title(f"L(C): {group.name}")
    axes[0].legend(fontsize="small")
    return _save(figure, path)


def _figure(ncols: int) -> tuple[Figure, list]:
    figure = Figure(figsize=(6 * ncols, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, list(np.atleast_1d(figure.subplots(1, ncols)))


def _major_labels_only(ax) -> None:
    # Over less than a decade matplotlib labels the minor log ticks too, and they overlap.
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def _budget_colours(count: int) -> list:
    return list(colormaps["viridis"](np.linspace(0.0, 0.9, max(count, 1))))


def _save(figure: Figure, path: Path) -> Path:
    figure.savefig(path, dpi=120)
    return path
