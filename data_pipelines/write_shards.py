"""Write procedural datasets as shards: one job folder per source, plus a mixture manifest.

    python -m unimm.data_pipelines.write_shards --out DIR --count text=1000 --count image_text=1000 \\
        --count video=200 --count action=200 --encoder raw_pixels --image-size 32 --patch 8 --seed 0

    # seed 000's transfer sets in every view, out-of-distribution split, SigLIP 2 latents
    python -m unimm.data_pipelines.write_shards --out ood --seed 2 --ood --encoder siglip2 \\
        --encoder-path weights/siglip2 --count spatialmap_understanding=500 \\
        --count spatialmap_text=500 --count grid_understanding=500 --count ring_generation=500

Sources (the names --count and the loader's source_weights use):

    text, image_text, video          procedural.py: sentences, 1-3 shapes with a caption, a moving shape
    single_object                    image_text: one shape anywhere, "a red circle"
    single_object_centred            the same, one large shape near the centre (the demo's source)
    action                           navigation.py: 4 context views, an action, the target view
    {set}_understanding              image_text, i2t only: [image] question_direct solution_direct
    {set}_text                       text: question solution
    {set}_generation                 image_text, t2i only: caption [image]
      set: spatialmap, grid, ring (reasoning.py), counting, diagonal, text_rendering (probes.py)

--understanding-encoder NAME (dual encoder, image_text.py) also writes that encoder's latents for
the image_text sources; e.g. --understanding-encoder raw_pixels --understanding-image-size 16
--understanding-patch 4 beside --encoder raw_pixels --image-size 32 --patch 8 is a CPU-sized
stand-in for SigLIP 2 (224 px) beside SD-VAE (256 px): the same 16 tokens per frame, other
widths (48 and 192), and another input size.

DIR/{source}/ holds each source's shards and manifest (see shard_job.py); DIR/manifest.json
lists them all. Samples are rendered at the encoder's input size, and sample i of a source is
a pure function of (seed, i): one seed per split (seed 000 uses 4,500 train / 500 test).
"""

from __future__ import annotations

import argparse
import errno
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from unimm.data_pipelines import navigation, probes, procedural, reasoning
from unimm.data_pipelines.encoders import (
    EncoderSpec,
    add_encoder_arguments,
    add_understanding_encoder_arguments,
    encoding_options,
    understanding_spec,
)
from unimm.data_pipelines.mix import mix_manifests
from unimm.data_pipelines.shard_job import Job, Record, ShardTask, cli, run_job
from unimm.errors import ConfigError
from unimm.tokenizer import Tokenizer

# Bump when the generators or the layout change, so cached folders from older code are not reused.
CACHE_VERSION = 2


@dataclass(frozen=True)
class RenderSettings:
    image_size: int
    video_frames: int = 4
    ood: bool = False


def _text(i: int, seed: int, st: RenderSettings) -> Record:
    s = procedural.text_sample(i, seed)
    return Record(f"text-{i:08d}", {"text": s["text"], "objects": [o.to_json() for o in s["objects"]]}, s["text"])


def _image(i: int, seed: int, st: RenderSettings) -> Record:
    s = procedural.image_sample(i, seed, st.image_size)
    meta = {"caption": s["caption"], "objects": [o.to_json() for o in s["objects"]], "image_size": st.image_size}
    return Record(f"image-{i:08d}", meta, s["caption"], s["image"][None])


def _single_object(i: int, seed: int, st: RenderSettings, layout: str = "anywhere") -> Record:
    s = procedural.single_object_sample(i, seed, st.image_size, layout)
    meta = {"caption": s["caption"], "objects": [o.to_json() for o in s["objects"]], "image_size": st.image_size}
    return Record(f"single-object-{i:08d}", meta, s["caption"], s["image"][None])


def _video(i: int, seed: int, st: RenderSettings) -> Record:
    s = procedural.video_sample(i, seed, st.image_size, st.video_frames)
    meta = {k: v for k, v in s.items() if k != "frames"}
    return Record(f"video-{i:08d}", {**meta, "image_size": st.image_size}, s["caption"], s["frames"])


def _action(i: int, seed: int, st: RenderSettings) -> Record:
    s = navigation.navigation_sample(i, seed, st.image_size)
    meta = {k: v for k, v in s.items() if k != "frames"}
    return Record(f"action-{i:08d}", meta, s["action"], s["frames"])


