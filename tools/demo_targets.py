"""Issue 15's demo targets, measured exactly: single-object text-to-image and captioning.

    python tools/demo_targets.py --run runs/demo                      # recipe demo, latest checkpoint
    python tools/demo_targets.py --run runs/x --recipe debug_sweep --n 64 --model_size.dim 192 ...

Held-out scenes are ``procedural.single_object_sample(i, --seed, layout=--layout)`` for i < --n
(seed 1: the test split; the demo trains on seed 0 of the same layout, "centred": one large shape
near the centre), rendered at the run's image size. Both directions use
``unimm.sampling.MixedModalSampler`` as ``unimm sample`` builds it:

- text to image: the scene's caption ("a red circle") -> 25-step Euler with guidance 3.0 ->
  decoded pixels, scored by ``unimm.evaluation.scorers`` (colour: majority palette colour of
  the foreground; shape: best template IoU of the largest component). Targets: colour >= 80%,
  shape >= 50%.
- captioning: the scene's image, encoded and normalised as the shards are -> greedy caption;
  right when it names exactly one colour and one shape and both are the scene's. Target >= 50%.

Writes RUN/demo_targets.json (accuracies, targets, every item) and RUN/demo_targets.png (the
generated images and the captioned ones, each with its verdict). Further ``--section.key
VALUE`` options are the run's torchtitan config overrides, as for ``unimm sample``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from unimm.data_pipelines.procedural import COLOURS, SHAPES, SINGLE_OBJECT_LAYOUTS, single_object_sample
from unimm.errors import ConfigError
from unimm.evaluation.scorers import score_colour, score_shape
from unimm.sampling_cli import _load_sampler, latest_checkpoint

TARGETS = {"t2i_colour": 0.8, "t2i_shape": 0.5, "captioning": 0.5}
DEMO_LAYOUT = "centred"  # the layout of the demo's training scenes (source single_object_centred)


def named(text: str) -> tuple[list[str], list[str]]:
    """The palette colours and shapes a caption names, in order (whole words only)."""
    words = re.findall(r"[a-z]+", text.lower())
    return [w for w in words if w in COLOURS], [w for w in words if w in SHAPES]


def caption_correct(text: str, colour: str, shape: str) -> bool:
    colours, shapes = named(text)
    return colours == [colour] and shapes == [shape]


def _grid(path: Path, panels: list[tuple[np.ndarray, str, bool]], columns: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(1, -(-len(panels) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.45 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (pixels, title, ok) in zip(axes.flat, panels):
        ax.imshow(pixels, interpolation="nearest")
        ax.set_title(title, fontsize=5.5, color="darkgreen" if ok else "firebrick")
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measure(args: argparse.Namespace, overrides: list[str]) -> dict:
    sampler_args = argparse.Namespace(
        recipe=args.recipe, config_overrides=overrides, run=args.run, step=args.step,
        euler_steps=args.euler_steps, cfg_scale=args.cfg_scale, seed=args.noise_seed, caption_images=0,
    )
    # One thread: every op here is a few dozen positions wide, too small to gain from a second
    # thread, and threads spinning on a busy machine made sampling several times slower.
    torch.set_num_threads(1)
    sampler, encoder, normalizer, _ = _load_sampler(sampler_args)
    if getattr(encoder, "decode", None) is None:
        raise ConfigError(f"run {args.run}: its encoder {type(encoder).__name__} cannot decode images to score")
    checkpoint = latest_checkpoint(Path(args.run), args.step)
    scenes = [single_object_sample(i, args.seed, encoder.image_size, args.layout) for i in range(args.n)]

    generated, captions = [], []
    for scene in tqdm(scenes, desc="text to image", file=sys.stdout):
        obj = scene["objects"][0]
        latents = sampler.text_to_image(scene["caption"]).numpy()
        if normalizer is not None:
            latents = normalizer.denormalize(latents)
        pixels = encoder.decode(latents[None])[0]
        colour, shape = score_colour(pixels, obj.colour), score_shape(pixels, obj.shape)
        generated.append((pixels, scene["caption"], colour.predicted, shape.predicted, colour.correct, shape.correct))
    for scene in tqdm(scenes, desc="captioning", file=sys.stdout):
        obj = scene["objects"][0]
        latents = encoder.encode(scene["image"][None])[0]
        if normalizer is not None:
            latents = normalizer.normalize(latents)
        text = sampler.image_to_text(torch.from_numpy(latents))
        captions.append((scene["image"], scene["caption"], text, caption_correct(text, obj.colour, obj.shape)))

    n = len(scenes)
    results = {
        "t2i_colour": sum(g[4] for g in generated) / n,
        "t2i_shape": sum(g[5] for g in generated) / n,
        "captioning": sum(c[3] for c in captions) / n,
    }
    report = {
        "run": str(args.run),
        "checkpoint": checkpoint.name,
        "held_out": {"generator": "procedural.single_object_sample", "layout": args.layout, "seed": args.seed, "n": n},
        "sampling": {"euler_steps": args.euler_steps, "cfg_scale": args.cfg_scale, "noise_seed": args.noise_seed},
        "accuracy": results,
        "t2i_colour_and_shape": sum(g[4] and g[5] for g in generated) / n,
        "captioning_exact_text": sum(c[1] == c[2].strip() for c in captions) / n,
        "targets": TARGETS,
        "met": {k: results[k] >= TARGETS[k] for k in TARGETS},
        "text_to_image": [
            {"prompt": p, "colour": c, "shape": s, "colour_correct": co, "shape_correct": so}
            for _, p, c, s, co, so in generated
        ],
        "captioning_items": [{"truth": t, "generated": g, "correct": ok} for _, t, g, ok in captions],
    }
    out = Path(args.out or args.run)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_targets.json").write_text(json.dumps(report, indent=2))
    panels = [(px, f"{p}\n-> {c} {s}", co and so) for px, p, c, s, co, so in generated]
    panels += [(img, f"model: {g.strip()[:24]}", ok) for img, _, g, ok in captions]
    _grid(out / "demo_targets.png", panels)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="run folder (holds checkpoint/step-N)")
    parser.add_argument("--recipe", default="demo", help="the recipe the run was trained with (default: demo)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--n", type=int, default=32, help="held-out scenes per direction (default: 32)")
    parser.add_argument("--seed", type=int, default=1, help="procedural seed of the held-out scenes (default: 1)")
    parser.add_argument(
        "--layout", default=DEMO_LAYOUT, choices=SINGLE_OBJECT_LAYOUTS,
        help=f"layout of the held-out scenes, the run's training data's (default: {DEMO_LAYOUT}, the demo's)",
    )
    parser.add_argument("--euler-steps", type=int, default=25)
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    parser.add_argument("--noise-seed", type=int, default=0, help="seed of the generated images' noise")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON and PNG (default: --run)")
    args, overrides = parser.parse_known_args(argv)
    if args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    report = measure(args, overrides)
    acc = report["accuracy"]
    print(
        f"demo targets ({report['checkpoint']}, {args.n} held-out scenes): "
        f"t2i colour {acc['t2i_colour']:.0%} (target 80%), shape {acc['t2i_shape']:.0%} (target 50%); "
        f"captioning {acc['captioning']:.0%} (target 50%)"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as err:
        print(f"demo_targets: {err}", file=sys.stderr)
        sys.exit(2)
