"""A procedural 2-D navigation world (shared/DATASETS.md): egocentric views of a texture map.

The world is a 64 m x 64 m torus covered by a smooth multi-scale colour texture with
scattered coloured discs as landmarks (1024 px, 16 px per metre), a pure function of its seed.
The robot's view is the 8 m x 8 m square around its pose, rotated so that forward is up and
left is left, so every action (dx, dy, dyaw) changes the view in a way the action alone
determines. Samples follow NWM (paper §5): 4 context frames from a random walk, one action,
the target frame; actions are WASD keys (App. F.1) half the time and random continuous moves
otherwise, and each sample carries its poses, so planning error (ATE/RPE) can be computed
exactly.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw

from unimm.data_pipelines.poses import WASD, Pose, action_text, apply_action, relative_action
from unimm.data_pipelines.procedural import sample_rng

WORLD_PIXELS = 1024
PIXELS_PER_METRE = 16
WORLD_METRES = WORLD_PIXELS / PIXELS_PER_METRE
VIEW_METRES = 8.0
_SUPERSAMPLE = 2  # view pixels are averages of 2 x 2 samples: a 32 px view spans 128 world px


def _smooth_noise(rng: np.random.Generator, cell: int) -> np.ndarray:
    """[WORLD, WORLD, 3] in [0, 1]: random values on a grid of `cell` px, smoothly interpolated, tileable."""
    n = WORLD_PIXELS // cell
    grid = rng.random((n, n, 3))
    pos = np.arange(WORLD_PIXELS) / cell
    i0 = np.floor(pos).astype(int)
    f = pos - i0
    f = f * f * (3 - 2 * f)  # smoothstep: no visible grid lines
    i0, i1 = i0 % n, (i0 + 1) % n
    rows = grid[i0] * (1 - f)[:, None, None] + grid[i1] * f[:, None, None]
    return rows[:, i0] * (1 - f)[None, :, None] + rows[:, i1] * f[None, :, None]


@functools.lru_cache(maxsize=4)
def texture_map(seed: int) -> np.ndarray:
    """uint8 [1024, 1024, 3]; rows run south (down), columns east."""
    rng = sample_rng(seed, "navigation_map", 0)
    field = sum(w * _smooth_noise(rng, cell) for cell, w in ((256, 0.45), (64, 0.35), (16, 0.2)))
    lo, hi = field.min(axis=(0, 1)), field.max(axis=(0, 1))
    image = Image.fromarray((30 + 195 * (field - lo) / (hi - lo)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(400):
        r = float(rng.uniform(4, 20))
        cx, cy = rng.uniform(r, WORLD_PIXELS - r, size=2)
        colour = tuple(int(c) for c in rng.choice([0, 255], size=3))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    return np.asarray(image)


def view(world: np.ndarray, pose: Pose, image_size: int) -> np.ndarray:
    """uint8 [S, S, 3]: the VIEW_METRES square centred on the robot, forward up, bilinear, wrapped."""
    x, y, yaw = pose
    n = image_size * _SUPERSAMPLE
    offsets = (np.arange(n) + 0.5 - n / 2) * (VIEW_METRES / n)
    forward, left = -offsets[:, None], -offsets[None, :]  # image rows go backward, columns go right
    wx = x + forward * math.cos(yaw) - left * math.sin(yaw)
    wy = y + forward * math.sin(yaw) + left * math.cos(yaw)
    col, row = wx * PIXELS_PER_METRE - 0.5, -wy * PIXELS_PER_METRE - 0.5  # north is up in the map
    c0, r0 = np.floor(col).astype(int), np.floor(row).astype(int)
    fc, fr = (col - c0)[..., None], (row - r0)[..., None]
    size = world.shape[0]

    def at(r, c):
        return world[r % size, c % size].astype(np.float32)

    sampled = (
        at(r0, c0) * (1 - fr) * (1 - fc) + at(r0, c0 + 1) * (1 - fr) * fc
        + at(r0 + 1, c0) * fr * (1 - fc) + at(r0 + 1, c0 + 1) * fr * fc
    )
    pooled = sampled.reshape(image_size, _SUPERSAMPLE, image_size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.rint(pooled).astype(np.uint8)


def _random_action(rng: np.random.Generator) -> tuple[tuple[float, float, float], str | None]:
    if rng.random() < 0.5:
        key = "WASD"[int(rng.integers(4))]
        return WASD[key], key
    move = (float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.2, 0.2)), float(rng.uniform(-0.5, 0.5)))
    return move, None


def navigation_sample(index: int, seed: int, image_size: int = 32, context: int = 4) -> dict:
    """`context` frames of a random walk, one more action, and the frame it leads to."""
    rng = sample_rng(seed, "navigation", index)
    pose: Pose = (*(float(v) for v in rng.uniform(0, WORLD_METRES, size=2)), float(rng.uniform(-math.pi, math.pi)))
    poses = [pose]
    for _ in range(context - 1):
        poses.append(apply_action(poses[-1], _random_action(rng)[0]))
    action, key = _random_action(rng)
    poses.append(apply_action(poses[-1], action))
    world = texture_map(seed)
    # The text is computed back from the poses, as it is for real trajectories.
    text = action_text(relative_action(poses[-2], poses[-1]))
    return {
        "frames": np.stack([view(world, p, image_size) for p in poses]),
        "action": text,
        "action_values": list(action),
        "key": key,
        "poses": [list(p) for p in poses],
        "num_context": context,
    }
