"""Frozen visual encoders, selected by name and a local weights folder.

| name       | family                  | default input | tokens            | width (paper's weights) |
| ---------- | ----------------------- | ------------- | ----------------- | ----------------------- |
| raw_pixels | p x p patches           | 224, p = 14   | 16 x 16           | 588                     |
| siglip2    | transformers, semantic  | 224           | 16 x 16           | 1152 (So400m)           |
| dinov2     | transformers, semantic  | 224           | 16 x 16           | 1024 (ViT-L)            |
| webssl     | transformers, semantic  | 224           | 16 x 16           | 1024 (ViT-L)            |
| sd_vae     | diffusers AutoencoderKL | 256           | 32 x 32 -> 16 x 16 | 16                     |
| flux_vae   | diffusers AutoencoderKL | 256           | 32 x 32 -> 16 x 16 | 64                     |

Every encoder takes uint8 [B, S, S, 3] images at its `image_size` and returns float32
[B, tokens_per_frame, latent_dim]; raw pixels and VAEs also `decode`, and so do the semantic
encoders given an RAE decoder (``decoder``/``--decoder``: the folder `train_rae_decoder.py`
writes; one trained for another encoder or width is refused). `EncoderSpec` is what a job
records in its manifest and what worker processes and `unimm sample` rebuild the encoder from.

A dual-encoder image-text job (paper §6.3's baseline) takes a second spec, the understanding
encoder (``--understanding-encoder``, ``add_understanding_encoder_arguments``): SigLIP 2 at 224 px
and SD-VAE folded at 256 px both give 256 tokens, but the two may differ in tokens per frame
too (each frame is laid out with the tokens of the encoder it is fed with).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from unimm.data_pipelines import rae_decoder, semantic, vae
from unimm.data_pipelines.raw_pixels import RawPixels
from unimm.errors import ConfigError
from unimm.tokenizer import Tokenizer

NAMES = ("raw_pixels", *semantic.NAMES, *vae.NAMES)
_DEFAULT_IMAGE_SIZE = {"raw_pixels": 224, **{n: 224 for n in semantic.NAMES}, **{n: 256 for n in vae.NAMES}}


class Encoder(Protocol):
    image_size: int
    tokens_per_frame: int
    latent_dim: int

    def encode(self, images: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class EncoderSpec:
    name: str = "raw_pixels"
    path: str = ""
    """Local weights folder (save_pretrained layout); unused by raw_pixels."""

    image_size: int = 0
    """Input resolution; 0: the paper's (224, VAEs 256)."""

    patch: int = 14
    """raw_pixels only: patch side."""

    decoder: str | None = None
    """Semantic encoders only: folder of an RAE decoder for their latents (train_rae_decoder.py)."""

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ConfigError(f"unknown encoder {self.name!r}; known: {', '.join(NAMES)}")
        if self.name != "raw_pixels" and not self.path:
            raise ConfigError(f"encoder {self.name!r} needs the path of its local weights (--encoder-path)")
        if self.decoder and self.name not in semantic.NAMES:
            raise ConfigError(
                f"--decoder {self.decoder}: an RAE decoder is for the semantic encoders ({', '.join(semantic.NAMES)}); "
                f"{self.name!r} decodes its latents itself"
            )

    @property
    def resolved_image_size(self) -> int:
        return self.image_size or _DEFAULT_IMAGE_SIZE[self.name]

    def describe(self) -> dict:
        description = {**asdict(self), "image_size": self.resolved_image_size}
        if not self.decoder:  # absent, not null: descriptions written before decoders stay equal
            del description["decoder"]
        return description

    def latent_identity(self) -> dict:
        """What determines the latents: `describe()` without the decoder, which only reads them.

        Jobs and mixtures compare this, so adding a decoder to a finished folder's job, or
        mixing folders of which one names a decoder, is not a different encoder."""
        return without_decoder(self.describe())

    def check_weights(self) -> None:
        """Raise a one-line ConfigError unless `path` looks like this encoder's weights folder.

        A cheap look at the file names (nothing is loaded), so a job can refuse a wrong
        --encoder-path before it writes anything."""
        if self.decoder:
            rae_decoder.check_decoder(self.decoder, encoder=self.name)
        if self.name == "raw_pixels":
            return
        library, weights = _WEIGHT_FILES["diffusers" if self.name in vae.NAMES else "transformers"]
        expected = (
            f"a {library} save_pretrained folder: config.json and {weights[0]} "
            f"(or {weights[2]}, or a sharded *.index.json)"
        )
        folder = Path(self.path).expanduser()
        where = f"encoder {self.name!r}: --encoder-path {self.path}"
        if not folder.exists():
            raise ConfigError(f"{where} does not exist; expected {expected}")
        if not folder.is_dir():
            raise ConfigError(f"{where} is a file, not a folder; expected {expected}")
        missing = [] if (folder / "config.json").is_file() else ["config.json"]
        if not any((folder / w).is_file() for w in weights):
            missing.append("weights file")
        if missing:
            present = sorted(p.name for p in folder.iterdir())
            found = ", ".join(present[:6]) + (", ..." if len(present) > 6 else "") if present else "nothing"
            hint = ""
            if (folder / "vae" / "config.json").is_file():
                hint = f" (a diffusers pipeline? its VAE is {folder / 'vae'})"
            raise ConfigError(f"{where} has no {' and no '.join(missing)} (found: {found}); expected {expected}{hint}")


