"""RAE-style semantic encoders through `transformers`: SigLIP 2, DINOv2, WebSSL.

Paper §3 / App. E.4: 224 px inputs, patch 14, last-layer features of the 16 x 16 patch grid
(256 tokens; SigLIP 2 So400m 1152 wide, DINOv2-L and WebSSL-L 1024 wide). Leading tokens
that are not patches (DINOv2's CLS and register tokens) are dropped. Weights come from a
local folder in `save_pretrained` layout; nothing is downloaded.

Mapping their latents back to pixels needs the RAE decoder (Zheng et al.; `rae_decoder.py`,
trained by `train_rae_decoder.py`): `DecodingSemanticEncoder` is an encoder given one, and only
it has `decode` (a caller tells whether latents can be shown by looking for that method).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import torch

from unimm.data_pipelines.rae_decoder import LatentSpace, load_decoder
from unimm.errors import ConfigError

# Pixel normalisation when the folder has no preprocessor_config.json.
_DEFAULT_MEAN_STD = {
    "siglip2": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "webssl": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NAMES = tuple(_DEFAULT_MEAN_STD)


def _mean_std(name: str, folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        cfg = json.loads(pre.read_text())
        if "image_mean" in cfg and "image_std" in cfg:
            return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    return _DEFAULT_MEAN_STD[name]


class SemanticEncoder:
    def __init__(self, name: str, path: str, image_size: int, device: str = "cpu") -> None:
        from transformers import AutoModel

        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"encoder {name!r}: no config.json in {folder} (a save_pretrained folder)")
        model = AutoModel.from_pretrained(folder)
        # A full SigLIP checkpoint (text and vision towers) loads as SiglipModel: keep the vision tower.
        self.model = getattr(model, "vision_model", model).eval().to(device)
        config = self.model.config
        self.patch = int(config.patch_size)
        if image_size % self.patch:
            raise ConfigError(f"encoder {name!r}: image_size {image_size} is not a multiple of patch {self.patch}")
        self.name, self.image_size, self.device = name, image_size, device
        self.grid = image_size // self.patch
        self.tokens_per_frame = self.grid * self.grid
        self.latent_dim = int(config.hidden_size)
        mean, std = _mean_std(name, folder)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # SigLIP's learned position table is for one resolution and must be told to
        # interpolate; DINOv2 always interpolates and takes no such argument.
        self._kwargs = (
            {"interpolate_pos_encoding": True}
            if "interpolate_pos_encoding" in inspect.signature(self.model.forward).parameters
            else {}
        )

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, S, S, 3] -> float32 [B, grid*grid, hidden]."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        x = ((x - self._mean) / self._std).to(self.device)
        hidden = self.model(pixel_values=x, **self._kwargs).last_hidden_state
        prefix = hidden.shape[1] - self.tokens_per_frame
        if prefix < 0:
            raise RuntimeError(f"encoder {self.name!r} returned {hidden.shape[1]} tokens for a {self.grid}^2 grid")
        return hidden[:, prefix:].float().cpu().numpy()


class DecodingSemanticEncoder(SemanticEncoder):
    """A semantic encoder with the RAE decoder in folder `decoder`, checked against its latents."""

    def __init__(self, name: str, path: str, image_size: int, device: str = "cpu", *, decoder: str) -> None:
        super().__init__(name, path, image_size, device)
        self.decoder = load_decoder(decoder, LatentSpace(name, self.latent_dim, self.tokens_per_frame), device)

    @torch.no_grad()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        """float [..., grid*grid, hidden] -> uint8 [..., S, S, 3], S the decoder's output size."""
        x = torch.from_numpy(np.asarray(latents, dtype=np.float32))
        if x.ndim < 3 or x.shape[-2:] != (self.tokens_per_frame, self.latent_dim):
            raise ValueError(f"expected [..., {self.tokens_per_frame}, {self.latent_dim}], got {list(x.shape)}")
        pixels = self.decoder(x.reshape(-1, *x.shape[-2:]).to(self.device)).clamp(-1, 1)
        images = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return images.reshape(*x.shape[:-2], *images.shape[1:])
