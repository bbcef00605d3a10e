"""The raw-pixel "encoder": non-overlapping p x p patches, flattened, scaled to [-1, 1].

It is the paper's identity baseline among the visual representations (224 px, 14 x 14 patches),
and offers the interface of every encoder in `encoders.py`: ``image_size``, ``latent_dim``,
``tokens_per_frame``, ``encode`` images to [..., N, C] latents, ``decode`` them back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from einops import rearrange


def patchify(images: np.ndarray, patch: int) -> np.ndarray:
    """uint8 [..., H, W, 3] -> float32 [..., (H/p)*(W/p), p*p*3] in [-1, 1], patches in raster order."""
    patches = rearrange(images, "... (h p1) (w p2) c -> ... (h w) (p1 p2 c)", p1=patch, p2=patch)
    return patches.astype(np.float32) / 127.5 - 1.0


def unpatchify(latents: np.ndarray, patch: int, image_size: int) -> np.ndarray:
    """Inverse of `patchify` for square images; generated values outside [-1, 1] are clipped."""
    pixels = np.rint((np.clip(latents.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return rearrange(
        pixels, "... (h w) (p1 p2 c) -> ... (h p1) (w p2) c", h=image_size // patch, p1=patch, p2=patch
    )


@dataclass(frozen=True)
class RawPixels:
    image_size: int = 32
    patch: int = 8

    def __post_init__(self) -> None:
        if self.patch <= 0 or self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch {self.patch}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def tokens_per_frame(self) -> int:
        return self.grid * self.grid

    @property
    def latent_dim(self) -> int:
        return self.patch * self.patch * 3

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [..., H, W, 3] -> float32 [..., N, p*p*3]."""
        if images.dtype != np.uint8 or images.shape[-3:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"expected uint8 [..., {self.image_size}, {self.image_size}, 3], "
                f"got {images.dtype} {list(images.shape)}"
            )
        return patchify(images, self.patch)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """float [..., N, p*p*3] -> uint8 [..., H, W, 3]."""
        if latents.shape[-2:] != (self.tokens_per_frame, self.latent_dim):
            raise ValueError(
                f"expected [..., {self.tokens_per_frame}, {self.latent_dim}], got {list(latents.shape)}"
            )
        return unpatchify(latents, self.patch, self.image_size)
