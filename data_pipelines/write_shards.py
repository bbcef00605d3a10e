"""Write the procedural datasets as webdataset shards plus a manifest.json.

Layout of an output folder::

    manifest.json          latent_dim, tokens_per_frame, encoder, patch, image_size, sources, counts
    text-000000.tar        {key}.json                     kind "text", field "text"
    image_text-000000.tar  {key}.json, {key}.latents.npy  kind "image_text", field "caption"; [1, N, C]
    video-000000.tar       {key}.json, {key}.latents.npy  kind "video", field "caption"; [F, N, C]

Shard paths in the manifest are relative to it, so a folder can be moved or copied whole.
Latents are stored as float16: raw pixels are k/127.5 - 1, which float16 keeps exactly enough
to decode back to the same uint8 values, at half the disk of float32.

    python -m unimm.data_pipelines.write_shards --out DIR --num-images 1000 --num-videos 200 \
        --num-texts 1000 --image-size 32 --patch 8 --seed 0
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm
from unimm.data_pipelines import procedural
from unimm.data_pipelines.raw_pixels import RawPixels

# Bump when the generators or the layout change, so cached folders from older code are not reused.
FORMAT_VERSION = 1


def _text_samples(n: int, seed: int, encoder: RawPixels, frames: int) -> Iterator[dict]:
    for i in range(n):
        s = procedural.text_sample(i, seed)
        yield {
            "__key__": f"text-{i:08d}",
            "json": {"kind": "text", "text": s["text"], "objects": [o.to_json() for o in s["objects"]]},
        }


def _image_samples(n: int, seed: int, encoder: RawPixels, frames: int) -> Iterator[dict]:
    for i in range(n):
        s = procedural.image_sample(i, seed, encoder.image_size)
        yield {
            "__key__": f"image-{i:08d}",
            "json": {
                "kind": "image_text",
                "caption": s["caption"],
                "objects": [o.to_json() for o in s["objects"]],
                "image_size": encoder.image_size,
            },
            "latents.npy": encoder.encode(s["image"][None]).astype(np.float16),
        }


def _video_samples(n: int, seed: int, encoder: RawPixels, frames: int) -> Iterator[dict]:
    for i in range(n):
        s = procedural.video_sample(i, seed, encoder.image_size, frames)
        meta = {k: v for k, v in s.items() if k != "frames"}
        yield {
            "__key__": f"video-{i:08d}",
            "json": {"kind": "video", **meta, "image_size": encoder.image_size},
            "latents.npy": encoder.encode(s["frames"]).astype(np.float16),
        }


_GENERATORS: dict[str, Callable[[int, int, RawPixels, int], Iterator[dict]]] = {
    "text": _text_samples,
    "image_text": _image_samples,
    "video": _video_samples,
}


@dataclass(frozen=True)
class ProceduralSettings:
    num_images: int = 1000
    num_videos: int = 200
    num_texts: int = 1000
    image_size: int = 32
    patch: int = 8
    video_frames: int = 4
    samples_per_shard: int = 1000
    seed: int = 0  # one seed per split (e.g. 0 train, 1 test)


def write_procedural_shards(out: str | Path, settings: ProceduralSettings, *, progress: bool = True) -> Path:
    """Generate everything into `out` (created if needed); returns the manifest path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    encoder = RawPixels(settings.image_size, settings.patch)
    counts = {"text": settings.num_texts, "image_text": settings.num_images, "video": settings.num_videos}
    sources: dict[str, list[str]] = {}
    bar = tqdm(total=sum(counts.values()), desc=f"procedural shards -> {out}", disable=not progress)
    for kind, count in counts.items():
        written: list[str] = []
        if count > 0:  # ShardWriter opens its first tar eagerly; an empty source gets no file
            pattern = str(out / f"{kind}-%06d.tar")
            with wds.ShardWriter(
                pattern, maxcount=settings.samples_per_shard, verbose=0, post=written.append
            ) as sink:
                for sample in _GENERATORS[kind](count, settings.seed, encoder, settings.video_frames):
                    sink.write(sample)
                    bar.update()
        sources[kind] = [Path(fname).name for fname in written]
    bar.close()
    manifest = {
        "latent_dim": encoder.latent_dim,
        "tokens_per_frame": encoder.tokens_per_frame,
        "encoder": "raw_pixels",
        "patch": settings.patch,
        "image_size": settings.image_size,
        "video_frames": settings.video_frames,
        "latent_dtype": "float16",
        "seed": settings.seed,
        "sources": sources,
        "counts": counts,
    }
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def procedural_folder_name(settings: ProceduralSettings) -> str:
    digest = hashlib.sha256(
        json.dumps({"format": FORMAT_VERSION, **asdict(settings)}, sort_keys=True).encode()
    ).hexdigest()
    return f"procedural-{digest[:12]}"


def ensure_procedural_shards(cache_dir: str | Path, **settings) -> Path:
    """Return a folder with manifest.json for these settings, generating it once.

    Generation happens in a private temporary folder that is renamed into place, so readers
    never see a half-written folder. When several processes (e.g. all ranks of a job) race,
    each generates, exactly one rename wins, and the others discard their copy and use the
    winner's: the content is identical because generation is deterministic.
    """
    resolved = ProceduralSettings(**settings)  # defaults filled in, so the key does not depend on spelling
    cache_dir = Path(cache_dir).expanduser()
    final = cache_dir / procedural_folder_name(resolved)
    if (final / "manifest.json").is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=cache_dir))
    try:
        write_procedural_shards(tmp, resolved, progress=False)
        os.rename(tmp, final)
    except OSError as exc:
        # Renaming a directory onto a non-empty one fails: another process got there first.
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (final / "manifest.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = ProceduralSettings()
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--num-images", type=int, default=defaults.num_images)
    parser.add_argument("--num-videos", type=int, default=defaults.num_videos)
    parser.add_argument("--num-texts", type=int, default=defaults.num_texts)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--patch", type=int, default=defaults.patch)
    parser.add_argument("--video-frames", type=int, default=defaults.video_frames)
    parser.add_argument("--samples-per-shard", type=int, default=defaults.samples_per_shard)
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="one seed per split (e.g. 0 train, 1 test)"
    )
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    manifest = write_procedural_shards(out, ProceduralSettings(**args))
    print(f"wrote {manifest}")


if __name__ == "__main__":
    main()
