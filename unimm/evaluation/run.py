"""A trained run, ready to evaluate: its config, data manifest, checkpoint weights and encoders.

``unimm eval --run DIR`` needs no ``--recipe``: ``DIR/run.json`` records the recipe and the
command line of the run's last launch (``unimm train ... --section.key VALUE``), and the same
options rebuild the same model and the same procedural data settings (image size, patch, latent
statistics). ``--section.key VALUE`` options given to ``unimm eval`` come after the run's own
and win; with ``--recipe`` the run's options are not read (as ``unimm sample`` takes them).

Images enter the model exactly as in training: encoded by the manifest's encoder and
normalised with the *training* manifest's per-channel statistics (a held-out split must not
bring its own); generated latents leave it through the inverse (denormalise, decode).
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unimm.errors import ConfigError

STEP_DIR = re.compile(r"step-(\d+)")


def checkpoint_steps(run: Path) -> list[int]:
    """Complete DCP checkpoints of a run folder (``checkpoint/step-N`` with ``.metadata``)."""
    folder = run / "checkpoint"
    if not folder.is_dir():
        return []
    return sorted(
        int(m.group(1)) for p in folder.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and (p / ".metadata").is_file()
    )


def resolve_checkpoint(run: Path, ckpt: str | None) -> tuple[int, Path]:
    """(step, folder) of ``--ckpt step-N`` (or N), default the latest; ConfigError naming what is there."""
    if not run.is_dir():
        raise ConfigError(f"--run {run}: no such run folder")
    steps = checkpoint_steps(run)
    if not steps:
        raise ConfigError(f"--run {run}: no complete checkpoint in {run / 'checkpoint'} (step-N with .metadata)")
    if ckpt is None:
        step = steps[-1]
    else:
        match = STEP_DIR.fullmatch(ckpt) or re.fullmatch(r"(\d+)", ckpt)
        if not match:
            raise ConfigError(f"--ckpt {ckpt!r}: expected step-N or N")
        step = int(match.group(1))
        if step not in steps:
            raise ConfigError(f"--ckpt {ckpt}: {run / 'checkpoint'} has no complete step-{step}; it has steps {steps}")
    return step, run / "checkpoint" / f"step-{step}"


def launch_options(run: Path) -> tuple[str, list[str]]:
    """The recipe and ``--section.key VALUE`` options of the run's last launch (``run.json``)."""
    from unimm.titan.config_checks import lr_overrides
    from unimm.titan.run_record import read_record, record_path

    record = read_record(run)
    launches = (record or {}).get("launches") or []
    if not launches:
        raise ConfigError(f"{record_path(run)}: missing or without launches; pass --recipe NAME and the run's options")
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--recipe")
    parser.add_argument("--out")
    parser.add_argument("--steps")
    parser.add_argument("--nproc")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--allow-config-change", action="store_true")
    argv = list(launches[-1].get("argv", []))[1:]  # the program, then (unimm's) the verb
    argv = argv[1:] if argv[:1] == ["train"] else argv
    known, extra = parser.parse_known_args(argv)
    recipe = known.recipe or (record.get("settings") or {}).get("recipe")
    if not recipe:
        raise ConfigError(f"{record_path(run)}: no recipe recorded; pass --recipe NAME")
    if known.lr is not None:
        extra += lr_overrides(known.lr)
    # run.json keeps the data and tokenizer paths absolute (the launch may have been elsewhere)
    settings = record.get("settings") or {}
    for key in ("dataloader.shards", "tokenizer.path"):
        if settings.get(key):
            extra += [f"--{key}", settings[key]]
    return recipe, extra


