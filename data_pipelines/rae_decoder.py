"""The RAE decoder: a small ViT from a frozen semantic encoder's patch latents back to pixels.

Paper §2.1 "Inference" / App. E.3: SigLIP 2, DINOv2 and WebSSL latents are mapped to pixels with
the decoder of RAE (Zheng et al., 2026), an MAE-style ViT decoder: the encoder's patch tokens
are layer-normalised (RAE's encoders end in a LayerNorm without affine weights: every token
then has zero mean and unit variance, the scale its noise augmentation is measured in),
embedded linearly, given fixed 2-D sin-cos positions and one learned extra token, passed
through pre-norm transformer blocks, projected linearly to p x p x 3 pixel patches and
unpatchified. Pixels are in [-1, 1]. `train_rae_decoder.py` trains it; this module is the
model and its files, a folder that is also the training job's output:

    DIR/decoder.json          format, architecture (`RaeDecoderConfig`), the latent space it
                              was trained for (`LatentSpace`), how it was trained
    DIR/decoder.safetensors   the weights

`load_decoder` refuses a decoder trained for another encoder, latent width or grid, naming the
file and the mismatch.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from unimm.errors import ConfigError

FORMAT = "unimm-rae-decoder/1"
CONFIG_NAME = "decoder.json"
WEIGHTS_NAME = "decoder.safetensors"


@dataclass(frozen=True)
class LatentSpace:
    """What a decoder reads: one encoder's latents, `latent_dim` wide, `tokens_per_frame` a frame."""

    encoder: str
    latent_dim: int
    tokens_per_frame: int

    def describe(self) -> str:
        return f"encoder {self.encoder!r}, latents {self.latent_dim} wide, {self.tokens_per_frame} tokens a frame"


