"""Collect an IsoFLOP sweep: held-out losses of every planned run's final checkpoint -> run table.

For each run of ``plan.json`` the run folder is screened first: a missing folder, a training
loss that went non-finite or ended above where it started, or no checkpoint at the planned
final step makes the run unusable; it is reported and written to the table with a ``status``
(``missing``, ``diverged``, ``failed``) and a ``note``, so that ``unimm isoflop fit`` drops it
and says why. Every other run is rebuilt from the plan's recipe and overrides, its DCP model
weights are loaded in this process on CPU, and two held-out losses are measured:

- ``language``: next-token cross-entropy on a held-out text-only set;
- ``vision``: flow-matching loss on a held-out image-text set (captions first, so every image
  is generated), averaged over fixed flow times t = (k + 1/2) / K, k < K, with fixed noise.
  Fixed t and noise take the timestep sampling out of the comparison between runs.

The two sets are ``unimm.evaluation.heldout``'s (the evaluators of ``unimm eval``'s perplexity
and diffusion suites), each a different procedural split (``seed``) than training or a given
shard folder (``text``, ``image``), identical for every run with the same data settings. The table also
carries the exact training FLOPs (``flops_exact``, :mod:`unimm.flops`, with the position mix
measured on a training batch) beside ``flops`` = 6 N D, which the fits use.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from unimm.data.sequences import Document
from unimm.errors import ConfigError
from unimm.evaluation.heldout import (
    HeldOutSpec,
    data_context,
    diffusion_loss,
    image_documents,
    perplexity,
    text_documents,
)
from unimm.evaluation.run import encode_images, generation_encoding, load_model
from unimm.flops import PositionMix, measure_mix, model_flops
from unimm.model.params import meta_model
from unimm.scaling.plan import PlannedRun, SweepPlan
from unimm.scaling.table import Run
from unimm.titan.launch import load_recipe, preflight
from unimm.titan.metrics_jsonl import read_metrics


@dataclass(frozen=True)
class HeldOut:
    seed: int = 1
    """Seed of the generated held-out split; must differ from the runs' ``procedural_seed``."""
    text: str = ""
    """A folder of held-out text shards (manifest.json) instead of a generated split."""
    image: str = ""
    """A folder of held-out image-text shards instead of a generated split."""
    batches: int = 8
    """Batches of the recipe's local batch size in each held-out set."""
    timesteps: int = 8
    noise_seed: int = 0


@dataclass(frozen=True)
class RunResult:
    run: PlannedRun
    status: str
    """``ok``, or why the run is unusable: ``missing``, ``diverged``, ``failed``."""
    note: str
    language: float = math.nan
    vision: float = math.nan
    flops_exact: float = math.nan

    def rows(self) -> list[Run]:
        """The run's two rows of the run table (language, vision)."""
        run = self.run
        extra = {
            "status": self.status,
            "note": self.note,
            "flops_exact": "" if math.isnan(self.flops_exact) else f"{self.flops_exact:.6g}",
            "steps": str(run.steps),
            "d_model": str(run.size.dim),
            "n_layers": str(run.size.n_layers),
        }
        return [
            Run(run.name, modality, run.flops, run.params, run.tokens, loss, extra)
            for modality, loss in (("language", self.language), ("vision", self.vision))
        ]


def screen_run(run: PlannedRun, run_dir: Path) -> RunResult | None:
    """Why ``run`` cannot be evaluated, or None when its final checkpoint is there to load."""
    if not run_dir.is_dir():
        return RunResult(run, "missing", f"no run folder {run_dir}")
    metrics = [(row["step"], row.get("loss")) for row in read_metrics(run_dir / "metrics.jsonl")]
    for step, loss in metrics:
        if loss is None or not math.isfinite(loss):  # metrics.jsonl writes NaN and inf as null
            return RunResult(run, "diverged", f"training loss not finite at step {step}")
    if len(metrics) >= 2 and metrics[-1][1] > metrics[0][1]:
        (first_step, first), (last_step, last) = metrics[0], metrics[-1]
        note = f"training loss rose from {first:.4g} (step {first_step}) to {last:.4g} (step {last_step})"
        return RunResult(run, "diverged", note)
    if not final_checkpoint(run, run_dir).is_dir():
        return RunResult(run, "failed", f"no checkpoint of the final step {run.steps}: the run did not end")
    return None


def final_checkpoint(run: PlannedRun, run_dir: Path) -> Path:
    return run_dir / "checkpoint" / f"step-{run.steps}"


