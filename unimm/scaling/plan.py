"""IsoFLOP sweep planning: compute budgets x model sizes -> named runs, a plan file, launch scripts.

For every budget C and every size of the grid, a run of the resizable recipe trains
D = C / (6 N) tokens (N: active parameters, paper Table 5 convention), rounded to whole steps
of the recipe's tokens per step; the run's FLOPs are then 6 N D with the rounded D. Sizes come
from a width/depth rule (:class:`SizeRule`); each run is the recipe name plus command-line
overrides (steps, warmup, global batch, ``--model_size.*``, the data mixture). The plan is
written as ``plan.json`` (read back by ``unimm isoflop collect``), ``launch_local.sh`` (``unimm
train`` lines) and ``launch_slurm.sbatch`` (one array task per run, torchrun under srun).
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from unimm.errors import ConfigError
from unimm.model.params import count_params, meta_model
from unimm.titan.launch import RECIPE_MODULE, load_recipe
from unimm.titan.model_size import ModelSize, SizedTrainer

PLAN_FILE = "plan.json"
LOCAL_SCRIPT = "launch_local.sh"
SLURM_SCRIPT = "launch_slurm.sbatch"


@dataclass(frozen=True)
class SizeRule:
    """Model sizes from widths: depth, heads and FFN width follow from d_model."""

    d_models: tuple[int, ...]
    aspect: int = 32
    """d_model / n_layers (paper backbone 2048 / 16 = 128; debug model 128 / 4 = 32)."""
    head_dim: int = 64
    kv_group: int = 4
    """Query heads per KV head (paper: 32 / 8); at least one KV head."""
    ffn_multiple: float = 4.0
    """FFN width / d_model (paper: 8192 / 2048), rounded up to a multiple of ``ffn_round``."""
    ffn_round: int = 8

    def size(self, d_model: int) -> ModelSize:
        if d_model % self.head_dim:
            raise ConfigError(f"d_model {d_model} is not a multiple of head_dim {self.head_dim}")
        n_heads = d_model // self.head_dim
        n_kv_heads = max(1, n_heads // self.kv_group)
        if n_heads % n_kv_heads:
            raise ConfigError(
                f"d_model {d_model}: {n_heads} heads do not split into groups of {self.kv_group} "
                f"({n_kv_heads} KV heads); choose widths whose head count divides by kv_group"
            )
        return ModelSize(
            dim=d_model,
            n_layers=max(1, round(d_model / self.aspect)),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            ffn_hidden_dim=self.ffn_round * math.ceil(self.ffn_multiple * d_model / self.ffn_round),
        )


@dataclass(frozen=True)
class SweepSpec:
    """What to sweep; everything else comes from the recipe."""

    recipe: str
    budgets: tuple[float, ...]
    sizes: SizeRule
    mixture: dict[str, float] | None = None
    """Source weights of the training data; None keeps the recipe's."""
    batch_rows: int | None = None
    """Global batch in rows; None: the recipe's (global batch size, else local batch size).
    Written into every run, so a run trains the same tokens on any number of processes."""
    warmup_fraction: float = 0.05
    """Warmup as a fraction of each run's steps (the cosine then spans the rest of the run)."""
    min_steps: int = 1
    """Points needing fewer steps are left out of the plan (listed under ``skipped``)."""
    overrides: tuple[str, ...] = ()
    """Command-line overrides given to every run (e.g. data options)."""


@dataclass(frozen=True)
class PlannedRun:
    name: str
    budget: float
    """The compute budget C the run belongs to."""
    size: ModelSize
    params: int
    """N of C = 6ND: active parameters (Table 5 convention)."""
    total_params: int
    steps: int
    tokens: int
    """D: steps x tokens per step."""
    flops: float
    """6 N D with the rounded D: the budget within half a step."""
    overrides: tuple[str, ...]
    """Everything after ``--recipe NAME`` (torchtitan syntax), ``--training.steps`` included."""


@dataclass(frozen=True)
class SkippedPoint:
    budget: float
    d_model: int
    reason: str


