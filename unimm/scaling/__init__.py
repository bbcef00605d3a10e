"""IsoFLOP scaling laws (paper section 7): sweep plan -> runs -> run table -> fits -> figures.

``plan`` turns budgets and a size grid into runs and launch scripts, ``collect`` measures the
finished runs' held-out losses into a run table, ``table`` reads and screens that CSV, ``fit``
does the numerics, ``plots`` draws them and ``cli`` is the ``unimm isoflop`` verb. Only the
table and fit modules are imported here, so that using the fitter pulls in neither torch nor
matplotlib.
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
