"""A procedural 2-D navigation world (shared/DATASETS.md): egocentric views of a texture map.

The world is a 64 m x 64 m torus covered by a smooth multi-scale colour texture with
scattered coloured discs as landmarks (1024 px, 16 px per metre), a pure function of its seed.
The robot's view is the 8 m x 8 m square around its pose, rotated so that forward is up and
left is left, so every action (dx, dy, dyaw) changes the view in a way the action alone
determines. Samples follow NWM (paper §5): 4 context frames from a random walk, one action,
the target frame; actions are WASD keys (App. F.1) half the time and random continuous moves
otherwise, and each sample carries its poses, so planning error (ATE/RPE) can be computed
exactly.

Planning episodes (paper §5.1, App. F.1: start frames, a goal 8 steps away, ground-truth poses)
come from the same world generator with their own random stream, in a held-out split: the
world map and the episodes are functions of the seed, and training uses seed 0
(``--dataloader.procedural_seed``) while episodes default to seed 1, another map. They are
written to an ``.npz`` file (`write_episodes`, format in `EPISODE_KEYS`) that
``unimm sample --task plan`` and ``python -m unimm.world_model.evaluate`` read:

    python -m unimm.data_pipelines.navigation --out episodes.npz --count 16 --seed 1 --image-size 16
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from unimm.data_pipelines.poses import WASD, Pose, action_text, apply_action, relative_action
from unimm.data_pipelines.procedural import sample_rng
from unimm.errors import ConfigError

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


# Continuous moves are uniform in this box; every WASD move lies in it too, so it bounds the
# whole action space (a planner clips its candidates to it).
ACTION_LOW = (-0.5, -0.2, -0.5)
ACTION_HIGH = (0.5, 0.2, 0.5)


def _random_action(rng: np.random.Generator) -> tuple[tuple[float, float, float], str | None]:
    if rng.random() < 0.5:
        key = "WASD"[int(rng.integers(4))]
        return WASD[key], key
    move = tuple(float(rng.uniform(lo, hi)) for lo, hi in zip(ACTION_LOW, ACTION_HIGH))
    return move, None


def action_prior() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and standard deviation per dimension (dx, dy, dyaw) of `_random_action`, exactly:
    an even mixture of the four WASD moves (each with probability 1/4) and the uniform box,
    whose mean is the box centre and second moment (lo^2 + lo*hi + hi^2) / 3. A planner
    samples its first candidates from it (NWM uses the data's action statistics)."""
    mean, std = [], []
    for d, (lo, hi) in enumerate(zip(ACTION_LOW, ACTION_HIGH)):
        keys = [move[d] for move in WASD.values()]
        m1 = 0.5 * sum(keys) / len(keys) + 0.5 * (lo + hi) / 2
        m2 = 0.5 * sum(k * k for k in keys) / len(keys) + 0.5 * (lo * lo + lo * hi + hi * hi) / 3
        mean.append(m1)
        std.append(math.sqrt(m2 - m1 * m1))
    return tuple(mean), tuple(std)


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


# -- planning episodes ----------------------------------------------------------------------

EPISODE_FORMAT = "unimm-navigation-episodes-v1"
EPISODE_SEED = 1  # the held-out split; training's procedural data uses seed 0
# Random stream of the episodes, apart from procedural._KIND_CODES (small integers), so an
# episode never repeats a training sample's random walk even under the same seed.
_EPISODE_STREAM = 1004

# key -> (dtype kind, shape with E episodes, K context frames, S pixels, H steps)
EPISODE_KEYS: dict[str, tuple[str, str]] = {
    "format": ("U", "[] the string EPISODE_FORMAT"),
    "context_frames": ("u", "[E, K, S, S, 3] uint8 views before the start; the last one is seen at the start pose"),
    "goal_frames": ("u", "[E, S, S, 3] uint8 view at the goal pose"),
    "context_poses": ("f", "[E, K, 3] world poses (x, y, yaw) of the context frames"),
    "poses": ("f", "[E, H + 1, 3] ground-truth world poses from the start (= the last context pose) to the goal"),
    "actions": ("f", "[E, H, 3] ground-truth actions (dx, dy, dyaw), robot frame: poses[i+1] = apply_action(poses[i], actions[i])"),
    "world_seeds": ("i", "[E] seed of the world map (texture_map) the views are rendered from"),
    "indices": ("i", "[E] episode index in its seed's stream"),
}