TASK_SETS: dict[str, Callable[..., procedural.TaskSample]] = {
    "spatialmap": reasoning.spatialmap,
    "grid": reasoning.grid,
    "ring": reasoning.ring,
    "counting": probes.counting,
    "diagonal": probes.diagonal,
    "text_rendering": probes.text_rendering,
}
_OOD_SETS = {"spatialmap", "grid", "ring"}  # seed 003's sets have no OOD split
VIEWS = {"understanding": ("image_text", ("i2t",)), "text": ("text", ()), "generation": ("image_text", ("t2i",))}


def _task_view(i: int, seed: int, st: RenderSettings, *, name: str, view: str) -> Record:
    kwargs = {"ood": st.ood} if name in _OOD_SETS else {}
    s = TASK_SETS[name](i, seed, st.image_size, **kwargs)
    fields = {k: v for k, v in asdict(s).items() if k != "image"}
    meta = {**fields, "set": name, "view": view, "ood": st.ood}
    key = f"{name}-{i:08d}"
    if view == "understanding":
        return Record(key, meta, f"{s.question_direct}\n{s.solution_direct}", s.image[None])
    if view == "text":
        return Record(key, meta, f"{s.question}\n{s.solution}")
    return Record(key, meta, s.caption, s.image[None])


@dataclass(frozen=True)
class ProceduralSource:
    kind: str
    directions: tuple[str, ...]
    make: Callable[[int, int, RenderSettings], Record]


SOURCES: dict[str, ProceduralSource] = {
    "text": ProceduralSource("text", (), _text),
    "image_text": ProceduralSource("image_text", ("i2t", "t2i"), _image),
    "single_object": ProceduralSource("image_text", ("i2t", "t2i"), _single_object),
    "single_object_centred": ProceduralSource(
        "image_text", ("i2t", "t2i"), functools.partial(_single_object, layout="centred")
    ),
    "video": ProceduralSource("video", (), _video),
    "action": ProceduralSource("action", (), _action),
    **{
        f"{name}_{view}": ProceduralSource(kind, directions, functools.partial(_task_view, name=name, view=view))
        for name in TASK_SETS
        for view, (kind, directions) in VIEWS.items()
    },
}


def generate(item: tuple[int, int], *, source: str, seed: int, settings: RenderSettings) -> Iterator[Record]:
    start, stop = item
    for i in range(start, stop):
        yield SOURCES[source].make(i, seed, settings)


def write_procedural(
    out: str | Path,
    counts: dict[str, int],
    *,
    encoder: EncoderSpec,
    tokenizer: Tokenizer.Config,
    seed: int = 0,
    video_frames: int = 4,
    ood: bool = False,
    samples_per_shard: int = 1000,
    workers: int = 1,
    device: str = "cpu",
    batch_size: int = 32,
    progress: bool = True,
    understanding_encoder: EncoderSpec | None = None,
) -> Path:
    """Every source with a positive count into out/{source}/, then out/manifest.json.
    ``understanding_encoder``: also its latents for the image_text sources (dual encoder)."""
    unknown = sorted(set(counts) - set(SOURCES))
    if unknown:
        raise ConfigError(f"unknown procedural sources {unknown}; known: {', '.join(SOURCES)}")
    out = Path(out)
    settings = RenderSettings(encoder.resolved_image_size, video_frames, ood)
    folders = []
    for name, count in counts.items():
        if count <= 0:
            continue
        source = SOURCES[name]
        ranges = [(s, min(s + samples_per_shard, count)) for s in range(0, count, samples_per_shard)]
        job = Job(
            source=name,
            kind=source.kind,
            producer=functools.partial(generate, source=name, seed=seed, settings=settings),
            tokenizer=tokenizer,
            encoder=None if source.kind == "text" else encoder,
            directions=source.directions,
            settings={"procedural": name, "count": count, "seed": seed, **asdict(settings)},
            device=device,
            batch_size=batch_size,
            understanding_encoder=understanding_encoder if source.kind == "image_text" else None,
        )
        run_job(out / name, job, [ShardTask(i, (r,)) for i, r in enumerate(ranges)], workers=workers, progress=progress)
        folders.append(out / name)
    return mix_manifests(out, folders)


