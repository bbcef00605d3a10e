"""How far a predicted frame is from the goal frame: the planner's cost (paper App. F.1).

The paper scores with LPIPS between the decoded final frame and the goal image. LPIPS needs
pixels (a decoder for the run's latents), the ``lpips`` package and its AlexNet backbone
weights on this machine (nothing is downloaded), so it is used only when all three are there;
otherwise the distance is measured in the latent space the model predicts in. Every distance
carries a ``name`` that reports print.

- ``latent``: mean squared difference over tokens and channels of the (normalised) latents.
- ``pixel``: mean squared difference of the decoded images, in [0, 1] per channel.
- ``lpips``: LPIPS (AlexNet, v0.1) of the decoded images, upsampled to at least 64 px (the
  network's first layers stride 4 and pool twice).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from unimm.errors import ConfigError

DISTANCES = ("auto", "latent", "pixel", "lpips")
# torchvision's file name for the ImageNet AlexNet LPIPS builds on, in torch.hub's cache
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
LPIPS_MIN_SIZE = 64

Decoder = Callable[[np.ndarray], np.ndarray]  # latents [B, N, C] (as the model reads them) -> uint8 [B, S, S, 3]


class Distance(Protocol):
    name: str

    def __call__(self, pred_BNC: torch.Tensor, goal_NC: torch.Tensor) -> torch.Tensor:
        """[B] distances of each predicted frame to the goal, lower is closer."""
        ...


class LatentDistance:
    name = "latent_mse"

    def __call__(self, pred_BNC: torch.Tensor, goal_NC: torch.Tensor) -> torch.Tensor:
        return (pred_BNC.float() - goal_NC.float()).pow(2).mean(dim=(1, 2))


def _images(decode: Decoder, pred_BNC: torch.Tensor, goal_NC: torch.Tensor) -> torch.Tensor:
    """[B + 1, 3, S, S] in [0, 1]: the decoded predictions, then the goal."""
    latents = torch.cat([pred_BNC, goal_NC[None]]).float().cpu().numpy()
    return torch.from_numpy(decode(latents)).permute(0, 3, 1, 2).float() / 255.0


class PixelDistance:
    name = "pixel_mse"

    def __init__(self, decode: Decoder):
        self.decode = decode

    def __call__(self, pred_BNC: torch.Tensor, goal_NC: torch.Tensor) -> torch.Tensor:
        images = _images(self.decode, pred_BNC, goal_NC)
        return (images[:-1] - images[-1:]).pow(2).mean(dim=(1, 2, 3)).to(pred_BNC.device)


def lpips_unavailable() -> str | None:
    """Why LPIPS cannot run here (None: it can): the package or its backbone weights missing."""
    if importlib.util.find_spec("lpips") is None:
        return "the lpips package is not installed"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
    if not weights.is_file():
        return f"its AlexNet weights are not on this machine ({weights})"
    return None


class LpipsDistance:
    name = "lpips_alex"

    def __init__(self, decode: Decoder):
        import lpips  # only when lpips_unavailable() is None: the weights load from the local cache

        self.decode = decode
        self.net = lpips.LPIPS(net="alex", verbose=False).eval()

    @torch.no_grad()
    def __call__(self, pred_BNC: torch.Tensor, goal_NC: torch.Tensor) -> torch.Tensor:
        images = _images(self.decode, pred_BNC, goal_NC) * 2 - 1
        if images.shape[-1] < LPIPS_MIN_SIZE:
            images = torch.nn.functional.interpolate(images, size=LPIPS_MIN_SIZE, mode="bilinear", align_corners=False)
        goal = images[-1:].expand(len(images) - 1, -1, -1, -1)
        return self.net(images[:-1], goal).flatten().to(pred_BNC.device)


def pick_distance(name: str, decode: Decoder | None) -> tuple[Distance, str]:
    """The distance ``name`` asks for and a note on the choice; ``auto``: LPIPS when it can run
    here and the latents decode, else ``latent``. Asking for what cannot run is a ConfigError."""
    if name not in DISTANCES:
        raise ConfigError(f"unknown distance {name!r}: expected one of {', '.join(DISTANCES)}")
    if name == "latent":
        return LatentDistance(), "latent distance (asked for)"
    missing = lpips_unavailable() if name in ("auto", "lpips") else None
    if decode is None:
        missing = "the run's latents have no decoder"
    if name == "auto":
        if missing:
            return LatentDistance(), f"latent distance: LPIPS cannot run here ({missing})"
        return LpipsDistance(decode), "LPIPS (AlexNet), weights found locally"
    if missing:
        raise ConfigError(f"--distance {name}: {missing}; use --distance latent")
    if name == "pixel":
        return PixelDistance(decode), "decoded-pixel distance (asked for)"
    return LpipsDistance(decode), "LPIPS (AlexNet, asked for)"
