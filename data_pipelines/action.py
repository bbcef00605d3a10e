"""Action-conditioned samples (kind "action"): context frames, an action in text, result frames.

Two inputs, one output format (paper §5 and App. G.3):

    # NWM trajectories: 4 context frames, the action to the target pose, the target frame
    python -m unimm.data_pipelines.action nwm --out shards/nwm --source nwm --encoder siglip2 \\
        --encoder-path weights/siglip2 --context 4 --frame-stride 1 --horizon 1 recon/ scand/

    # annotated video: 1-4 context frames, the annotated action, 1-4 result frames
    python -m unimm.data_pipelines.action annotated --out shards/annot --source annotated \\
        --encoder siglip2 --encoder-path weights/siglip2 annotations.jsonl

NWM layout (as NWM's data processing writes it): one folder per trajectory with frames
``0.jpg, 1.jpg, ...`` and ``traj_data.pkl`` (or ``traj_data.json``) holding ``position``
[T, 2] and ``yaw`` [T]. A sample ends at frame t: context frames t - (context-1)*stride ... t,
target t + horizon; the action is the target's pose in the robot frame at t, scaled by
--position-scale (e.g. NWM's metric waypoint spacing), written by `poses.action_text`.

Annotated video: JSONL lines ``{"video": path (relative to the JSONL file), "context": [t0, t1],
"result": [t2, t3], "action": "..."}`` in seconds. Frames are sampled at --fps; the last 4 in
the context window and the first 4 in the result window are kept.

Each sample stores latents [context + result, N, C] and ``num_context`` in its json.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import asdict, dataclass
import json
import pickle
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from unimm.data_pipelines.encoders import EncoderSpec, add_encoder_arguments, encoding_options
from unimm.data_pipelines.images import IMAGE_SUFFIXES, UndecodableImage, decode_image, fit_square
from unimm.data_pipelines.poses import action_text, relative_action
from unimm.data_pipelines.records import expand_inputs, read_records
from unimm.data_pipelines.shard_job import Job, Record, ShardTask, Skip, add_job_arguments, chunked, cli, run_job
from unimm.data_pipelines.video import UndecodableVideo, sample_frames
from unimm.errors import ConfigError
from unimm.tokenizer import Tokenizer

MAX_ANNOTATED_FRAMES = 4  # App. G.3: 1-4 context and 1-4 result frames


@dataclass(frozen=True)
class NwmSettings:
    context: int = 4
    frame_stride: int = 1
    horizon: int = 1
    sample_stride: int = 1
    position_scale: float = 1.0

    def __post_init__(self) -> None:
        if min(self.context, self.frame_stride, self.horizon, self.sample_stride) < 1 or self.position_scale <= 0:
            raise ConfigError(f"NWM settings must be positive: {self}")


def _trajectory_poses(folder: Path) -> np.ndarray:
    """[T, 3] (x, y, yaw) from traj_data.pkl or traj_data.json."""
    pkl, js = folder / "traj_data.pkl", folder / "traj_data.json"
    if pkl.is_file():
        with open(pkl, "rb") as f:
            data = pickle.load(f)  # NWM's own format; only open trajectory folders you trust
    else:
        data = json.loads(js.read_text())
    position = np.asarray(data["position"], dtype=np.float64).reshape(-1, 2)
    yaw = np.asarray(data["yaw"], dtype=np.float64).reshape(-1)
    if len(position) != len(yaw):
        raise ValueError(f"{len(position)} positions but {len(yaw)} yaws")
    return np.concatenate([position, yaw[:, None]], axis=1)


def nwm_samples(folder: str, *, image_size: int, settings: NwmSettings) -> Iterator[Record | Skip]:
    traj = Path(folder)
    try:
        poses = _trajectory_poses(traj)
    except (OSError, EOFError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as exc:
        yield Skip(traj.name, f"unreadable trajectory data ({exc!r})")
        return
    images = sorted(
        (f for f in traj.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.stem.isdigit()), key=lambda f: int(f.stem)
    )
    if [int(f.stem) for f in images] != list(range(len(poses))):
        yield Skip(traj.name, f"frames are not 0..{len(poses) - 1} for its {len(poses)} poses")
        return
    cache: dict[int, np.ndarray | str] = {}

    def frame(i: int) -> np.ndarray | str:  # each frame serves up to context + 1 samples: decode once
        if i not in cache:
            try:
                cache[i] = fit_square(decode_image(images[i].read_bytes()), image_size)
            except UndecodableImage as exc:
                cache[i] = f"frame {images[i].name}: {exc}"
        return cache[i]

    st = settings
    scale = np.array([st.position_scale, st.position_scale, 1.0])
    for t in range((st.context - 1) * st.frame_stride, len(poses) - st.horizon, st.sample_stride):
        indices = [t - (st.context - 1 - j) * st.frame_stride for j in range(st.context)] + [t + st.horizon]
        frames = [frame(i) for i in indices]
        key = f"{traj.name}-{t:06d}"
        bad = next((f for f in frames if isinstance(f, str)), None)
        if bad is not None:
            yield Skip(key, bad)
            continue
        action = relative_action(tuple(poses[t] * scale), tuple(poses[t + st.horizon] * scale))
        text = action_text(action)
        meta = {
            "trajectory": folder,
            "frames": indices,
            "num_context": st.context,
            "action": text,
            "action_values": list(action),
            "poses": (poses[indices] * scale).tolist(),
        }
        yield Record(key, meta, text, np.stack(frames))


def find_trajectories(inputs: list[Path]) -> list[str]:
    found: set[Path] = set()
    for p in (Path(i).expanduser() for i in inputs):
        if not p.is_dir():
            raise ConfigError(f"NWM input {p} is not a folder")
        found |= {f.parent for pattern in ("traj_data.pkl", "traj_data.json") for f in p.rglob(pattern)}
    if not found:
        raise ConfigError(f"no trajectory folders (with traj_data.pkl or .json) under {[str(i) for i in inputs]}")
    return sorted(str(f) for f in found)


def annotated_samples(item: tuple, *, image_size: int, fps: float) -> Iterator[Record | Skip]:
    video, segments = item
    try:
        times, frames = sample_frames(video, fps, image_size)
    except UndecodableVideo as exc:
        for segment in segments:
            yield Skip(segment[0], str(exc))
        return
    t = np.asarray(times)
    eps = 1e-6
    for key, c0, c1, r0, r1, action in segments:
        context = np.flatnonzero((t >= c0 - eps) & (t <= c1 + eps))[-MAX_ANNOTATED_FRAMES:]
        result = np.flatnonzero((t >= r0 - eps) & (t <= r1 + eps))[:MAX_ANNOTATED_FRAMES]
        if len(context) == 0 or len(result) == 0:
            yield Skip(key, f"no frame at {fps} FPS in the context {c0}-{c1}s or result {r0}-{r1}s window")
            continue
        meta = {
            "video": video,
            "context_s": [c0, c1],
            "result_s": [r0, r1],
            "frame_times": t[np.concatenate([context, result])].tolist(),
            "num_context": len(context),
            "action": action,
        }
        yield Record(key, meta, action, frames[np.concatenate([context, result])])


def annotation_items(files: list[Path]) -> list[tuple]:
    """(video, segments) per video, in a fixed order. A malformed line is a mistake in the
    curated annotations, not noise in the data: it stops the job with its file and line."""
    by_video: dict[str, list[tuple]] = defaultdict(list)
    for path in files:
        for index, row, reason in read_records(path):
            where = f"{path}:{index + 1}"
            try:
                if row is None:
                    raise ValueError(reason)
                (c0, c1), (r0, r1) = row["context"], row["result"]
                segment = (f"{path.stem}-{index:07d}", float(c0), float(c1), float(r0), float(r1), str(row["action"]))
                video = str((path.parent / row["video"]).resolve())
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"{where}: expected video, context [t0, t1], result [t2, t3], action ({exc!r})") from exc
            by_video[video].append(segment)
    return [(video, tuple(segments)) for video, segments in sorted(by_video.items())]


def _job(out, source, producer, tasks, settings, *, encoder, tokenizer, workers, device, batch_size, progress) -> Path:
    job = Job(
        source=source,
        kind="action",
        producer=producer,
        tokenizer=tokenizer,
        encoder=encoder,
        settings=settings,
        device=device,
        batch_size=batch_size,
    )
    return run_job(out, job, tasks, workers=workers, progress=progress)


def nwm_job(
    out: Path,
    source: str,
    inputs: list[Path],
    *,
    encoder: EncoderSpec,
    tokenizer: Tokenizer.Config,
    settings: NwmSettings = NwmSettings(),
    per_shard: int = 8,
    workers: int = 1,
    device: str = "cpu",
    batch_size: int = 32,
    progress: bool = True,
) -> Path:
    trajectories = find_trajectories(inputs)
    producer = functools.partial(nwm_samples, image_size=encoder.resolved_image_size, settings=settings)
    recorded = {"inputs": trajectories, **asdict(settings), "per_shard": per_shard}
    return _job(
        out, source, producer, chunked(trajectories, per_shard), recorded,
        encoder=encoder, tokenizer=tokenizer, workers=workers, device=device, batch_size=batch_size, progress=progress,
    )


def annotated_job(
    out: Path,
    source: str,
    inputs: list[Path],
    *,
    encoder: EncoderSpec,
    tokenizer: Tokenizer.Config,
    fps: float = 1.0,
    per_shard: int = 16,
    workers: int = 1,
    device: str = "cpu",
    batch_size: int = 32,
    progress: bool = True,
) -> Path:
    files = expand_inputs(inputs, (".jsonl", ".jsonl.gz"))
    items = annotation_items(files)
    producer = functools.partial(annotated_samples, image_size=encoder.resolved_image_size, fps=fps)
    recorded = {"inputs": [str(f) for f in files], "fps": fps, "per_shard": per_shard}
    tasks: list[ShardTask] = chunked(items, per_shard)
    return _job(
        out, source, producer, tasks, recorded,
        encoder=encoder, tokenizer=tokenizer, workers=workers, device=device, batch_size=batch_size, progress=progress,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    nwm = commands.add_parser("nwm", help="NWM-layout trajectory folders")
    annotated = commands.add_parser("annotated", help="videos with action annotations (JSONL)")
    add_job_arguments(nwm, per_shard=8)
    add_job_arguments(annotated, per_shard=16)
    for sub in (nwm, annotated):
        add_encoder_arguments(sub)
        sub.add_argument("inputs", nargs="+", type=Path)
    defaults = NwmSettings()
    nwm.add_argument("--context", type=int, default=defaults.context)
    nwm.add_argument("--frame-stride", type=int, default=defaults.frame_stride)
    nwm.add_argument("--horizon", type=int, default=defaults.horizon, help="target = last context frame + horizon")
    nwm.add_argument("--sample-stride", type=int, default=defaults.sample_stride)
    nwm.add_argument("--position-scale", type=float, default=defaults.position_scale)
    annotated.add_argument("--fps", type=float, default=1.0)
    args = parser.parse_args(argv)
    common = dict(**encoding_options(args), per_shard=args.per_shard)
    if args.command == "nwm":
        settings = NwmSettings(args.context, args.frame_stride, args.horizon, args.sample_stride, args.position_scale)
        manifest = nwm_job(args.out, args.source, args.inputs, settings=settings, **common)
    else:
        manifest = annotated_job(args.out, args.source, args.inputs, fps=args.fps, **common)
    print(f"wrote {manifest}")


if __name__ == "__main__":
    sys.exit(cli(main))
