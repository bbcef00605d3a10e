"""Flow matching: interpolation, targets, the timestep shift and both losses vs. formulas."""

import math

import pytest
import torch

from unimm.flow import (
    FlowMatchingConfig,
    flow_loss_sum,
    frame_noise,
    interpolate,
    predicted_velocity,
    sample_t,
    shift_t,
    velocity_target,
)


def test_interpolation_endpoints_and_velocity():
    z0, eps = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    assert torch.equal(interpolate(z0, eps, torch.tensor(1.0)), z0)  # t = 1 is clean
    assert torch.equal(interpolate(z0, eps, torch.tensor(0.0)), eps)
    t, h = torch.tensor(0.3, dtype=torch.float64), 1e-6
    finite_difference = (interpolate(z0, eps, t + h) - interpolate(z0, eps, t - h)) / (2 * h)
    torch.testing.assert_close(finite_difference, velocity_target(z0, eps))


def test_shift_hand_values():
    assert torch.allclose(shift_t(torch.tensor([0.0, 0.5, 1.0]), 1.0), torch.tensor([0.0, 0.5, 1.0]))
    # s = 3, t = 0.5: sigma = 0.5 -> 3*0.5 / (1 + 2*0.5) = 0.75 -> t' = 0.25
    assert shift_t(torch.tensor(0.5), 3.0).item() == pytest.approx(0.25)
    assert FlowMatchingConfig(shift="rae").shift_factor(256, 1152) == pytest.approx(math.sqrt(72))
    assert FlowMatchingConfig(shift="sd3", shift_value=2.5).shift_factor(256, 1152) == 2.5
    assert FlowMatchingConfig(shift="none").shift_factor(256, 1152) == 1.0


def test_shift_moves_samples_toward_noise():
    g = torch.Generator().manual_seed(0)
    t = sample_t(100_000, 3.0, generator=g)
    assert 0 <= t.min() and t.max() <= 1
    # For s = 3, P(t' <= 0.25) = P(t <= 0.5) = 0.5
    assert (t <= 0.25).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_v_prediction_loss():
    z0, eps = torch.randn(4, 6), torch.randn(4, 6)
    t = torch.rand(4, 1)
    cfg = FlowMatchingConfig(prediction="v")
    assert flow_loss_sum(z0 - eps, z0, eps, t, cfg).item() == pytest.approx(0.0, abs=1e-10)
    assert flow_loss_sum(torch.zeros(4, 6), z0, eps, t, cfg).item() == pytest.approx((z0 - eps).pow(2).sum().item(), rel=1e-6)


def test_x_prediction_loss_is_velocity_error_of_implied_velocity():
    z0, eps = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    t = torch.tensor([[0.1], [0.5], [0.9], [0.99]], dtype=torch.float64)
    cfg = FlowMatchingConfig(prediction="x", x_pred_min_one_minus_t=0.05)
    z_t = interpolate(z0, eps, t)
    # predicting z0 exactly implies the exact velocity (where 1 - t is above the floor)
    torch.testing.assert_close(predicted_velocity(z0, z_t, t, cfg)[:3], (z0 - eps)[:3])
    delta = torch.full_like(z0, 0.1)
    # rows 0-2: v_hat - v = delta / (1 - t); row 3: 1 - t = 0.01 is floored at 0.05 in the
    # implied velocity and in the target alike (JiT), so the error is delta / 0.05
    by_hand = (delta[:3] / (1 - t[:3])).pow(2).sum() + (delta[3] / 0.05).pow(2).sum()
    # the head output is taken in float32, hence the tolerance
    assert flow_loss_sum(z0 + delta, z0, eps, t, cfg).item() == pytest.approx(by_hand.item(), rel=1e-6)
    # a perfect x-prediction scores 0 at every t, near-clean rows included
    assert flow_loss_sum(z0.float(), z0.float(), eps.float(), t.float(), cfg).item() == 0.0


def test_frame_noise_one_t_per_frame_and_row_seeded():
    L, C = 10, 3
    frames = torch.tensor([[-1, 0, 0, 0, -1, 1, 1, -1, 2, 2]])
    denoise = torch.tensor([[False, True, True, True, False, True, True, False, False, False]])
    latents = torch.randn(1, L, C)
    t, eps = frame_noise(latents, frames, denoise, shift=1.0, seeds=[123])
    assert t[0, 1] == t[0, 2] == t[0, 3] and t[0, 5] == t[0, 6]
    assert t[0, 1] != t[0, 5], "frames get independent times"
    assert (t[0, 8:] == 1).all(), "clean conditioning frames stay at t = 1"
    # the same seed in another batch position gives the same row
    t2, eps2 = frame_noise(torch.cat([latents, latents]), frames.repeat(2, 1), denoise.repeat(2, 1), 1.0, [7, 123])
    assert torch.equal(t2[1], t[0]) and torch.equal(eps2[1], eps[0])