@dataclass(frozen=True)
class SweepPlan:
    spec: SweepSpec
    seq_len: int
    tokens_per_step: int
    runs: tuple[PlannedRun, ...]
    skipped: tuple[SkippedPoint, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SweepPlan:
        spec = dict(data["spec"])
        spec["sizes"] = SizeRule(**{**spec["sizes"], "d_models": tuple(spec["sizes"]["d_models"])})
        spec["budgets"], spec["overrides"] = tuple(spec["budgets"]), tuple(spec["overrides"])
        runs = tuple(
            PlannedRun(**{**run, "size": ModelSize(**run["size"]), "overrides": tuple(run["overrides"])})
            for run in data["runs"]
        )
        return cls(
            spec=SweepSpec(**spec),
            seq_len=data["seq_len"],
            tokens_per_step=data["tokens_per_step"],
            runs=runs,
            skipped=tuple(SkippedPoint(**point) for point in data["skipped"]),
        )


def plan_sweep(spec: SweepSpec) -> SweepPlan:
    """Every (budget, size) point of ``spec`` as a run of the recipe; raises ConfigError."""
    if not spec.budgets or not spec.sizes.d_models:
        raise ConfigError("a sweep needs at least one budget and one d_model")
    if any(not (math.isfinite(c) and c > 0) for c in spec.budgets):
        raise ConfigError(f"budgets must be positive FLOP counts, got {list(spec.budgets)}")
    config = load_recipe(spec.recipe, list(spec.overrides))
    if not isinstance(config, SizedTrainer.Config):
        raise ConfigError(
            f"recipe {spec.recipe!r} is not resizable: sweeps need one built with "
            "unimm.titan.model_size.sized (e.g. debug_sweep, dense_sweep)"
        )
    training = config.training
    recipe_rows = training.global_batch_size if training.global_batch_size > 0 else training.local_batch_size
    rows = spec.batch_rows or recipe_rows
    tokens_per_step = rows * training.seq_len
    mixture = _mixture_overrides(spec.mixture, config)
    shared = [*spec.overrides, "--training.global_batch_size", str(rows), *mixture]

    runs: list[PlannedRun] = []
    skipped: list[SkippedPoint] = []
    for d_model in sorted(spec.sizes.d_models):
        size = spec.sizes.size(d_model)
        counts = count_params(meta_model(size.apply(config.model_spec.model)))
        for budget in sorted(spec.budgets):
            steps = round(budget / (6.0 * counts.active * tokens_per_step))
            if steps < max(1, spec.min_steps):
                reason = f"{steps} steps < min_steps {spec.min_steps} (N = {counts.active:,})"
                skipped.append(SkippedPoint(budget, d_model, reason))
                continue
            warmup = max(1, round(spec.warmup_fraction * steps))
            tokens = steps * tokens_per_step
            runs.append(
                PlannedRun(
                    name=run_name(budget, size),
                    budget=budget,
                    size=size,
                    params=counts.active,
                    total_params=counts.total,
                    steps=steps,
                    tokens=tokens,
                    flops=6.0 * counts.active * tokens,
                    overrides=(
                        *shared,
                        "--training.steps", str(steps),
                        "--lr_scheduler.warmup_steps", str(warmup),
                        *size.overrides(),
                    ),
                )
            )
    names = [run.name for run in runs]
    if len(set(names)) < len(names):
        raise ConfigError(f"budgets or widths too close to name their runs apart: {sorted(names)}")
    runs.sort(key=lambda run: (run.budget, run.params))
    return SweepPlan(spec, training.seq_len, tokens_per_step, tuple(runs), tuple(skipped))


def run_name(budget: float, size: ModelSize) -> str:
    return f"c{budget:.3g}".replace("e+", "e") + f"_d{size.dim}_l{size.n_layers}"


@dataclass(frozen=True)
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 8
    time: str = "24:00:00"
    partition: str | None = None


def write_plan(
    plan: SweepPlan, out_dir: Path, *, nproc: int = 1, slurm: SlurmOptions = SlurmOptions()
) -> list[Path]:
    """plan.json and both launch scripts into ``out_dir``, the sweep folder (runs go under it)."""
    out_dir = out_dir.resolve()
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)  # slurm does not create its --output folder
    paths = [out_dir / PLAN_FILE, out_dir / LOCAL_SCRIPT, out_dir / SLURM_SCRIPT]
    paths[0].write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    paths[1].write_text(local_script(plan, out_dir, nproc))
    paths[2].write_text(slurm_script(plan, out_dir, slurm))
    paths[1].chmod(0o755)
    return paths


def read_plan(path: Path) -> SweepPlan:
    try:
        return SweepPlan.from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{path}: not a readable sweep plan ({error})") from None


