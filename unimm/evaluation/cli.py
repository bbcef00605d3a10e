"""``unimm eval``: measure a trained run's checkpoint; JSON and PNGs under RUN/eval/step-N/."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from unimm.errors import ConfigError

DESCRIPTION = """\
Evaluate a run's checkpoint (default: the latest) with held-out, procedurally generated data
(no downloads): writes RUN/eval/step-N/SUITE.json, the suites' PNGs and summary.json.

suites (default: every one that applies to the model):
  perplexity     held-out text: next-token cross-entropy and perplexity
  diffusion      held-out image-text: flow loss at 8 fixed t with fixed noise, per t and mean
  understanding  exact-match accuracy on SpatialMap, Grid, Ring, counting, diagonal relations
                 (and text rendering by CER/WER), image and text versions, greedy answers
  generation     colour / shape / count / position prompts, images scored from their pixels
                 (GenEval-like per category), a grid of images with verdicts
  captioning     single-object images captioned: colour and shape exactly right
  probes         linear probes of the frame hidden states at every depth (colour, shape, count)
  moe            routing per modality, timestep bin and task; specialisation, CV, r (MoE only)

The recipe and options come from RUN/run.json (the run's last launch); further --section.key
VALUE options are added after them. With --recipe, run.json is not read: give the run's
options on this command line, as to unimm sample."""


def _options(args: argparse.Namespace):
    from unimm.evaluation.heldout import HeldOutSpec
    from unimm.evaluation.suites import EvalOptions

    counts = {
        "--samples": args.samples, "--prompts": args.prompts, "--captions": args.captions,
        "--probe-samples": args.probe_samples, "--heldout-documents": args.heldout_documents,
        "--euler-steps": args.euler_steps, "--timesteps": args.timesteps,
    }
    if args.threads < 0:
        raise ConfigError(f"--threads {args.threads}: expected 0 (torch's default) or a positive number")
    bad = [f"{name} {value}" for name, value in counts.items() if value is not None and value < 1]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: expected a positive number")
    if args.probe_samples is not None and args.probe_samples < 4:
        raise ConfigError(f"--probe-samples {args.probe_samples}: a probe needs at least 4 images (train and test)")
    text_dir, image_dir = args.heldout_text or args.heldout, args.heldout_image or args.heldout
    for option, folder in (("--heldout-text", text_dir), ("--heldout-image", image_dir)):
        if folder and not (Path(folder) / "manifest.json").is_file():
            raise ConfigError(f"{option} {folder}: no manifest.json there (a shard folder written by data_pipelines)")
    defaults = EvalOptions()
    heldout = HeldOutSpec(
        seed=args.seed,
        text_dir=text_dir or "",
        image_dir=image_dir or "",
        documents=args.heldout_documents or defaults.heldout.documents,
        timesteps=args.timesteps or defaults.heldout.timesteps,
        noise_seed=args.noise_seed,
    )
    return replace(
        defaults,
        seed=args.seed,
        heldout=heldout,
        understanding_samples=args.samples or defaults.understanding_samples,
        generation_prompts=args.prompts or defaults.generation_prompts,
        captioning_samples=args.captions or defaults.captioning_samples,
        probe_samples=args.probe_samples or defaults.probe_samples,
        euler_steps=args.euler_steps or defaults.euler_steps,
        cfg_scale=args.cfg_scale,
    )


def _requested(names: list[str] | None) -> list[str] | None:
    from unimm.evaluation.suites import SUITES

    if not names:
        return None
    flat = [n for item in names for n in item.split(",") if n]
    unknown = [n for n in flat if n not in SUITES]
    if unknown:
        raise ConfigError(f"--suite {', '.join(unknown)}: unknown suite; known: {', '.join(SUITES)}")
    return list(dict.fromkeys(flat))


def evaluate(run: str | Path, suites: list[str] | None = None, ckpt: str | None = None, options=None,
             recipe: str | None = None, overrides: list[str] | None = None, log=print, threads: int | None = 1) -> dict:
    """Run ``suites`` (default: those that apply) on a run's checkpoint; returns summary.json's dict.

    ``threads``: torch's intra-op threads (None: torch's default). One by default: the suites
    decode token by token and denoise one frame at a time, where a small model's operations are
    too small to split, and extra threads only add synchronisation (on 2 busy cores, 2 threads
    cost 15x the CPU time of 1 per decoded token)."""
    import torch
    from tqdm import tqdm

    from unimm.evaluation.report import jsonable, write_json
    from unimm.evaluation.run import open_run
    from unimm.evaluation.suites import SUITES, EvalOptions

    options = options or EvalOptions()
    names = _requested(suites)
    if threads is not None:
        torch.set_num_threads(threads)
    ev = open_run(run, ckpt, recipe, overrides)
    train_seed = ev.config.dataloader.procedural_seed
    if options.seed == train_seed and not ev.config.dataloader.shards:
        raise ConfigError(f"--seed {options.seed} is the run's training procedural_seed: held-out data needs another")
    reasons = {name: suite.not_applicable(ev) for name, suite in SUITES.items()}
    if names is None:
        names = [name for name in SUITES if reasons[name] is None]
    for name in names:
        if reasons[name]:
            raise ConfigError(f"--suite {name}: {reasons[name]}")
    out = Path(run) / "eval" / f"step-{ev.step}"
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.update({"run": str(Path(run)), "step": ev.step, "recipe": ev.recipe, "checkpoint": str(ev.checkpoint)})
    summary.setdefault("suites", {})
    summary.setdefault("seconds", {})

    def progress(items, desc: str):
        return tqdm(items, desc=desc, leave=False, file=sys.stderr, disable=None)

    for name in names:
        start = time.perf_counter()
        report = jsonable(SUITES[name].run(ev, out, options, progress))
        write_json(out / f"{name}.json", {"suite": name, "step": ev.step, **report})
        summary["suites"][name] = jsonable(SUITES[name].headline(report))
        summary["seconds"][name] = round(time.perf_counter() - start, 2)
        log(f"{name}: {json.dumps(summary['suites'][name])}  ({summary['seconds'][name]} s)")
    write_json(summary_path, summary)
    return summary


def _eval(args: argparse.Namespace) -> int:
    summary = evaluate(
        args.run, args.suite, args.ckpt, _options(args), args.recipe, args.config_overrides,
        log=(lambda line: None) if args.json else print, threads=args.threads or None,
    )
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"unimm: eval reports in {Path(args.run) / 'eval' / ('step-' + str(summary['step']))}")
    return 0


def register(verbs: argparse._SubParsersAction) -> None:
    p = verbs.add_parser(
        "eval", help="evaluate a run's checkpoint: held-out losses, understanding, generation, probes, MoE routing",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", required=True, metavar="DIR", help="run folder (checkpoint/step-N, run.json)")
    p.add_argument("--ckpt", metavar="step-N", help="checkpoint to evaluate (default: the latest)")
    p.add_argument("--suite", action="extend", nargs="+", metavar="NAME",
                   help="suites to run (space- or comma-separated, repeatable); default: all that apply")
    p.add_argument("--json", action="store_true", help="print summary.json on stdout instead of one line per suite")
    p.add_argument("--recipe", metavar="NAME", help="the run's recipe, with its options on this command line (default: both from RUN/run.json)")
    p.add_argument("--seed", type=int, default=1, metavar="N", help="seed of the generated held-out data (default 1; training's is 0)")
    p.add_argument("--heldout", metavar="DIR", help="held-out shard folder for both text and image-text sets")
    p.add_argument("--heldout-text", metavar="DIR", help="held-out text shards (default: generated)")
    p.add_argument("--heldout-image", metavar="DIR", help="held-out image-text shards (default: generated)")
    p.add_argument("--heldout-documents", type=int, metavar="N", help="documents per held-out set (default 64)")
    p.add_argument("--timesteps", type=int, metavar="K", help="fixed flow times of the diffusion loss (default 8)")
    p.add_argument("--noise-seed", type=int, default=0, metavar="N", help="seed of the diffusion loss's fixed noise (default 0)")
    p.add_argument("--samples", type=int, metavar="N", help="understanding questions per set and version (default 8)")
    p.add_argument("--prompts", type=int, metavar="N", help="generation prompts per category (default 8)")
    p.add_argument("--captions", type=int, metavar="N", help="images to caption (default 16)")
    p.add_argument("--probe-samples", type=int, metavar="N", help="images per probe label (default 128)")
    p.add_argument("--euler-steps", type=int, metavar="N", help="Euler steps per generated image (default 25)")
    p.add_argument("--cfg-scale", type=float, default=3.0, metavar="W", help="classifier-free guidance weight (default 3.0)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="torch intra-op threads (default 1: token-by-token decoding of small models gains nothing from more; 0: torch's default)")
    p.set_defaults(func=_eval, takes_overrides=True)
