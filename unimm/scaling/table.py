"""The run table behind an IsoFLOP analysis: one CSV row per (run, modality) with its final loss.

Required columns: ``run, modality, flops, params, tokens, loss``. ``modality`` is ``language`` or
``vision`` (one training run usually gives one row of each, so ``run`` is unique per modality).
``params`` is the parameter count that enters C = 6 N D: active parameters for MoE. Any other
column is kept and written back; two have a meaning here:

- ``family``  (e.g. ``dense`` / ``moe``): scaling laws are fitted separately per family.
- ``status``  ``diverged``, ``failed`` or ``missing`` marks a run as unusable (by hand, or by
  ``unimm isoflop collect``); ``note`` says why, and the fit repeats it when it drops the run.

Malformed input is an error naming the file, the line and the column. A run that merely did not
produce a usable loss (empty, NaN or inf loss, marked by ``status``, or diverged far above the
other runs of its budget) is not an error: :func:`screen_runs` drops it and records why.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

MODALITIES = ("language", "vision")
REQUIRED_COLUMNS = ("run", "modality", "flops", "params", "tokens", "loss")
FAILED_STATUSES = frozenset({"diverged", "failed", "missing"})


class RunTableError(ValueError):
    """A CSV that cannot be read as a run table; the message names file, line and column."""


@dataclass(frozen=True)
class Run:
    run: str
    modality: str
    flops: float
    params: float
    tokens: float
    loss: float  # NaN or inf for a run without a usable loss; screened, not rejected, on read
    extra: Mapping[str, str] = field(default_factory=dict)  # every other column, as text

    @property
    def family(self) -> str | None:
        return self.extra.get("family")

    @property
    def status(self) -> str:
        return self.extra.get("status", "").strip().lower()


@dataclass(frozen=True)
class Dropped:
    """Runs left out of a fit, and why. ``scope`` says whether one run or a whole budget went."""

    scope: Literal["run", "budget"]
    runs: tuple[str, ...]
    flops: float  # the compute budget the runs belong to
    reason: str


def read_runs(path: str | Path) -> list[Run]:
    path = Path(path)
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle, skipinitialspace=True)
        if reader.fieldnames is None:
            raise RunTableError(f"{path}: empty file, expected a header with {', '.join(REQUIRED_COLUMNS)}")
        header = [name.strip() for name in reader.fieldnames]
        missing = [name for name in REQUIRED_COLUMNS if name not in header]
        if missing:
            raise RunTableError(
                f"{path}: missing required column(s) {', '.join(map(repr, missing))} "
                f"(header has: {', '.join(header)})"
            )
        reader.fieldnames = header
        runs: list[Run] = []
        line_of: dict[tuple[str, str], int] = {}
        for row in reader:
            run = _parse_row(path, reader.line_num, row)
            first = line_of.setdefault((run.run, run.modality), reader.line_num)
            if first != reader.line_num:
                raise RunTableError(
                    f"{path}, line {reader.line_num}, column 'run': run {run.run!r} already has a "
                    f"{run.modality} row on line {first}"
                )
            runs.append(run)
    if not runs:
        raise RunTableError(f"{path}: no runs below the header")
    return runs


def write_runs(path: str | Path, runs: Iterable[Run]) -> None:
    runs = list(runs)
    extra_columns = list(dict.fromkeys(key for run in runs for key in run.extra))
    with Path(path).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*REQUIRED_COLUMNS, *extra_columns])
        for run in runs:
            numbers = (run.flops, run.params, run.tokens, run.loss)
            writer.writerow(
                [
                    run.run,
                    run.modality,
                    *(repr(float(x)) for x in numbers),
                    *(run.extra.get(k, "") for k in extra_columns),
                ]
            )


def assign_budgets(flops: np.ndarray, rtol: float) -> np.ndarray:
    """The compute budget each run belongs to, as one value shared by the runs of that budget.

    Logged FLOPs of runs planned for the same budget differ slightly (rounded step counts,
    measured rather than planned FLOPs), so sorted values closer than ``rtol`` (relative) chain
    into one budget, whose value is the geometric mean of its members.
    """
    log_flops = np.log(np.asarray(flops, dtype=float))
    order = np.argsort(log_flops)
    starts_new = np.diff(log_flops[order]) > math.log1p(rtol)
    labels = np.empty(len(order), dtype=int)
    labels[order] = np.concatenate([[0], np.cumsum(starts_new)])
    means = np.bincount(labels, weights=log_flops) / np.bincount(labels)
    return np.exp(means[labels])


def screen_runs(
    runs: Sequence[Run], budgets: np.ndarray, diverge_factor: float
) -> tuple[np.ndarray, list[Dropped]]:
    """Which runs of one (modality, family) group are usable, and a record for each that is not.

    ``budgets`` comes from :func:`assign_budgets`. A loss above ``diverge_factor`` times the
    median usable loss of its budget is treated as diverged: IsoFLOP curves span a few tens of
    percent around their minimum, while a blown-up run sits near the loss of a uniform guess.
    """
    keep = np.ones(len(runs), dtype=bool)
    dropped: list[Dropped] = []

    def drop(i: int, reason: str) -> None:
        keep[i] = False
        dropped.append(Dropped("run", (runs[i].run,), float(budgets[i]), reason))

    for i, run in enumerate(runs):
        if run.status in FAILED_STATUSES:
            note = run.extra.get("note", "").strip()
            drop(i, f"marked status={run.status}" + (f": {note}" if note else ""))
        elif not math.isfinite(run.loss):
            drop(i, f"no usable loss ({run.loss})")
    losses = np.array([run.loss for run in runs], dtype=float)
    for budget in np.unique(budgets[keep]):
        members = np.flatnonzero(keep & (budgets == budget))
        median = float(np.median(losses[members]))
        for i in members:
            if losses[i] > diverge_factor * median:
                drop(i, f"diverged: loss {losses[i]:.4g} > {diverge_factor:g} x budget median {median:.4g}")
    return keep, dropped


def _parse_row(path: Path, line: int, row: Mapping[str, str | None]) -> Run:
    def text(column: str) -> str:
        return (row.get(column) or "").strip()

    def where(column: str) -> str:
        return f"{path}, line {line}, column {column!r}"

    def positive(column: str) -> float:
        value = _number(text(column), where(column))
        if not (math.isfinite(value) and value > 0):
            raise RunTableError(f"{where(column)}: must be a positive finite number, got {text(column)!r}")
        return value

    if None in row:  # DictReader files surplus fields under the key None
        raise RunTableError(f"{path}, line {line}: more fields than the header has columns")
    name = text("run")
    if not name:
        raise RunTableError(f"{where('run')}: empty run name")
    modality = text("modality").lower()
    if modality not in MODALITIES:
        raise RunTableError(
            f"{where('modality')}: expected one of {', '.join(MODALITIES)}, got {text('modality')!r}"
        )
    # An empty loss is a run that never reported one: NaN, dropped later with a reason.
    loss = _number(text("loss"), where("loss")) if text("loss") else math.nan
    if math.isfinite(loss) and loss <= 0:
        raise RunTableError(
            f"{where('loss')}: losses must be positive for log-space fits, got {text('loss')!r}"
        )
    extra = {key: text(key) for key in row if key not in REQUIRED_COLUMNS}
    if "family" in extra and not extra["family"]:
        raise RunTableError(
            f"{where('family')}: empty family (the column is present, so every row needs one)"
        )
    return Run(name, modality, positive("flops"), positive("params"), positive("tokens"), loss, extra)


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise RunTableError(f"{where}: expected a number, got {text!r}") from None