@dataclass(frozen=True)
class RaeDecoderConfig:
    latent_dim: int
    grid: int
    """Tokens per side of the encoder's square patch grid."""

    image_size: int
    """Output side in pixels, a multiple of `grid` (RAE decodes 224-px encoder latents to 256 px)."""

    width: int = 512
    depth: int = 8
    heads: int = 16
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        if min(self.latent_dim, self.grid, self.image_size, self.width, self.depth, self.heads) <= 0:
            raise ConfigError(f"RAE decoder: every size must be positive, got {self}")
        if self.image_size % self.grid:
            raise ConfigError(f"RAE decoder: output size {self.image_size} is not a multiple of the {self.grid}-token grid")
        if self.width % self.heads or (self.width // self.heads) % 2 or self.width % 4:
            raise ConfigError(
                f"RAE decoder: width {self.width} must be a multiple of 4 and of --heads {self.heads} with even head size"
            )

    @property
    def patch(self) -> int:
        return self.image_size // self.grid

    @property
    def tokens_per_frame(self) -> int:
        return self.grid * self.grid


def sincos_positions(grid: int, width: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos table [grid*grid, width], raster order: half the channels encode
    the row, half the column, each as sines and cosines of geometrically spaced frequencies."""
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    axis = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class _Block(nn.Module):
    """Pre-norm ViT block: self-attention over all tokens, then a GELU MLP."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x_BLD: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(self.norm1(x_BLD)), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        attended_BLD = rearrange(F.scaled_dot_product_attention(q, k, v), "b h l d -> b l (h d)")
        x_BLD = x_BLD + self.proj(attended_BLD)
        return x_BLD + self.fc2(F.gelu(self.fc1(self.norm2(x_BLD))))


class RaeDecoder(nn.Module):
    def __init__(self, config: RaeDecoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Linear(c.latent_dim, c.width)
        self.register_buffer("pos_ND", sincos_positions(c.grid, c.width), persistent=False)
        # RAE's decoder keeps MAE's learned class token: one slot of global context every patch
        # attends to; it is dropped before the pixel projection.
        self.extra_token = nn.Parameter(torch.zeros(1, 1, c.width))
        self.blocks = nn.ModuleList(_Block(c.width, c.heads, int(c.width * c.mlp_ratio)) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width)
        self.to_pixels = nn.Linear(c.width, c.patch * c.patch * 3)
        nn.init.normal_(self.extra_token, std=0.02)

    def normalize(self, latents_BNC: torch.Tensor) -> torch.Tensor:
        """Per-token LayerNorm without weights: what the blocks read, and where noise is added."""
        return F.layer_norm(latents_BNC, (self.config.latent_dim,))

    def forward(self, latents_BNC: torch.Tensor, noise_BNC: torch.Tensor | None = None) -> torch.Tensor:
        """Latents [B, grid*grid, latent_dim] -> pixels [B, 3, S, S] in [-1, 1] (not clamped).

        `noise_BNC` (training only, RAE's noise augmentation) is added to the normalised
        latents, so the decoder also maps the slightly-off latents a diffusion model samples."""
        c = self.config
        if latents_BNC.shape[1:] != (c.tokens_per_frame, c.latent_dim):
            raise ValueError(f"RAE decoder reads [B, {c.tokens_per_frame}, {c.latent_dim}], got {list(latents_BNC.shape)}")
        z_BNC = self.normalize(latents_BNC)
        if noise_BNC is not None:
            z_BNC = z_BNC + noise_BNC
        x_BND = self.embed(z_BNC) + self.pos_ND
        x_BLD = torch.cat([self.extra_token.expand(x_BND.shape[0], -1, -1), x_BND], dim=1)
        for block in self.blocks:
            x_BLD = block(x_BLD)
        patches_BNP = self.to_pixels(self.norm(x_BLD)[:, 1:])
        return rearrange(
            patches_BNP, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=c.grid, p1=c.patch, p2=c.patch, c=3
        )


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_decoder(folder: str | Path, decoder: RaeDecoder, space: LatentSpace, training: dict[str, Any]) -> Path:
    """Write DIR/decoder.safetensors then DIR/decoder.json (each atomically); returns DIR."""
    from safetensors.torch import save

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}
    _write_atomic(folder / WEIGHTS_NAME, save(weights))
    info = {"format": FORMAT, "architecture": asdict(decoder.config), "latent_space": asdict(space), "training": training}
    _write_atomic(folder / CONFIG_NAME, (json.dumps(info, indent=1) + "\n").encode())
    return folder


def _folder(path: str | Path) -> Path:
    """The decoder folder; the path of one of its two files also names it."""
    p = Path(path).expanduser()
    return p.parent if p.name in (CONFIG_NAME, WEIGHTS_NAME) else p


def read_decoder_info(path: str | Path) -> dict[str, Any]:
    """decoder.json of a decoder folder (nothing heavy is read); a one-line ConfigError otherwise."""
    folder = _folder(path)
    expected = f"a folder with {CONFIG_NAME} and {WEIGHTS_NAME} (the --out of python -m unimm.data_pipelines.train_rae_decoder)"
    if not folder.is_dir():
        raise ConfigError(f"RAE decoder {path}: {'not a folder' if folder.exists() else 'does not exist'}; expected {expected}")
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
    if missing:
        raise ConfigError(f"RAE decoder {folder}: no {' and no '.join(missing)}; expected {expected}")
    config_path = folder / CONFIG_NAME
    try:
        info = json.loads(config_path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{config_path}: not JSON ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise ConfigError(f"{config_path}: format {found!r}, this code reads {FORMAT!r}")
    for key in ("architecture", "latent_space"):
        if not isinstance(info.get(key), dict):
            raise ConfigError(f"{config_path}: no {key!r} object")
    return info


def check_decoder(path: str | Path, space: LatentSpace | None = None, encoder: str = "") -> dict[str, Any]:
    """Refuse a decoder trained for another latent space (all of `space`, or just the `encoder`
    name when the width is not known yet); returns its decoder.json."""
    info = read_decoder_info(path)
    config_path = _folder(path) / CONFIG_NAME
    try:
        trained = LatentSpace(**info["latent_space"])
    except TypeError as exc:
        raise ConfigError(
            f"{config_path}: latent_space {info['latent_space']} is not {{encoder, latent_dim, tokens_per_frame}} ({exc})"
        ) from None
    if space is not None:
        mismatched = trained != space
        wanted = space.describe()
    else:
        mismatched = bool(encoder) and trained.encoder != encoder
        wanted = f"encoder {encoder!r}"
    if mismatched:
        raise ConfigError(
            f"RAE decoder {config_path} was trained for {trained.describe()}, but it is asked to decode "
            f"{wanted}: train one for this encoder (python -m unimm.data_pipelines.train_rae_decoder)"
        )
    return info


def load_decoder(path: str | Path, space: LatentSpace, device: str = "cpu") -> RaeDecoder:
    """The decoder in folder `path`, in eval mode, checked against the latents it will decode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = check_decoder(path, space)
    folder = _folder(path)
    try:
        config = RaeDecoderConfig(**info["architecture"])
    except TypeError as exc:
        raise ConfigError(f"{folder / CONFIG_NAME}: architecture {info['architecture']} does not fit ({exc})") from None
    if (config.latent_dim, config.tokens_per_frame) != (space.latent_dim, space.tokens_per_frame):
        raise ConfigError(f"{folder / CONFIG_NAME}: architecture {asdict(config)} contradicts its latent_space {asdict(space)}")
    decoder = RaeDecoder(config)
    weights_path = folder / WEIGHTS_NAME
    try:
        weights = load_file(weights_path)
        decoder.load_state_dict(weights)
    except (SafetensorError, OSError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(
            f"{weights_path}: not the weights of the decoder {CONFIG_NAME} describes ({detail[:300]})"
        ) from None
    return decoder.eval().to(device)
