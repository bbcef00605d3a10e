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

The held-out sets are a different procedural split (``procedural_seed``) than training, or
given shards, and are identical for every run with the same data settings. The table also
carries the exact training FLOPs (``flops_exact``, :mod:`unimm.flops`, with the position mix
measured on a training batch) beside ``flops`` = 6 N D, which the fits use.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.api import CheckpointException

from unimm.data.batch import IGNORE_INDEX
from unimm.data.loader import Batch
from unimm.errors import ConfigError
from unimm.flops import PositionMix, measure_mix, model_flops
from unimm.flow import FlowMatchingConfig, flow_loss_sum, interpolate
from unimm.masks import build_attention_mask
from unimm.model.params import meta_model
from unimm.scaling.plan import PlannedRun, SweepPlan
from unimm.scaling.table import Run
from unimm.titan.launch import load_recipe
from unimm.titan.metrics_jsonl import read_metrics


@dataclass(frozen=True)
class HeldOut:
    seed: int = 1
    """``procedural_seed`` of the held-out split; must differ from the runs' training split."""
    shards: str = ""
    """A folder of held-out shards (manifest.json) instead of a procedural split."""
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
    text: list[Batch]
    image_text: list[Batch]
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
        data = self._data_for(config)
        checkpoint = final_checkpoint(run, run_dir)
        try:
            model = load_model(config.model_spec.model, checkpoint)
        except (CheckpointException, RuntimeError, OSError) as error:  # unreadable or mismatched weights
            first_line = next(iter(str(error).splitlines()), type(error).__name__)
            return RunResult(run, "failed", f"could not load {checkpoint}: {first_line}")
        heldout = self.heldout
        language = text_loss(model, data.text)
        vision = flow_loss(model, data.image_text, config.loss.flow, heldout.timesteps, heldout.noise_seed)
        flops = model_flops(meta_model(config.model_spec.model)).per_token(data.train_mix, config.training.seq_len)
        result = RunResult(run, "ok", "", language, vision, flops.mean * run.tokens)
        if not (math.isfinite(language) and math.isfinite(vision)):
            return dataclasses.replace(result, status="diverged", note="held-out loss not finite")
        return result

    def _data_for(self, config) -> HeldOutData:
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
            self._data[key] = heldout_data(config, self.heldout)
        return self._data[key]


def heldout_data(config, heldout: HeldOut) -> HeldOutData:
    """The held-out text and image-text sets of a run's config, and its training position mix."""
    seq_len, rows = config.training.seq_len, config.training.local_batch_size
    tokenizer = config.tokenizer.build()
    model = config.model_spec.model
    # What the trainer copies from the model into the loader's config before building it.
    train = dataclasses.replace(config.dataloader, latent_dim=model.latent_dim, vocab_size=model.vocab_size)
    if heldout.shards:
        held = dataclasses.replace(train, shards=heldout.shards)
    elif train.shards:
        raise ConfigError(f"runs train on shards ({train.shards}): give held-out shards (--heldout-shards)")
    elif heldout.seed == train.procedural_seed:
        raise ConfigError(f"held-out seed {heldout.seed} is the training split's procedural_seed")
    else:
        held = dataclasses.replace(train, procedural_seed=heldout.seed)

    def batches(data, count: int, **changes) -> list[Batch]:
        loader = dataclasses.replace(data, **changes).build(
            dp_world_size=1, dp_rank=0, tokenizer=tokenizer, seq_len=seq_len, local_batch_size=rows
        )
        return list(itertools.islice(loader, count))

    # Image-text pairs laid out caption first and never dropped: every image is generated
    # from its caption, so all of its patches carry the flow loss.
    held_out = {"p_understanding": 0.0, "cond_dropout": 0.0}
    return HeldOutData(
        text=batches(held, heldout.batches, source_weights={"text": 1.0}, **held_out),
        image_text=batches(held, heldout.batches, source_weights={"image_text": 1.0}, **held_out),
        train_mix=measure_mix(*batches(train, 1)[0]),
    )


def load_model(model_config, checkpoint: Path) -> nn.Module:
    """The model's weights from a torchtitan DCP checkpoint, in this process, on CPU."""
    model = model_config.build()
    state = model.state_dict()
    # torchtitan stores the model's parameters under their own names at the top level of
    # the checkpoint (beside optimizer, dataloader, ... entries, which are not read).
    dcp.load(state, checkpoint_id=str(checkpoint))
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def text_loss(model: nn.Module, batches: list[Batch]) -> float:
    total, count = 0.0, 0
    for inputs, labels in batches:
        targets = labels != IGNORE_INDEX
        t_BL = torch.ones(labels.shape)
        logits, _ = _forward(model, inputs, inputs["latents"], t_BL, targets, torch.zeros_like(targets))
        total += F.cross_entropy(logits.float(), labels[targets], reduction="sum").item()
        count += int(targets.sum())
    return total / count if count else math.nan


@torch.no_grad()
def flow_loss(
    model: nn.Module, batches: list[Batch], flow: FlowMatchingConfig, timesteps: int, noise_seed: int
) -> float:
    """Mean over t = (k + 1/2) / timesteps of the flow loss with fixed noise per batch."""
    noise = []
    for b, (inputs, _) in enumerate(batches):
        generator = torch.Generator().manual_seed(noise_seed * 1_000_003 + b)
        noise.append(torch.randn(inputs["latents"].shape, generator=generator))
    per_t = []
    for k in range(timesteps):
        t = (k + 0.5) / timesteps
        total, count = 0.0, 0
        for (inputs, labels), eps in zip(batches, noise, strict=True):
            denoise, z0 = inputs["denoise"], inputs["latents"].float()
            t_BL = torch.where(denoise, t, 1.0)
            z_in = torch.where(denoise[..., None], interpolate(z0, eps, t_BL[..., None]), z0)
            _, pred = _forward(model, inputs, z_in, t_BL, torch.zeros_like(denoise), denoise)
            total += flow_loss_sum(pred, z0[denoise], eps[denoise], t_BL[denoise][:, None], flow).item()
            count += int(denoise.sum()) * z0.shape[-1]
        per_t.append(total / count if count else math.nan)
    return sum(per_t) / len(per_t)


def _forward(model, inputs, latents_BLC, t_BL, lm_positions_BL, flow_positions_BL):
    mask = build_attention_mask(inputs["document_ids"], inputs["frame_ids"], "sdpa")
    outputs = model(
        inputs["tokens"],
        latents_BLC,
        t_BL,
        inputs["modality"],
        inputs["positions"],
        mask,
        lm_positions_BL,
        flow_positions_BL,
    )
    return outputs[0], outputs[1]  # LM logits and flow predictions; any further output is a training aux


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
