"""The evaluation suites of ``unimm eval``: what each measures, when it applies, its headline.

Every suite takes the opened run (``unimm.evaluation.run.EvalRun``), the output folder and the
options, writes its figures there and returns its JSON report; ``headline`` picks the numbers
``summary.json`` shows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unimm.evaluation.heldout import HeldOutSpec


@dataclass(frozen=True)
class EvalOptions:
    seed: int = 1
    """Seed of every generated held-out set and of the sampler's noise; refused when it is
    the training split's procedural_seed."""
    heldout: HeldOutSpec = field(default_factory=HeldOutSpec)
    understanding_samples: int = 8
    """Questions per set and version (image, text)."""
    generation_prompts: int = 8
    """Prompts per category (single object, position, count)."""
    captioning_samples: int = 16
    probe_samples: int = 128
    moe_documents: int = 16
    euler_steps: int = 25
    cfg_scale: float = 3.0


def _heldout_context(ev):
    from unimm.evaluation.heldout import data_context

    return data_context(ev.config, ev.manifest, ev.tokenizer, ev.latents, ev.image_size)


def perplexity_suite(ev, out: Path, opts: EvalOptions, progress) -> dict:
    from unimm.evaluation.heldout import perplexity, text_documents

    docs = text_documents(opts.heldout, _heldout_context(ev))
    source = opts.heldout.text_dir or f"procedural text, seed {opts.heldout.seed}"
    return {"heldout": source, **perplexity(ev.model, docs, ev.tokenizer.pad_id, opts.heldout.rows)}


def diffusion_suite(ev, out: Path, opts: EvalOptions, progress) -> dict:
    from unimm.evaluation.heldout import diffusion_loss, image_documents
    from unimm.evaluation.report import figure, save

    spec = opts.heldout
    docs = image_documents(spec, _heldout_context(ev))
    result = diffusion_loss(ev.model, docs, ev.flow, ev.tokenizer.pad_id, spec.timesteps, spec.noise_seed, spec.rows)
    fig = figure((4.8, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(result["t"], result["loss_per_t"], marker="o")
    ax.set_xlabel("flow time t (1 = clean)")
    ax.set_ylabel("flow loss per latent element")
    ax.set_title(f"held-out flow loss, mean {result['mean']:.4g}")
    source = spec.image_dir or f"procedural image-text, seed {spec.seed}"
    return {"heldout": source, "prediction": ev.flow.prediction, **result, "figures": [save(fig, out / "diffusion.png")]}


def understanding_suite(ev, out: Path, opts: EvalOptions, progress) -> dict:
    from unimm.evaluation.understanding import run_understanding

    return run_understanding(ev, out, samples=opts.understanding_samples, seed=opts.seed, progress=progress)


def generation_suite(ev, out: Path, opts: EvalOptions, progress) -> dict:
    from unimm.evaluation.generation import run_generation

    return run_generation(ev, out, per_category=opts.generation_prompts, seed=opts.seed,
                          euler_steps=opts.euler_steps, cfg_scale=opts.cfg_scale, progress=progress)


def captioning_suite(ev, out: Path, opts: EvalOptions, progress) -> dict:
    from unimm.evaluation.captioning import run_captioning

    return run_captioning(ev, out, samples=opts.captioning_samples, seed=opts.seed, progress=progress)


def probes_suite(ev, out: Path, opts: EvalOptions, progress) -> dict:
    from unimm.evaluation.probes import run_probes

    return run_probes(ev, out, samples=opts.probe_samples, seed=opts.seed, progress=progress)


def moe_suite(ev, out: Path, opts: EvalOptions, progress) -> dict:
    from unimm.evaluation.moe_capture import run_moe

    return run_moe(ev, out, documents=opts.moe_documents, seed=opts.seed, progress=progress)


def _no_routers(ev) -> str | None:
    from unimm.evaluation.moe_capture import routers

    if routers(ev.model):
        return None
    return f"the model has no routed experts (ffn.kind {ev.model_config.ffn.kind!r})"


def _mean(values) -> float | None:
    finite = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else None


@dataclass(frozen=True)
class Suite:
    run: Callable
    headline: Callable[[dict], dict]
    not_applicable: Callable = lambda ev: None
    """A reason the suite does not apply to a run's model, or None."""


SUITES: dict[str, Suite] = {
    "perplexity": Suite(perplexity_suite, lambda r: {"perplexity": r["perplexity"], "nll": r["nll"]}),
    "diffusion": Suite(diffusion_suite, lambda r: {"mean": r["mean"], "loss_per_t": r["loss_per_t"]}),
    "understanding": Suite(understanding_suite, lambda r: {
        "mean_accuracy": r["mean_accuracy"],
        **{f"{s}/{v}": x["accuracy"] for s, views in r["sets"].items() for v, x in views.items()},
    }),
    "generation": Suite(generation_suite, lambda r: r.get("scores") or {"skipped": r.get("skipped")}),
    "captioning": Suite(captioning_suite, lambda r: r["accuracy"]),
    "probes": Suite(probes_suite, lambda r: {
        label: {"best": max(x["accuracy"] for x in rows), "last": rows[-1]["accuracy"], "chance": rows[-1]["chance"]}
        for label, rows in r["labels"].items()
    }),
    "moe": Suite(moe_suite, lambda r: {
        "class_totals": {c: int(np.sum(v)) for c, v in r["classes_per_layer"].items()},
        "timestep_cv_median": _mean(r["timestep_cv_median_per_layer"]),
        "understanding_generation_r_mean": _mean(list(r["understanding_generation_r_per_layer"])),
    }, _no_routers),
}