@dataclass(frozen=True)
class Episode:
    context_frames: np.ndarray  # uint8 [K, S, S, 3]
    goal_frame: np.ndarray  # uint8 [S, S, 3]
    context_poses: np.ndarray  # [K, 3]
    poses: np.ndarray  # [H + 1, 3], poses[0] = context_poses[-1]
    actions: np.ndarray  # [H, 3]
    world_seed: int
    index: int

    @property
    def horizon(self) -> int:
        return len(self.actions)

    @property
    def image_size(self) -> int:
        return self.goal_frame.shape[0]


def planning_episode(index: int, seed: int = EPISODE_SEED, image_size: int = 16, context: int = 4, horizon: int = 8) -> Episode:
    """A random walk of ``context`` frames (the last at the start pose) and ``horizon`` more
    moves to the goal, drawn as the training samples' actions are (`_random_action`)."""
    if min(context, horizon, image_size) < 1:
        raise ConfigError(f"episodes need context, horizon and image_size >= 1, got {context}, {horizon}, {image_size}")
    rng = np.random.default_rng([seed, _EPISODE_STREAM, index])
    pose: Pose = (*(float(v) for v in rng.uniform(0, WORLD_METRES, size=2)), float(rng.uniform(-math.pi, math.pi)))
    context_poses = [pose]
    for _ in range(context - 1):
        context_poses.append(apply_action(context_poses[-1], _random_action(rng)[0]))
    poses, actions = [context_poses[-1]], []
    for _ in range(horizon):
        actions.append(_random_action(rng)[0])
        poses.append(apply_action(poses[-1], actions[-1]))
    world = texture_map(seed)
    return Episode(
        context_frames=np.stack([view(world, p, image_size) for p in context_poses]),
        goal_frame=view(world, poses[-1], image_size),
        context_poses=np.array(context_poses),
        poses=np.array(poses),
        actions=np.array(actions),
        world_seed=seed,
        index=index,
    )


def write_episodes(
    path: str | Path, count: int, *, seed: int = EPISODE_SEED, image_size: int = 16, context: int = 4,
    horizon: int = 8, progress: bool = True,
) -> Path:
    """Episodes 0..count-1 of ``seed`` into one ``.npz`` with the keys of `EPISODE_KEYS`."""
    if count < 1:
        raise ConfigError(f"--count must be >= 1, got {count}")
    episodes = [
        planning_episode(i, seed, image_size, context, horizon)
        for i in tqdm(range(count), desc="episodes", disable=not progress, file=sys.stdout)
    ]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to another suffix
        np.savez_compressed(
            f,
            format=np.array(EPISODE_FORMAT),
            context_frames=np.stack([e.context_frames for e in episodes]),
            goal_frames=np.stack([e.goal_frame for e in episodes]),
            context_poses=np.stack([e.context_poses for e in episodes]),
            poses=np.stack([e.poses for e in episodes]),
            actions=np.stack([e.actions for e in episodes]),
            world_seeds=np.array([e.world_seed for e in episodes], dtype=np.int64),
            indices=np.array([e.index for e in episodes], dtype=np.int64),
        )
    return path


def _episode_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError as exc:
        raise ConfigError(f"episode file {path}: no such file") from exc
    except (OSError, ValueError, EOFError) as exc:  # not a zip, truncated, or pickled objects
        raise ConfigError(f"episode file {path}: not an .npz of arrays ({type(exc).__name__}: {exc})") from exc
    missing = [k for k in EPISODE_KEYS if k not in arrays]
    if missing:
        raise ConfigError(
            f"episode file {path}: missing key {missing[0]!r} ({EPISODE_KEYS[missing[0]][1]}); "
            f"write episodes with python -m unimm.data_pipelines.navigation"
        )
    if str(arrays["format"]) != EPISODE_FORMAT:
        raise ConfigError(f"episode file {path}: key 'format' is {str(arrays['format'])!r}, expected {EPISODE_FORMAT!r}")
    for key, (kind, meaning) in EPISODE_KEYS.items():
        if arrays[key].dtype.kind != kind:
            raise ConfigError(f"episode file {path}: key {key!r} has dtype {arrays[key].dtype}, expected {meaning}")
    return arrays


