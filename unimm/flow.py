"""Flow matching for visual latents (paper §2.1, App. D.2/E.3).

Convention: t in [0, 1] with t = 1 clean and t = 0 pure noise;
z_t = (1 - t) * eps + t * z0, velocity v = dz_t/dt = z0 - eps.
One t per image or video frame (diffusion forcing), shifted toward the noisy end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(kw_only=True, slots=True)
class FlowMatchingConfig:
    prediction: Literal["v", "x"] = "v"
    """``v``: the flow head predicts the velocity z0 - eps. ``x``: it predicts the clean
    latent z0 (JiT-style) and the loss is taken on the velocity that prediction implies."""

    shift: Literal["none", "sd3", "rae"] = "rae"
    """How t ~ U[0,1] is moved toward the noisy end: ``sd3`` uses ``shift_value``;
    ``rae`` derives the shift from the latent's dimension: sqrt(tokens * channels / rae_base_dim)."""

    shift_value: float = 3.0
    rae_base_dim: int = 4096
    x_pred_min_one_minus_t: float = 0.05
    """Floor on (1 - t) when an x-prediction is turned into a velocity in the loss (avoids
    dividing by ~0). The loss applies it to the prediction and the target alike (JiT), so a
    perfect prediction scores 0 at every t; the sampler never needs it (``euler_step``)."""

    def shift_factor(self, tokens_per_frame: int, latent_dim: int) -> float:
        if self.shift == "none":
            return 1.0
        if self.shift == "sd3":
            return self.shift_value
        if self.shift == "rae":
            return math.sqrt(tokens_per_frame * latent_dim / self.rae_base_dim)
        raise ValueError(f"flow.shift must be 'none', 'sd3' or 'rae', got {self.shift!r}")


def shift_t(t: torch.Tensor, s: float) -> torch.Tensor:
    """SD3's shift written for t = 1 clean: with noise level sigma = 1 - t,
    sigma' = s * sigma / (1 + (s - 1) * sigma). s > 1 moves samples toward noise."""
    sigma = 1.0 - t
    return 1.0 - s * sigma / (1.0 + (s - 1.0) * sigma)


def sample_t(n: int, s: float, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    u = torch.rand(n, generator=generator, device=device)
    return shift_t(u, s)


def interpolate(z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (1.0 - t) * eps + t * z0


def velocity_target(z0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return z0 - eps


def predicted_velocity(
    pred: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor, config: FlowMatchingConfig
) -> torch.Tensor:
    """The velocity a head output stands for, (1 - t) floored for an x-prediction."""
    if config.prediction == "v":
        return pred
    # x-prediction: z_t = (1 - t) eps + t x  =>  v = (x - z_t) / (1 - t)
    return (pred - z_t) / (1.0 - t).clamp_min(config.x_pred_min_one_minus_t)


def flow_loss_sum(
    pred: torch.Tensor, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, config: FlowMatchingConfig
) -> torch.Tensor:
    """Sum of squared velocity errors; the caller divides by the (global) element count.

    x-prediction (JiT): the implied velocity (x - z_t) / max(1 - t, floor) is compared with
    the target written the same way, (z0 - z_t) / max(1 - t, floor), which is z0 - eps
    wherever 1 - t >= floor. The error is then (x - z0) / max(1 - t, floor): the v-loss
    weighting 1 / (1 - t)^2 away from the floor, a bounded weight near t = 1, and the
    minimiser x = z0 at every t (a floored prediction against an unfloored target would
    pull x away from z0 near clean frames).
    """
    if config.prediction == "v":
        return (pred.float() - velocity_target(z0, eps)).pow(2).sum()
    one_minus_t = (1.0 - t).clamp_min(config.x_pred_min_one_minus_t)
    return ((pred.float() - z0) / one_minus_t).pow(2).sum()


def time_grid(steps: int, shift: float) -> list[float]:
    """The sampler's ``steps + 1`` times from 0 (noise) to 1 (clean): the uniform grid moved
    by the training's shift, so grid point k is the k/steps quantile of the training's t."""
    return shift_t(torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64), shift).tolist()


def euler_step(
    pred: torch.Tensor, z_t: torch.Tensor, t: float, t_next: float, config: FlowMatchingConfig
) -> torch.Tensor:
    """One Euler step of the flow from t to t_next for a head output ``pred``.

    x-prediction: v = (x - z_t) / (1 - t) without the loss's floor (t < 1 on the grid), so
    the step moves along the line to x and the last step (t_next = 1) lands on x itself.
    """
    if config.prediction == "v":
        return z_t + (t_next - t) * pred
    if not t < 1.0:
        raise ValueError(f"an Euler step needs t < 1, got {t}")
    return z_t + ((t_next - t) / (1.0 - t)) * (pred - z_t)


def frame_noise(
    latents_BLC: torch.Tensor,
    frame_ids_BL: torch.Tensor,
    denoise_BL: torch.Tensor,
    shift: float,
    seeds: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame flow time t and Gaussian noise, drawn from one generator per row.

    Seeding each row from (seed, step, global row index) makes the noise independent of how
    rows are spread over processes, so 1 and N processes see identical training data, and a
    resumed run draws what the uninterrupted run would have. Visual positions with
    ``denoise`` False (clean conditioning frames, ``dataloader.clean_conditioning_frames``)
    get t = 1; text positions get t = 1 too (ignored by the model).
    """
    B, L, C = latents_BLC.shape
    device = latents_BLC.device
    t_BL = torch.empty(B, L, device=device)
    eps_BLC = torch.empty(B, L, C, device=device)
    for b, seed in enumerate(seeds):
        g = torch.Generator(device=device).manual_seed(seed)
        eps_BLC[b] = torch.randn(L, C, generator=g, device=device)
        # A row holds at most L frames: drawing L times keeps the draw independent of the
        # other rows and free of a host sync on the frame count.
        t_frames = shift_t(torch.rand(L, generator=g, device=device), shift)
        t_BL[b] = torch.where(denoise_BL[b], t_frames[frame_ids_BL[b].clamp_min(0)], 1.0)
    return t_BL, eps_BLC
