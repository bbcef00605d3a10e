"""``unimm sample``: look at what a run has learnt, in both directions.

Generates one image per ``--prompt`` (text -> image, 25-step Euler with guidance) and
captions the first images of the run's own image-to-text shards (image -> text), then writes
``samples.png`` (a person's view) and ``samples.json`` beside it. The sources to caption are
chosen by what the manifest says about them (`captioning_sources`), whatever their names.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unimm.errors import ConfigError

DEFAULT_PROMPTS = ("a red circle", "a blue square", "a yellow triangle and a green diamond", "a purple star")

DESCRIPTION = """\
Generate one image per --prompt (text to image) and caption images from the run's own
image-to-text shards (image to text) with the run's latest (or --step) checkpoint; writes
samples.png and samples.json to RUN/samples (or --out).

Images to caption come from every source whose manifest entry has kind image_text and the
i2t direction (captioning, understanding), whatever the source is called; when there is
none, from the image_text sources trained only for t2i.

Further --section.key VALUE options are the run's torchtitan config overrides (give the
same ones as to unimm train, e.g. --dataloader.shards DIR)."""


def captioning_sources(info: dict[str, Any]) -> list[str]:
    """The sources of a manifest (`manifest.json` as a dict) to caption images from.

    Chosen by `source_info` (written by every data job: kind, directions), not by name:
    image_text sources trained image -> text (direction i2t; no directions recorded means
    both, as the loader reads it), in manifest order; if there is none, the image_text
    sources trained only text -> image (their texts describe their images too)."""
    source_info = info.get("source_info") or {}
    pairs = [name for name in info.get("sources", {}) if (source_info.get(name) or {}).get("kind") == "image_text"]
    understanding = [n for n in pairs if "i2t" in (source_info[n].get("directions") or ["i2t", "t2i"])]
    return understanding or pairs


def _round_robin(streams: Iterable[Iterator]) -> Iterator:
    """One item of each stream in turn, so a few captions still cover every source."""
    active = list(streams)
    while active:
        for stream in list(active):
            try:
                yield next(stream)
            except StopIteration:
                active.remove(stream)


def latest_checkpoint(run: Path, step: int | None) -> Path:
    folder = run / "checkpoint"
    steps = sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*") if (p / ".metadata").is_file())
    if not steps:
        raise ConfigError(f"{folder}: no complete checkpoint (step-N with .metadata)")
    if step is not None and step not in steps:
        raise ConfigError(f"{folder}: no checkpoint step-{step}; there are steps {steps}")
    return folder / f"step-{step if step is not None else steps[-1]}"


def _load_sampler(args: argparse.Namespace):
    from unimm.convert.dcp_io import DcpCheckpoint
    from unimm.data.shards import SampleSpec, read_samples
    from unimm.data_pipelines.encoders import EncoderSpec, load_encoder
    from unimm.sampling import MixedModalSampler, SamplingConfig
    from unimm.titan.launch import load_recipe, preflight

    config = load_recipe(args.recipe, args.config_overrides)
    manifest = preflight(config)
    model_config = config.model_spec.model
    model = model_config.build()
    model.load_state_dict(DcpCheckpoint(latest_checkpoint(Path(args.run), args.step)).load())
    tokenizer = config.tokenizer.build()
    sampler = MixedModalSampler(
        model,
        tokenizer,
        config.loss.flow,
        config.loss.flow.shift_factor(manifest.tokens_per_frame, model_config.latent_dim),
        manifest.tokens_per_frame,
        SamplingConfig(euler_steps=args.euler_steps, cfg_scale=args.cfg_scale),
        generator=torch.Generator().manual_seed(args.seed),
    )
    encoder = load_encoder(EncoderSpec(**manifest.info["encoder"])) if manifest.info.get("encoder") else None
    understanding = None
    if getattr(model_config, "understanding_dim", 0):  # dual encoder: captions read the understanding latents
        u = manifest.understanding
        understanding = SampleSpec(u.tokens_per_frame, u.latent_dim, tokenizer.get_vocab_size(), u.normalizer)
    spec = SampleSpec(
        manifest.tokens_per_frame, manifest.latent_dim, tokenizer.get_vocab_size(), manifest.normalizer,
        understanding=understanding,
    )
    streams = [
        ((name, s) for s in read_samples(manifest.sources[name], spec)) for name in captioning_sources(manifest.info)
    ]
    # (source, the text the sample trains after its image (its stored ids), its frame's latents
    # (shown), the latents the model reads to caption it (a dual encoder's understanding latents))
    images = [
        (name, tokenizer.decode(s["tokens"].tolist()), s["latents"][0], s.get("understanding_latents", s["latents"])[0])
        for name, s in islice(_round_robin(streams), args.caption_images)
    ]
    return sampler, encoder, manifest.normalizer, images


def _clipped(text: str) -> str:
    """A plot title's share of a long text, in two lines at most (samples.json keeps it whole)."""
    return textwrap.fill(textwrap.shorten(text, 64, placeholder=" ...") or text[:60], 34)


