"""VAE encoders through `diffusers`: SD-VAE and the FLUX.1 VAE.

Paper App. E.4: 256 px inputs give a 32 x 32 latent grid (downsampling 8); PixelUnshuffle(2)
folds it into 16 x 16 tokens of 4x the channels (SD-VAE 4 -> 16, FLUX.1 16 -> 64), so every
encoder gives the model 256 tokens. `decode` applies the inverse PixelShuffle(2) and the VAE
decoder. Latents are the posterior mean (deterministic, so a re-run writes the same shards)
without the VAE's own scale/shift: the per-channel statistics in the manifest normalise them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from einops import rearrange

from unimm.errors import ConfigError

NAMES = ("sd_vae", "flux_vae")
FOLD = 2  # PixelUnshuffle factor


class VaeEncoder:
    def __init__(self, name: str, path: str, image_size: int, device: str = "cpu") -> None:
        from diffusers import AutoencoderKL

        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"encoder {name!r}: no config.json in {folder} (a save_pretrained folder)")
        self.vae = AutoencoderKL.from_pretrained(folder).eval().to(device)
        down = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if image_size % (down * FOLD):
            raise ConfigError(f"encoder {name!r}: image_size {image_size} is not a multiple of {down * FOLD}")
        self.name, self.image_size, self.device = name, image_size, device
        self.grid = image_size // down // FOLD
        self.tokens_per_frame = self.grid * self.grid
        self.channels = int(self.vae.config.latent_channels)
        self.latent_dim = self.channels * FOLD * FOLD

    def fold(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents [B, c, 2g, 2g] -> tokens [B, g*g, 4c] (PixelUnshuffle(2), raster order)."""
        return rearrange(torch.nn.functional.pixel_unshuffle(z, FOLD), "b c h w -> b (h w) c")

    def unfold(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inverse of `fold` (PixelShuffle(2)): what the decoder and the paper's loss see."""
        return torch.nn.functional.pixel_shuffle(rearrange(tokens, "b (h w) c -> b c h w", h=self.grid), FOLD)

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, S, S, 3] -> float32 [B, grid*grid, 4*latent_channels]."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        z = self.vae.encode(x.to(self.device)).latent_dist.mean
        return self.fold(z).float().cpu().numpy()

    @torch.no_grad()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        """float [B, grid*grid, 4*latent_channels] -> uint8 [B, S, S, 3]."""
        z = self.unfold(torch.from_numpy(np.asarray(latents, np.float32))).to(self.device)
        pixels = self.vae.decode(z).sample.clamp(-1, 1)
        return ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