@dataclass(frozen=True)
class HeldOutData:
    text: list[Document]
    image_text: list[Document]
    pad_id: int
    train_mix: PositionMix
    """Position mix of a training batch, for the exact FLOP count."""


class Evaluator:
    """Held-out losses of checkpoints; held-out sets are built once per data setting."""

    def __init__(self, heldout: HeldOut):
        if heldout.batches < 1 or heldout.timesteps < 1:
            raise ConfigError("held-out batches and timesteps must be >= 1")
        self.heldout = heldout
        self._data: dict[tuple, HeldOutData] = {}

    def evaluate(self, run: PlannedRun, recipe: str, run_dir: Path) -> RunResult:
        config = load_recipe(recipe, list(run.overrides))
        manifest = preflight(config)  # fits the model to its data, as the trainer does
        data = self._data_for(config, manifest)
        checkpoint = final_checkpoint(run, run_dir)
        try:
            model = load_model(config.model_spec.model, checkpoint)
        except (ConfigError, RuntimeError, OSError) as error:  # unreadable or mismatched weights
            first_line = next(iter(str(error).splitlines()), type(error).__name__)
            return RunResult(run, "failed", f"could not load {checkpoint}: {first_line}")
        heldout, rows = self.heldout, config.training.local_batch_size
        language = perplexity(model, data.text, data.pad_id, rows)["nll"]
        vision = diffusion_loss(
            model, data.image_text, config.loss.flow, data.pad_id, heldout.timesteps, heldout.noise_seed, rows
        )["mean"]
        flops = model_flops(meta_model(config.model_spec.model)).per_token(data.train_mix, config.training.seq_len)
        result = RunResult(run, "ok", "", language, vision, flops.mean * run.tokens)
        if not (math.isfinite(language) and math.isfinite(vision)):
            return dataclasses.replace(result, status="diverged", note="held-out loss not finite")
        return result

    def _data_for(self, config, manifest) -> HeldOutData:
        model, training = config.model_spec.model, config.training
        key = (
            repr(config.dataloader),
            repr(config.tokenizer),
            training.seq_len,
            training.local_batch_size,
            model.latent_dim,
            model.vocab_size,
        )
        if key not in self._data:
            self._data[key] = heldout_data(config, self.heldout, manifest)
        return self._data[key]


def heldout_data(config, heldout: HeldOut, manifest=None) -> HeldOutData:
    """The held-out text and image-text sets of a run's config (``unimm.evaluation.heldout``,
    ``batches`` x the local batch size documents each), and its training position mix.
    ``manifest``: the training data's (``preflight(config)``), read here when not given."""
    if config.dataloader.shards and not (heldout.text and heldout.image):
        raise ConfigError(
            f"runs train on shards ({config.dataloader.shards}): give held-out shards (--heldout-text and "
            "--heldout-image, or --heldout-shards for one folder holding both)"
        )
    if manifest is None:
        manifest = preflight(config)  # the training data's manifest: encoder and latent statistics
    tokenizer = config.tokenizer.build()
    encoder, normalizer = generation_encoding(config, manifest)
    spec = HeldOutSpec(
        seed=heldout.seed,
        text_dir=heldout.text,
        image_dir=heldout.image,
        documents=heldout.batches * config.training.local_batch_size,
        timesteps=heldout.timesteps,
        noise_seed=heldout.noise_seed,
    )
    context = data_context(config, manifest, tokenizer, partial(encode_images, encoder, normalizer), encoder.image_size)
    train = config.dataloader.build(
        dp_world_size=1, dp_rank=0, tokenizer=tokenizer, seq_len=config.training.seq_len,
        local_batch_size=config.training.local_batch_size,
    )
    return HeldOutData(
        text=text_documents(spec, context),
        image_text=image_documents(spec, context),
        pad_id=tokenizer.pad_id,
        train_mix=measure_mix(*next(iter(train))),
    )


def collect(plan: SweepPlan, sweep_dir: Path, heldout: HeldOut, log=print) -> list[RunResult]:
    """Screen and evaluate every run of ``plan`` under ``sweep_dir``; never raises for a bad run."""
    evaluator = Evaluator(heldout)
    results = []
    for run in plan.runs:
        run_dir = sweep_dir / run.name
        result = screen_run(run, run_dir) or evaluator.evaluate(run, plan.spec.recipe, run_dir)
        if result.status == "ok":
            log(f"{run.name}: language {result.language:.4f}  vision {result.vision:.4f}")
        else:
            log(f"{run.name}: {result.status}: {result.note}")
        results.append(result)
    return results
