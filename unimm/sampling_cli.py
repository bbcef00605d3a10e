"""``unimm sample``: look at what a run has learnt, in both directions.

Generates one image per ``--prompt`` (text -> image, 25-step Euler with guidance) and
captions the first images of the run's own image-text shards (image -> text), then writes
``samples.png`` (a person's view) and ``samples.json`` beside it.
"""

from __future__ import annotations

import argparse
import json
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from unimm.errors import ConfigError

DEFAULT_PROMPTS = ("a red circle", "a blue square", "a yellow triangle and a green diamond", "a purple star")


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
    encoder = load_encoder(EncoderSpec(**manifest.info["encoder"]))
    spec = SampleSpec(manifest.tokens_per_frame, manifest.latent_dim, tokenizer.get_vocab_size(), manifest.normalizer)
    images = list(islice(read_samples(manifest.sources.get("image_text", []), spec), args.caption_images))
    return sampler, encoder, manifest.normalizer, images


def _to_pixels(latents: np.ndarray, encoder, normalizer) -> np.ndarray | None:
    if normalizer is not None:
        latents = normalizer.denormalize(latents)
    decode = getattr(encoder, "decode", None)  # semantic encoders have no decoder here
    return None if decode is None else decode(latents[None])[0]


def _sample(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sampler, encoder, normalizer, shard_images = _load_sampler(args)
    out = Path(args.out or Path(args.run) / "samples")
    out.mkdir(parents=True, exist_ok=True)
    generated = [(p, sampler.text_to_image(p).numpy()) for p in args.prompt or DEFAULT_PROMPTS]
    captioned = [
        (s["caption"], sampler.image_to_text(torch.from_numpy(s["latents"][0])), s["latents"][0]) for s in shard_images
    ]
    for i, (_, latents) in enumerate(generated):
        np.save(out / f"generated_{i}.npy", latents)
    report = {
        "text_to_image": [{"prompt": p, "latents": f"generated_{i}.npy"} for i, (p, _) in enumerate(generated)],
        "image_to_text": [{"truth": truth, "generated": text} for truth, text, _ in captioned],
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
    for ax, (truth, text, latents) in zip(axes[1], captioned):
        pixels = _to_pixels(latents, encoder, normalizer)
        if pixels is not None:
            ax.imshow(pixels, interpolation="nearest")
        ax.set_title(f"truth: {truth}\nmodel: {text}", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=100)
    plt.close(fig)
    print(f"unimm: samples in {out / 'samples.png'} and {out / 'samples.json'}")
    return 0


def register(verbs: argparse._SubParsersAction) -> None:
    sample = verbs.add_parser(
        "sample",
        help="generate images from captions and captions from images with a trained run",
        description="Further --section.key VALUE options are the run's torchtitan config overrides.",
    )
    sample.add_argument("--run", required=True, help="run folder (holds checkpoint/step-N)")
    sample.add_argument("--recipe", required=True, help="the recipe the run was trained with")
    sample.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    sample.add_argument("--prompt", action="append", help="caption to generate an image for (repeatable)")
    sample.add_argument("--caption-images", type=int, default=4, help="shard images to caption")
    sample.add_argument("--euler-steps", type=int, default=25)
    sample.add_argument("--cfg-scale", type=float, default=3.0)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", default=None, help="default: RUN/samples")
    sample.set_defaults(func=_sample, takes_overrides=True)
