"""Planar poses and navigation actions, shared by the NWM job and the procedural world.

Conventions of NWM and the paper (App. F.1): a pose is (x, y, yaw) in the world; an action
(dx, dy, dyaw) is in the robot frame at the start of the move, +x forward, +y left, yaw
counter-clockwise, translation first, then the turn. Actions reach the model as plain text.
"""

from __future__ import annotations

import math

Pose = tuple[float, float, float]
Action = tuple[float, float, float]

# Paper App. F.1: W forward, S backward, A / D turn left / right while creeping forward.
WASD: dict[str, Action] = {"W": (0.5, 0.0, 0.0), "S": (-0.5, 0.0, 0.0), "A": (0.2, 0.0, 0.5), "D": (0.2, 0.0, -0.5)}


def wrap_angle(angle: float) -> float:
    """Into [-pi, pi)."""
    return (angle + math.pi) % (2 * math.pi) - math.pi


def apply_action(pose: Pose, action: Action) -> Pose:
    x, y, yaw = pose
    dx, dy, dyaw = action
    c, s = math.cos(yaw), math.sin(yaw)
    return (x + c * dx - s * dy, y + s * dx + c * dy, wrap_angle(yaw + dyaw))


def relative_action(start: Pose, end: Pose) -> Action:
    """The action that takes `start` to `end` (inverse of `apply_action`)."""
    x, y, yaw = start
    wx, wy = end[0] - x, end[1] - y
    c, s = math.cos(yaw), math.sin(yaw)
    return (c * wx + s * wy, -s * wx + c * wy, wrap_angle(end[2] - yaw))


def action_text(action: Action) -> str:
    """Fixed-point numbers, as text tokens: "dx +0.50 dy +0.00 dyaw -0.50" (metres, radians)."""
    dx, dy, dyaw = (0.0 if abs(v) < 0.005 else v for v in action)  # no "-0.00"
    return f"dx {dx:+.2f} dy {dy:+.2f} dyaw {dyaw:+.2f}"
