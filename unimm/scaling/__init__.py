"""IsoFLOP scaling laws (paper section 7): run table -> per-budget minima -> power laws -> figures.

``table`` reads and screens the CSV of runs, ``fit`` does the numerics, ``plots`` draws them and
``cli`` is the ``unimm isoflop`` verb. The plotting and CLI modules are not imported here so that
using the fitter does not pull in matplotlib.
"""

from unimm.scaling.fit import (
    BudgetFit,
    FitOptions,
    FitRejected,
    GroupFit,
    LossCurve,
    OptimalScaling,
    Parabola,
    PowerLaw,
    fit_budget,
    fit_group,
    fit_loss_curve,
    fit_optimal_scaling,
    fit_parabola,
    fit_power_law,
    fit_runs,
)
from unimm.scaling.table import (
    Dropped,
    Run,
    RunTableError,
    assign_budgets,
    read_runs,
    screen_runs,
    write_runs,
)

__all__ = [
    "BudgetFit",
    "Dropped",
    "FitOptions",
    "FitRejected",
    "GroupFit",
    "LossCurve",
    "OptimalScaling",
    "Parabola",
    "PowerLaw",
    "Run",
    "RunTableError",
    "assign_budgets",
    "fit_budget",
    "fit_group",
    "fit_loss_curve",
    "fit_optimal_scaling",
    "fit_parabola",
    "fit_power_law",
    "fit_runs",
    "read_runs",
    "screen_runs",
    "write_runs",
]