# Weight files from_pretrained reads without a `variant`: (library, names), one-file or sharded.
_WEIGHT_FILES = {
    "transformers": (
        "transformers",
        ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    ),
    "diffusers": (
        "diffusers",
        (
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.safetensors.index.json",
            "diffusion_pytorch_model.bin",
            "diffusion_pytorch_model.bin.index.json",
        ),
    ),
}


def without_decoder(description: dict) -> dict:
    """An encoder description (`EncoderSpec.describe`, as manifests store it) minus its decoder."""
    return {k: v for k, v in description.items() if k != "decoder"}


def load_encoder(spec: EncoderSpec, device: str = "cpu") -> Encoder:
    """The encoder `spec` names; a folder that is not its weights is a one-line ConfigError."""
    size = spec.resolved_image_size
    if spec.name == "raw_pixels":
        return RawPixels(size, spec.patch)
    spec.check_weights()
    try:
        if spec.name in semantic.NAMES and spec.decoder:
            return semantic.DecodingSemanticEncoder(spec.name, spec.path, size, device, decoder=spec.decoder)
        if spec.name in semantic.NAMES:
            return semantic.SemanticEncoder(spec.name, spec.path, size, device)
        return vae.VaeEncoder(spec.name, spec.path, size, device)
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        # transformers / diffusers explain a bad folder in several lines: keep the gist on one.
        library = "diffusers AutoencoderKL" if spec.name in vae.NAMES else "transformers AutoModel"
        detail = " ".join(str(exc).split())
        detail = detail if len(detail) <= 300 else detail[:297] + "..."
        raise ConfigError(
            f"encoder {spec.name!r}: {library} cannot load --encoder-path {spec.path} "
            f"({type(exc).__name__}: {detail})"
        ) from exc


def add_encoder_arguments(parser) -> None:
    """The --encoder options every job that encodes images shares."""
    parser.add_argument("--encoder", default="raw_pixels", choices=NAMES)
    parser.add_argument("--encoder-path", default="", help="local weights folder (save_pretrained layout)")
    parser.add_argument("--image-size", type=int, default=0, help="0: the encoder's default (224; VAEs 256)")
    parser.add_argument("--patch", type=int, default=14, help="raw_pixels patch side")
    parser.add_argument("--device", default="cpu", help="encoder device (cuda, cuda:1, ...)")
    parser.add_argument("--batch-size", type=int, default=32, help="frames per encoder call")
    parser.add_argument(
        "--decoder", default=None, metavar="DIR",
        help="semantic encoders: RAE decoder folder (train_rae_decoder.py --out); recorded in the manifest, "
        "so samples of the run decode to pixels",
    )


def add_understanding_encoder_arguments(parser) -> None:
    """The second encoder of a dual-encoder source (paper §6.3, as in Janus and Bagel): image-text
    jobs write its latents beside the --encoder's, for the images the model reads to understand
    (I->T) while the --encoder's latents stay those it generates (T->I)."""
    parser.add_argument(
        "--understanding-encoder", default="", choices=("", *NAMES),
        help="also write this encoder's latents (dual encoder: e.g. siglip2 beside --encoder sd_vae); empty: one encoder",
    )
    parser.add_argument("--understanding-encoder-path", default="", help="its local weights folder")
    parser.add_argument("--understanding-image-size", type=int, default=0, help="its input size; 0: its default")
    parser.add_argument("--understanding-patch", type=int, default=14, help="raw_pixels understanding encoder: patch side")


def understanding_spec(args) -> EncoderSpec | None:
    """The understanding encoder of ``add_understanding_encoder_arguments``; None without one."""
    if not args.understanding_encoder:
        if args.understanding_encoder_path:
            raise ConfigError("--understanding-encoder-path needs --understanding-encoder NAME")
        return None
    if args.understanding_encoder != "raw_pixels" and not args.understanding_encoder_path:
        raise ConfigError(
            f"understanding encoder {args.understanding_encoder!r} needs the path of its local weights "
            "(--understanding-encoder-path)"
        )
    return EncoderSpec(
        args.understanding_encoder, args.understanding_encoder_path, args.understanding_image_size, args.understanding_patch
    )


def encoding_options(args) -> dict:
    """The keyword arguments every encoding job takes from its command line (encoder, tokenizer,
    processes, device, encoder batch), from ``add_job_arguments`` + ``add_encoder_arguments``."""
    return dict(
        encoder=EncoderSpec(args.encoder, args.encoder_path, args.image_size, args.patch, args.decoder),
        tokenizer=Tokenizer.Config(path=args.tokenizer),
        workers=args.workers,
        device=args.device,
        batch_size=args.batch_size,
    )