@dataclass
class EvalRun:
    """Everything the suites share: built once per ``unimm eval``."""

    run: Path
    step: int
    checkpoint: Path
    recipe: str
    config: Any  # the torchtitan Trainer.Config
    manifest: Any  # unimm.data.shards.Manifest of the training data
    model: torch.nn.Module
    tokenizer: Any
    encoder: Any  # generation encoder (encode, maybe decode)
    normalizer: Any  # LatentNormalizer or None
    understanding_encoder: Any = None  # dual encoder: the encoder of understanding images
    understanding_normalizer: Any = None

    @property
    def model_config(self):
        return self.config.model_spec.model

    @property
    def image_size(self) -> int:
        return int(self.encoder.image_size)

    @property
    def understanding_image_size(self) -> int:
        return int((self.understanding_encoder or self.encoder).image_size)

    @property
    def dual_encoder(self) -> bool:
        return self.understanding_encoder is not None

    @property
    def tokens_per_frame(self) -> int:
        return int(self.manifest.tokens_per_frame)

    @property
    def reading_tokens_per_frame(self) -> int:
        """Positions of a frame the model reads (a dual encoder's understanding encoder's)."""
        if self.understanding_encoder is None:
            return self.tokens_per_frame
        return int(self.manifest.understanding.tokens_per_frame)

    @property
    def flow(self):
        return self.config.loss.flow

    @property
    def shift(self) -> float:
        return self.flow.shift_factor(self.tokens_per_frame, self.model_config.latent_dim)

    @property
    def can_decode(self) -> bool:
        return callable(getattr(self.encoder, "decode", None))

    def latents(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, S, S, 3] -> the model's (normalised) generation latents [B, N, C]."""
        return encode_images(self.encoder, self.normalizer, images)

    def reading_latents(self, images: np.ndarray) -> np.ndarray:
        """Latents of images the model reads to understand: the understanding encoder's for a
        dual encoder, else the generation latents."""
        if self.understanding_encoder is None:
            return self.latents(images)
        return encode_images(self.understanding_encoder, self.understanding_normalizer, images)

    def pixels(self, latents: np.ndarray) -> np.ndarray:
        """Generated latents [N, C] -> uint8 [S, S, 3] (needs an encoder with a decoder)."""
        if self.normalizer is not None:
            latents = self.normalizer.denormalize(latents)
        return self.encoder.decode(np.asarray(latents)[None])[0]

    def sampler(self, seed: int = 0, euler_steps: int = 25, cfg_scale: float = 3.0, max_new_tokens: int = 128):
        from unimm.sampling import MixedModalSampler, SamplingConfig

        return MixedModalSampler(
            self.model,
            self.tokenizer,
            self.flow,
            self.shift,
            self.tokens_per_frame,
            SamplingConfig(euler_steps=euler_steps, cfg_scale=cfg_scale, max_new_tokens=max_new_tokens),
            generator=torch.Generator().manual_seed(seed),
        )


def generation_encoding(config, manifest) -> tuple[Any, Any]:
    """(encoder, normaliser or None) turning images into the latents a run's model generates:
    the training manifest's encoder and, unless ``normalize_latents`` is off, its statistics."""
    from unimm.data_pipelines.encoders import EncoderSpec, load_encoder

    encoder_info = manifest.info.get("encoder")
    if not manifest.latent_dim or not encoder_info:
        raise ConfigError(f"{manifest.path}: records no image encoder; the visual evaluations need the run's image data")
    normalizer = manifest.normalizer if config.dataloader.normalize_latents else None
    return load_encoder(EncoderSpec(**encoder_info)), normalizer


def encode_images(encoder, normalizer, images: np.ndarray) -> np.ndarray:
    """uint8 [B, S, S, 3] -> latents [B, N, C] as the model reads them (normalised)."""
    z = encoder.encode(images)
    return z if normalizer is None else normalizer.normalize(z).astype(np.float32)


def load_model(model_config, checkpoint: Path) -> torch.nn.Module:
    """The model's weights from a DCP checkpoint, in this process, on CPU, in eval mode."""
    from unimm.convert.dcp_io import DcpCheckpoint

    model = model_config.build()
    weights = DcpCheckpoint(checkpoint).load()
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if expected[k].shape != weights[k].shape)
    problems = (
        ("lacks {n} of the model's tensors", missing),
        ("has {n} tensors the model does not", unexpected),
        ("has {n} tensors of another shape than the model's", wrong),
    )
    for problem, names in problems:
        if names:
            raise ConfigError(
                f"{checkpoint}: the checkpoint {problem.format(n=len(names))} (e.g. {names[0]}); is it this "
                "recipe's, with the run's --section.key options?"
            )
    model.load_state_dict(weights)
    return model.eval()


def open_run(run: str | Path, ckpt: str | None = None, recipe: str | None = None, overrides: list[str] | None = None) -> EvalRun:
    from unimm.data_pipelines.encoders import EncoderSpec, load_encoder
    from unimm.titan.launch import load_recipe, preflight

    run = Path(run)
    step, checkpoint = resolve_checkpoint(run, ckpt)
    if recipe is None:
        recipe, options = launch_options(run)
    else:
        options = []
    config = load_recipe(recipe, options + list(overrides or []))
    manifest = preflight(config)
    encoder, normalizer = generation_encoding(config, manifest)
    model = load_model(config.model_spec.model, checkpoint)
    understanding_encoder = understanding_normalizer = None
    if getattr(config.model_spec.model, "understanding_dim", 0) and manifest.understanding is not None:
        understanding_encoder = load_encoder(EncoderSpec(**manifest.understanding.encoder))
        if config.dataloader.normalize_latents:
            understanding_normalizer = manifest.understanding.normalizer
    return EvalRun(
        run=run,
        step=step,
        checkpoint=checkpoint,
        recipe=recipe,
        config=config,
        manifest=manifest,
        model=model,
        tokenizer=config.tokenizer.build(),
        encoder=encoder,
        normalizer=normalizer,
        understanding_encoder=understanding_encoder,
        understanding_normalizer=understanding_normalizer,
    )