def local_script(plan: SweepPlan, sweep_dir: Path, nproc: int) -> str:
    lines = [
        "#!/usr/bin/env bash",
        f"# IsoFLOP sweep: {len(plan.runs)} runs of recipe {plan.spec.recipe} (unimm isoflop plan; see {PLAN_FILE}).",
        "# A run whose final checkpoint exists is skipped, so the script resumes an interrupted sweep;",
        "# a failed run is reported and the sweep goes on (unimm isoflop collect lists it).",
        "# JOBS=2 runs two at a time (with OMP_NUM_THREADS=1 on a small CPU machine).",
        "set -uo pipefail",
        f"SWEEP=${{SWEEP:-{shlex.quote(str(sweep_dir))}}}",
        "JOBS=${JOBS:-1}",
        'mkdir -p "$SWEEP/logs"',
        "",
        "run() {  # run NAME FINAL_STEP OVERRIDES...",
        "  local name=$1 steps=$2",
        "  shift 2",
        '  if [ -d "$SWEEP/$name/checkpoint/step-$steps" ]; then echo "$name: done"; return 0; fi',
        '  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done',
        '  echo "$name: training"',
        f"  (unimm train --recipe {shlex.quote(plan.spec.recipe)} --nproc {nproc} \\",
        '    --out "$SWEEP/$name" "$@" \\',
        '    > "$SWEEP/logs/$name.log" 2>&1 || echo "$name: FAILED, see $SWEEP/logs/$name.log") &',
        "}",
        "",
    ]
    lines += [f"run {run.name} {run.steps} {shlex.join(run.overrides)}" for run in plan.runs]
    lines += ["wait", ""]
    return "\n".join(lines)


def slurm_script(plan: SweepPlan, sweep_dir: Path, slurm: SlurmOptions) -> str:
    header = [
        "#!/bin/bash",
        f"#SBATCH --job-name=isoflop-{plan.spec.recipe}",
        f"#SBATCH --array=0-{len(plan.runs) - 1}",
        f"#SBATCH --nodes={slurm.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={slurm.gpus_per_node}",
        f"#SBATCH --time={slurm.time}",
        f"#SBATCH --output={sweep_dir}/logs/%x-%A_%a.out",
    ]
    if slurm.partition:
        header.append(f"#SBATCH --partition={slurm.partition}")
    cases = [
        f"  {i}) NAME={run.name}; STEPS={run.steps}; set -- {shlex.join(run.overrides)} ;;"
        for i, run in enumerate(plan.runs)
    ]
    body = [
        f"# IsoFLOP sweep: one array task per run of {PLAN_FILE} (written by unimm isoflop plan).",
        "set -euo pipefail",
        f"SWEEP={shlex.quote(str(sweep_dir))}",
        'case "$SLURM_ARRAY_TASK_ID" in',
        *cases,
        '  *) echo "no run for array index $SLURM_ARRAY_TASK_ID" >&2; exit 1 ;;',
        "esac",
        'if [ -d "$SWEEP/$NAME/checkpoint/step-$STEPS" ]; then echo "$NAME: done"; exit 0; fi',
        'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f'srun torchrun --nnodes "$SLURM_NNODES" --nproc-per-node {slurm.gpus_per_node} \\',
        '  --rdzv-backend c10d --rdzv-endpoint "$HEAD_NODE:29500" \\',
        '  --rdzv-id "$SLURM_ARRAY_JOB_ID-$SLURM_ARRAY_TASK_ID" \\',
        f'  -m unimm.titan.train --module {RECIPE_MODULE} --config {shlex.quote(plan.spec.recipe)} \\',
        '  --dump_folder "$SWEEP/$NAME" "$@"',
        "",
    ]
    return "\n".join(header + [""] + body)


def _mixture_overrides(mixture: dict[str, float] | None, config: SizedTrainer.Config) -> list[str]:
    # The loader's weights are a dict with fixed keys on the command line
    # (--dataloader.source_weights.NAME W): every source the recipe knows gets a weight, 0 drops it.
    if mixture is None:
        return []
    known = config.dataloader.source_weights
    unknown = sorted(set(mixture) - set(known))
    if unknown:
        raise ConfigError(f"mixture sources {unknown} are not in the recipe's data (it has {sorted(known)})")
    if any(w < 0 for w in mixture.values()) or not any(w > 0 for w in mixture.values()):
        raise ConfigError(f"mixture weights must be >= 0 with at least one > 0, got {mixture}")
    return [
        token
        for name in sorted(known)
        for token in (f"--dataloader.source_weights.{name}", repr(float(mixture.get(name, 0.0))))
    ]