def read_episodes(path: str | Path) -> list[Episode]:
    """The episodes of a file `write_episodes` wrote; any other content is a ConfigError naming
    the file and the key that does not fit."""
    path = Path(path)
    a = _episode_arrays(path)
    frames, goals = a["context_frames"], a["goal_frames"]
    if frames.ndim != 5 or frames.shape[-1] != 3 or frames.shape[2] != frames.shape[3] or len(frames) == 0:
        raise ConfigError(f"episode file {path}: key 'context_frames' has shape {list(frames.shape)}, expected {EPISODE_KEYS['context_frames'][1]}")
    E, K, S = frames.shape[:3]
    H = a["actions"].shape[1] if a["actions"].ndim == 3 else -1
    expected = {
        "goal_frames": (E, S, S, 3), "context_poses": (E, K, 3), "poses": (E, H + 1, 3), "actions": (E, H, 3),
        "world_seeds": (E,), "indices": (E,),
    }
    for key, shape in expected.items():
        if a[key].shape != shape or H < 1:
            raise ConfigError(
                f"episode file {path}: key {key!r} has shape {list(a[key].shape)}, expected {list(shape)} "
                f"({EPISODE_KEYS[key][1]}; E={E}, K={K}, S={S} from 'context_frames')"
            )
    for key in ("context_poses", "poses", "actions"):
        if not np.isfinite(a[key]).all():
            raise ConfigError(f"episode file {path}: key {key!r} holds non-finite values")
    episodes = []
    for e in range(E):
        start, poses, actions = a["context_poses"][e, -1], a["poses"][e], a["actions"][e]
        walked = [tuple(start)]
        for move in actions:
            walked.append(apply_action(walked[-1], tuple(move)))
        if not np.allclose(poses[0], start) or not np.allclose(_wrapped(np.array(walked) - poses), 0, atol=1e-6):
            raise ConfigError(
                f"episode file {path}: key 'poses' of episode {e} is not the walk of its 'actions' from its last "
                "context pose (poses[i+1] = apply_action(poses[i], actions[i]))"
            )
        episodes.append(Episode(frames[e], goals[e], a["context_poses"][e], poses, actions, int(a["world_seeds"][e]), int(a["indices"][e])))
    return episodes


def _wrapped(delta: np.ndarray) -> np.ndarray:
    """Pose differences with the yaw column wrapped into [-pi, pi)."""
    out = delta.copy()
    out[:, 2] = (out[:, 2] + math.pi) % (2 * math.pi) - math.pi
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write held-out planning episodes of the navigation world (format: EPISODE_KEYS in this module).",
    )
    parser.add_argument("--out", required=True, type=Path, help="the .npz file to write")
    parser.add_argument("--count", type=int, default=16, help="episodes (default: 16)")
    parser.add_argument("--seed", type=int, default=EPISODE_SEED, help=f"world and walk seed (default: {EPISODE_SEED}; training uses 0)")
    parser.add_argument("--image-size", type=int, default=16, help="view side in pixels, the run's encoder input (default: 16)")
    parser.add_argument("--context", type=int, default=4, help="context frames (default: 4)")
    parser.add_argument("--horizon", type=int, default=8, help="moves from the start to the goal (default: 8)")
    args = parser.parse_args(argv)
    path = write_episodes(args.out, args.count, seed=args.seed, image_size=args.image_size, context=args.context, horizon=args.horizon)
    print(f"wrote {path}")


if __name__ == "__main__":
    from unimm.data_pipelines.shard_job import cli

    sys.exit(cli(main))