@dataclass(frozen=True)
class ProceduralSettings:
    """The default mixture the loader generates when no shards are given."""

    num_images: int = 1000
    num_videos: int = 200
    num_texts: int = 1000
    num_actions: int = 200
    image_size: int = 32
    patch: int = 8
    video_frames: int = 4
    samples_per_shard: int = 1000
    seed: int = 0  # one seed per split (e.g. 0 train, 1 test)
    understanding_image_size: int = 0
    understanding_patch: int = 0
    """Dual encoder: raw-pixel understanding latents of the image_text images at this size
    and patch (0: none, one encoder)."""


def procedural_folder_name(settings: ProceduralSettings, tokenizer: Tokenizer) -> str:
    fields = asdict(settings)
    if not settings.understanding_patch:  # one encoder: the key (and folder) of before dual encoders
        del fields["understanding_image_size"], fields["understanding_patch"]
    key = {"format": CACHE_VERSION, **fields, "tokenizer": tokenizer.fingerprint}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return f"procedural-{digest[:12]}"


def ensure_procedural_shards(cache_dir: str | Path, tokenizer: Tokenizer.Config | None = None, **settings) -> Path:
    """Return a folder with manifest.json for these settings, generating it once.

    Generation happens in a private temporary folder that is renamed into place, so readers
    never see a half-written folder. When several processes (e.g. all ranks of a job) race,
    each generates, exactly one rename wins, and the others discard their copy and use the
    winner's: the content is identical because generation is deterministic.
    """
    resolved = ProceduralSettings(**settings)  # defaults filled in, so the key does not depend on spelling
    tokenizer = tokenizer or Tokenizer.Config()
    cache_dir = Path(cache_dir).expanduser()
    final = cache_dir / procedural_folder_name(resolved, Tokenizer(tokenizer))
    if (final / "manifest.json").is_file():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=cache_dir))
    counts = {
        "text": resolved.num_texts,
        "image_text": resolved.num_images,
        "video": resolved.num_videos,
        "action": resolved.num_actions,
    }
    try:
        write_procedural(
            tmp,
            counts,
            encoder=EncoderSpec("raw_pixels", image_size=resolved.image_size, patch=resolved.patch),
            tokenizer=tokenizer,
            seed=resolved.seed,
            video_frames=resolved.video_frames,
            samples_per_shard=resolved.samples_per_shard,
            progress=False,
            understanding_encoder=EncoderSpec(
                "raw_pixels", image_size=resolved.understanding_image_size or resolved.image_size,
                patch=resolved.understanding_patch,
            ) if resolved.understanding_patch else None,
        )
        os.rename(tmp, final)
    except OSError as exc:
        # Renaming a directory onto a non-empty one fails: another process got there first.
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (final / "manifest.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _count(text: str) -> tuple[str, int]:
    name, _, n = text.partition("=")
    if not n.isdigit():
        raise argparse.ArgumentTypeError(f"expected SOURCE=N, got {text!r}")
    return name, int(n)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--count", type=_count, action="append", help="SOURCE=N (repeat); default: the loader's mix")
    parser.add_argument("--seed", type=int, default=0, help="one seed per split (e.g. 0 train, 1 test)")
    parser.add_argument("--ood", action="store_true", help="seed 000's out-of-distribution parameters")
    parser.add_argument("--video-frames", type=int, default=4)
    parser.add_argument("--tokenizer", default="", help="sentencepiece .model or tokenizer.json; empty: bytes")
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    parser.add_argument("--workers", type=int, default=1)
    add_encoder_arguments(parser)
    add_understanding_encoder_arguments(parser)
    args = parser.parse_args(argv)
    defaults = ProceduralSettings()
    counts = dict(args.count or [("text", defaults.num_texts), ("image_text", defaults.num_images),
                                 ("video", defaults.num_videos), ("action", defaults.num_actions)])
    manifest = write_procedural(
        args.out,
        counts,
        **encoding_options(args),
        seed=args.seed,
        video_frames=args.video_frames,
        ood=args.ood,
        samples_per_shard=args.per_shard,
        understanding_encoder=understanding_spec(args),
    )
    print(f"wrote {manifest}")


if __name__ == "__main__":
    sys.exit(cli(main))