def _to_pixels(latents: np.ndarray, encoder, normalizer) -> np.ndarray | None:
    if normalizer is not None:
        latents = normalizer.denormalize(latents)
    decode = getattr(encoder, "decode", None)  # semantic encoders have no decoder here
    return None if decode is None else decode(latents[None])[0]


def _sample(args: argparse.Namespace) -> int:
    if args.caption_images < 0 or args.euler_steps < 1:
        raise ConfigError(
            f"--caption-images must be >= 0 and --euler-steps >= 1, got {args.caption_images} and {args.euler_steps}"
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sampler, encoder, normalizer, shard_images = _load_sampler(args)
    out = Path(args.out or Path(args.run) / "samples")
    out.mkdir(parents=True, exist_ok=True)
    generated = [(p, sampler.text_to_image(p).numpy()) for p in args.prompt or DEFAULT_PROMPTS]
    captioned = [
        (source, truth, sampler.image_to_text(torch.from_numpy(read)), latents)
        for source, truth, latents, read in shard_images
    ]
    for i, (_, latents) in enumerate(generated):
        np.save(out / f"generated_{i}.npy", latents)
    report = {
        "text_to_image": [{"prompt": p, "latents": f"generated_{i}.npy"} for i, (p, _) in enumerate(generated)],
        "image_to_text": [
            {"source": source, "truth": truth, "generated": text} for source, truth, text, _ in captioned
        ],
    }
    (out / "samples.json").write_text(json.dumps(report, indent=2))

    columns = max(len(generated), len(captioned), 1)
    fig, axes = plt.subplots(2, columns, figsize=(2.6 * columns, 6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (prompt, latents) in zip(axes[0], generated):
        pixels = _to_pixels(latents, encoder, normalizer)
        if pixels is not None:
            ax.imshow(pixels, interpolation="nearest")
        ax.set_title(f"generated:\n{prompt}", fontsize=8)
    for ax, (source, truth, text, latents) in zip(axes[1], captioned):
        pixels = _to_pixels(latents, encoder, normalizer)
        if pixels is not None:
            ax.imshow(pixels, interpolation="nearest")
        ax.set_title(f"{source}\ntruth: {_clipped(truth)}\nmodel: {_clipped(text)}", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=100)
    plt.close(fig)
    print(f"unimm: samples in {out / 'samples.png'} and {out / 'samples.json'}")
    return 0


def register(verbs: argparse._SubParsersAction) -> None:
    sample = verbs.add_parser(
        "sample",
        help="generate images from captions and captions from images with a trained run",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sample.add_argument("--run", required=True, metavar="DIR", help="run folder (holds checkpoint/step-N)")
    sample.add_argument("--recipe", required=True, metavar="NAME", help="the recipe the run was trained with")
    sample.add_argument("--step", type=int, default=None, metavar="N", help="checkpoint step (default: the latest)")
    sample.add_argument(
        "--prompt", action="append", metavar="TEXT",
        help=f"caption to generate an image for; repeat for several (default: {len(DEFAULT_PROMPTS)} built-in shape captions)",
    )
    sample.add_argument(
        "--caption-images", type=int, default=4, metavar="N",
        help="images from the run's image-to-text shards to caption (default: 4; 0: none)",
    )
    sample.add_argument(
        "--euler-steps", type=int, default=25, metavar="N",
        help="Euler steps of the flow sampler per generated image (default: 25)",
    )
    sample.add_argument(
        "--cfg-scale", type=float, default=3.0, metavar="W",
        help="classifier-free guidance weight; 1.0 turns guidance off (default: 3.0)",
    )
    sample.add_argument("--seed", type=int, default=0, help="seed of the generated images' noise; captions are greedy (default: 0)")
    sample.add_argument("--out", default=None, metavar="DIR", help="folder for samples.png and samples.json (default: RUN/samples)")
    sample.set_defaults(func=_sample, takes_overrides=True)
