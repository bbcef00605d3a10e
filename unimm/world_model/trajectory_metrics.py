"""Trajectory error of a plan against the ground truth: ATE and RPE (paper §5, App. F.1; NWM).

Poses are planar, rows (x, y, yaw) with yaw in radians, in the conventions of
`unimm.data_pipelines.poses` (an action (dx, dy, dyaw) moves in the robot frame, then turns).
A pose P = (x, y, yaw) is the SE(2) transform p -> R(yaw) p + (x, y); `P^-1 Q` is Q seen from P,
which is `poses.relative_action(P, Q)`. Angles are compared after wrapping into [-pi, pi).

ATE (absolute trajectory error), over T poses, after aligning the estimate with transform S:

    ATE = sqrt( (1/T) * sum_i || t(Q_i) - t(S P_i) ||^2 )

with Q the ground truth, P the estimate, t() the position. Alignment `align`:
  "start" (default): S = Q_0 P_0^-1, the rigid motion that puts the estimate's first pose on the
      ground truth's first pose (position and heading); a plan that starts where the robot is
      (the NWM setting, where both are in the start frame) is unchanged by it.
  "none": S = identity (NWM's evo call uses align=False on start-frame trajectories).
  "se2": S = the rotation + translation minimising the sum above (2-D Kabsch/Umeyama without
      scale, the usual evo `align=True`).

RPE (relative pose error) at a step of `delta` frames, over the M = T - delta pairs:

    E_i = (Q_i^-1 Q_{i+delta})^-1 (P_i^-1 P_{i+delta})
    RPE_trans = sqrt( (1/M) * sum_i || t(E_i) ||^2 )
    RPE_rot   = sqrt( (1/M) * sum_i wrap(yaw(E_i))^2 )          (radians)

the relative-motion error, which no global alignment changes (evo's RPE with
translation_part / rotation_angle, delta in frames, all pairs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from unimm.data_pipelines.poses import apply_action

__all__ = ["TrajectoryErrors", "ate", "rpe", "trajectory_errors", "integrate_actions", "wrap_angles"]

ALIGNMENTS = ("start", "none", "se2")


def wrap_angles(a: np.ndarray) -> np.ndarray:
    """Into [-pi, pi), as `poses.wrap_angle`."""
    return (np.asarray(a, dtype=np.float64) + math.pi) % (2 * math.pi) - math.pi


def _poses(p, name: str) -> np.ndarray:
    a = np.asarray(p, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 3 or a.shape[0] < 1:
        raise ValueError(f"{name} must be poses of shape [T, 3] (x, y, yaw), got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has non-finite values")
    return a


def _pair(gt, est) -> tuple[np.ndarray, np.ndarray]:
    q, p = _poses(gt, "ground truth"), _poses(est, "estimate")
    if q.shape != p.shape:
        raise ValueError(f"ground truth has {len(q)} poses, the estimate {len(p)}: trim them to one length first")
    return q, p


def _rot(yaw: np.ndarray) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)  # [..., 2, 2]


def _relative(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a^-1 b for poses [..., 3]: b seen from a (vectorised `poses.relative_action`)."""
    d = b[..., :2] - a[..., :2]
    c, s = np.cos(a[..., 2]), np.sin(a[..., 2])
    return np.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1], wrap_angles(b[..., 2] - a[..., 2])], -1)


def align_positions(gt, est, align: str = "start") -> np.ndarray:
    """The estimate's positions [T, 2] after the alignment `align` (see the module docstring)."""
    q, p = _pair(gt, est)
    if align == "none":
        return p[:, :2].copy()
    if align == "start":
        r = _rot(np.array(q[0, 2] - p[0, 2]))
        return (p[:, :2] - p[0, :2]) @ r.T + q[0, :2]
    if align == "se2":
        mq, mp = q[:, :2].mean(0), p[:, :2].mean(0)
        x, y = p[:, :2] - mp, q[:, :2] - mq
        # rotation angle maximising sum y_i . R x_i
        theta = math.atan2(float(np.sum(x[:, 0] * y[:, 1] - x[:, 1] * y[:, 0])), float(np.sum(x * y)))
        return x @ _rot(np.array(theta)).T + mq
    raise ValueError(f"unknown alignment {align!r}: expected one of {', '.join(ALIGNMENTS)}")


def ate(gt, est, align: str = "start") -> float:
    """Absolute trajectory error: RMSE of position error after `align` (module docstring)."""
    q, _ = _pair(gt, est)
    err = align_positions(gt, est, align) - q[:, :2]
    return float(np.sqrt(np.mean(np.sum(err**2, axis=1))))


def rpe(gt, est, delta: int = 1) -> tuple[float, float]:
    """Relative pose error at `delta` frames: (translation RMSE, rotation RMSE in radians)."""
    q, p = _pair(gt, est)
    if not isinstance(delta, int) or delta < 1:
        raise ValueError(f"RPE delta must be a positive number of frames, got {delta!r}")
    if len(q) <= delta:
        raise ValueError(f"RPE at delta {delta} needs more than {delta} poses, got {len(q)}")
    e = _relative(_relative(q[:-delta], q[delta:]), _relative(p[:-delta], p[delta:]))
    return float(np.sqrt(np.mean(np.sum(e[:, :2] ** 2, axis=1)))), float(np.sqrt(np.mean(e[:, 2] ** 2)))


@dataclass(frozen=True)
class TrajectoryErrors:
    ate: float
    rpe_trans: float
    rpe_rot: float  # radians


def trajectory_errors(gt, est, *, align: str = "start", delta: int = 1) -> TrajectoryErrors:
    trans, rot = rpe(gt, est, delta)
    return TrajectoryErrors(ate(gt, est, align), trans, rot)


def integrate_actions(start: Sequence[float], actions) -> np.ndarray:
    """Poses [H + 1, 3] from a start pose and actions [H, 3] (dx, dy, dyaw), by `poses.apply_action`."""
    a = np.asarray(actions, dtype=np.float64).reshape(-1, 3)
    out = [tuple(float(v) for v in start)]
    if len(out[0]) != 3:
        raise ValueError(f"start pose must be (x, y, yaw), got {start!r}")
    for row in a:
        out.append(apply_action(out[-1], tuple(float(v) for v in row)))
    return np.array(out, dtype=np.float64)
