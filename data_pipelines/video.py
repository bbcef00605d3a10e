"""Videos -> frames at 1 FPS -> clips of encoded frames (kind "video").

    python -m unimm.data_pipelines.video --out shards/video --source video --encoder siglip2 \\
        --encoder-path weights/siglip2 --clip-frames 8 --workers 8 --device cuda videos/

Paper §2.3: raw videos at 1 FPS, encoded frame by frame (each frame its own <boi>..<eoi>
block). PyAV decodes every frame and keeps the first at or after each multiple of 1/fps
seconds, so the sampled times do not depend on the source frame rate. The frames are cut into
clips of --clip-frames (a clip must fit one training row: 8 SigLIP frames are 8 x 258
positions of 4096); a shorter tail is kept if it has at least --min-clip-frames. An optional
same-named .txt file captions every clip of its video; without one the clip trains
unconditioned, as the paper's raw video does.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from unimm.data_pipelines.encoders import EncoderSpec, add_encoder_arguments, encoding_options
from unimm.data_pipelines.images import fit_square
from unimm.data_pipelines.records import expand_inputs
from unimm.data_pipelines.shard_job import Job, Record, Skip, add_job_arguments, chunked, cli, run_job
from unimm.errors import ConfigError
from unimm.tokenizer import Tokenizer

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov")


class UndecodableVideo(ValueError):
    pass


def sample_frames(path: str | Path, fps: float, image_size: int) -> tuple[list[float], np.ndarray]:
    """(times in seconds, uint8 [F, S, S, 3]) of the frames at `fps`, fitted to S x S."""
    import av

    times: list[float] = []
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            step = 1.0 / fps
            due = 0  # index of the next sampling time, due * step
            for frame in container.decode(stream):
                if frame.time is None or frame.time + 1e-6 < due * step:
                    continue
                times.append(float(frame.time))
                frames.append(fit_square(frame.to_image(), image_size))
                due = math.floor(frame.time / step + 1e-6) + 1
    except (av.error.FFmpegError, IndexError, OSError) as exc:  # no video stream, corrupt data
        raise UndecodableVideo(f"undecodable video ({exc!r})") from exc
    if not frames:
        raise UndecodableVideo("no decodable frames")
    return times, np.stack(frames)


def clips(path: str, *, fps: float, image_size: int, clip_frames: int, min_clip_frames: int) -> Iterator[Record | Skip]:
    video = Path(path)
    try:
        times, frames = sample_frames(video, fps, image_size)
    except UndecodableVideo as exc:
        yield Skip(video.name, str(exc))
        return
    caption_file = video.with_suffix(".txt")
    caption = caption_file.read_text(encoding="utf-8", errors="replace").strip() if caption_file.is_file() else ""
    for clip, start in enumerate(range(0, len(frames), clip_frames)):
        part = frames[start : start + clip_frames]
        if len(part) < min_clip_frames:
            continue
        meta = {"file": path, "clip": clip, "start_s": times[start], "fps": fps, "caption": caption}
        yield Record(f"{video.stem}-clip{clip:05d}", meta, caption, part)


def video_job(
    out: Path,
    source: str,
    inputs: list[Path],
    *,
    encoder: EncoderSpec,
    tokenizer: Tokenizer.Config,
    fps: float = 1.0,
    clip_frames: int = 8,
    min_clip_frames: int = 2,
    per_shard: int = 16,
    workers: int = 1,
    device: str = "cpu",
    batch_size: int = 32,
    progress: bool = True,
) -> Path:
    if fps <= 0 or not 1 <= min_clip_frames <= clip_frames:
        raise ConfigError(f"need fps > 0 and 1 <= min_clip_frames <= clip_frames, got {fps}, {min_clip_frames}, {clip_frames}")
    videos = [str(v) for v in expand_inputs(inputs, VIDEO_SUFFIXES)]
    producer = functools.partial(
        clips, fps=fps, image_size=encoder.resolved_image_size, clip_frames=clip_frames, min_clip_frames=min_clip_frames
    )
    job = Job(
        source=source,
        kind="video",
        producer=producer,
        tokenizer=tokenizer,
        encoder=encoder,
        settings={
            "inputs": videos,
            "fps": fps,
            "clip_frames": clip_frames,
            "min_clip_frames": min_clip_frames,
            "per_shard": per_shard,
        },
        device=device,
        batch_size=batch_size,
    )
    return run_job(out, job, chunked(videos, per_shard), workers=workers, progress=progress)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser, per_shard=16)
    add_encoder_arguments(parser)
    parser.add_argument("--fps", type=float, default=1.0)
    parser.add_argument("--clip-frames", type=int, default=8)
    parser.add_argument("--min-clip-frames", type=int, default=2)
    parser.add_argument("inputs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    manifest = video_job(
        args.out,
        args.source,
        args.inputs,
        **encoding_options(args),
        fps=args.fps,
        clip_frames=args.clip_frames,
        min_clip_frames=args.min_clip_frames,
        per_shard=args.per_shard,
    )
    print(f"wrote {manifest}")


if __name__ == "__main__":
    sys.exit(cli(main))
