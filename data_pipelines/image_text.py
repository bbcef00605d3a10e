"""Image-text pairs -> latents + caption tokens (kind "image_text").

    python -m unimm.data_pipelines.image_text --out shards/metaclip --source metaclip \\
        --directions i2t --encoder siglip2 --encoder-path weights/siglip2-so400m-224 \\
        --tokenizer tok.model --workers 4 --device cuda pairs/ part-0000.tar rows.parquet

Inputs: a folder of images (jpg, png, webp, ...) each with a same-named .txt caption; webdataset
tars (an image member and a ``txt`` caption, or a ``json`` one with --caption-field); Parquet
files (--image-column holding bytes or a {"bytes": ...} struct as Hugging Face datasets store
images, --caption-field). Images are resized on the short side and centre-cropped to the
encoder's input. Undecodable images and empty captions are skipped, counted and logged.

--directions says what the source trains: i2t (captioning: the image conditions the caption),
t2i (generation: the caption conditions the image), or both. The paper uses MetaCLIP for i2t
and Shutterstock for t2i (§4.2); every sample carries its source's directions and the loader
lays it out accordingly.

Dual encoder (paper §6.3's baseline, as in Janus and Bagel): --understanding-encoder NAME
(with --understanding-encoder-path, --understanding-image-size) writes that encoder's latents
beside --encoder's for every image, each from the image fitted to its own encoder's input:

    python -m unimm.data_pipelines.image_text --out shards/cc --source cc --directions i2t,t2i \
        --encoder sd_vae --encoder-path weights/sd-vae \
        --understanding-encoder siglip2 --understanding-encoder-path weights/siglip2 ... pairs/

The loader feeds an image the model reads (I->T) with the understanding latents, an image it
generates (T->I) with the --encoder's; the manifest records both encoders.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import webdataset as wds

from unimm.data_pipelines.encoders import (
    EncoderSpec,
    add_encoder_arguments,
    add_understanding_encoder_arguments,
    encoding_options,
    understanding_spec,
)
from unimm.data_pipelines.images import IMAGE_SUFFIXES, UndecodableImage, decode_image, fit_square
from unimm.data_pipelines.records import count_records, read_records
from unimm.data_pipelines.shard_job import Job, Record, ShardTask, Skip, add_job_arguments, chunked, cli, run_job
from unimm.errors import ConfigError
from unimm.tokenizer import Tokenizer


def _pair(
    key: str, image: bytes | None, caption: Any, meta: dict, image_size: int, understanding_size: int = 0
) -> Record | Skip:
    caption = caption.strip() if isinstance(caption, str) else ""
    if not caption:
        return Skip(key, "empty caption")
    if not image:
        return Skip(key, "missing image")
    try:
        decoded = decode_image(image)
    except UndecodableImage as exc:
        return Skip(key, str(exc))
    pixels = fit_square(decoded, image_size)
    # dual encoder: the understanding encoder's input from the original image, not a resized crop
    understanding = fit_square(decoded, understanding_size)[None] if understanding_size else None
    return Record(key, {**meta, "caption": caption}, caption, pixels[None], understanding)


def _folder_pairs(path: str) -> Iterator[tuple[str, bytes, Any, dict]]:
    image = Path(path)
    caption_file = image.with_suffix(".txt")
    caption = caption_file.read_text(encoding="utf-8", errors="replace") if caption_file.is_file() else None
    yield image.stem, image.read_bytes(), caption, {"file": path}


def _tar_pairs(path: str, caption_field: str) -> Iterator[tuple[str, bytes | None, Any, dict] | Skip]:
    errors: list[Exception] = []

    def keep_going(exc: Exception) -> bool:  # a damaged input tar: keep what came before the damage
        errors.append(exc)
        return True

    with open(path, "rb") as stream:
        files = wds.tariterators.tar_file_expander([{"url": path, "stream": stream}], handler=keep_going)
        for sample in wds.tariterators.group_by_keys(files, handler=keep_going):
            key = sample["__key__"]
            image = next((sample[e] for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
            caption = None
            if "txt" in sample:
                caption = sample["txt"].decode("utf-8", errors="replace")
            elif "json" in sample:
                try:
                    caption = json.loads(sample["json"]).get(caption_field)
                except (ValueError, AttributeError) as exc:
                    yield Skip(key, f"undecodable json ({exc!r})")
                    continue
            yield key, image, caption, {"file": path, "key": key}
    for exc in errors:
        yield Skip(path, f"unreadable tar data ({exc!r})")


def _parquet_pairs(path: str, start: int, stop: int, caption_field: str, image_column: str):
    for index, row, reason in read_records(Path(path), start, stop):
        key = f"{Path(path).stem}-{index:09d}"
        image = None if row is None else row.get(image_column)
        if isinstance(image, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
            image = image.get("bytes")
        caption = None if row is None else row.get(caption_field)
        yield key, image, caption, {"file": path, "index": index}


def pairs(
    item: tuple, *, image_size: int, caption_field: str, image_column: str, understanding_size: int = 0
) -> Iterator[Record | Skip]:
    kind, path = item[0], item[1]
    if kind == "image":
        found = _folder_pairs(path)
    elif kind == "tar":
        found = _tar_pairs(path, caption_field)
    else:
        found = _parquet_pairs(path, item[2], item[3], caption_field, image_column)
    for found_pair in found:
        yield found_pair if isinstance(found_pair, Skip) else _pair(*found_pair, image_size, understanding_size)


def plan(inputs: list[Path], per_shard: int) -> list[ShardTask]:
    """Folders: runs of --per-shard images; tars: one task each; Parquet: row ranges."""
    images: list[tuple] = []
    tasks: list[tuple] = []
    for p in (Path(i).expanduser() for i in inputs):
        if p.is_dir():
            images += [("image", str(f)) for f in sorted(p.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
        elif p.suffix == ".tar":
            tasks.append((("tar", str(p)),))
        elif p.suffix == ".parquet":
            n = count_records(p)
            tasks += [(("parquet", str(p), s, min(s + per_shard, n)),) for s in range(0, n, per_shard)]
        else:
            raise ConfigError(f"input {p}: expected a folder of images, a .tar or a .parquet file")
    tasks += [t.items for t in chunked(images, per_shard)]
    if not tasks:
        raise ConfigError(f"no image-text inputs found in {[str(i) for i in inputs]}")
    return [ShardTask(i, items) for i, items in enumerate(tasks)]


def image_text_job(
    out: Path,
    source: str,
    inputs: list[Path],
    *,
    directions: tuple[str, ...],
    encoder: EncoderSpec,
    tokenizer: Tokenizer.Config,
    caption_field: str = "caption",
    image_column: str = "image",
    per_shard: int = 1000,
    workers: int = 1,
    device: str = "cpu",
    batch_size: int = 32,
    progress: bool = True,
    understanding_encoder: EncoderSpec | None = None,
) -> Path:
    """``understanding_encoder``: also write its latents (dual encoder; module docs)."""
    tasks = plan(inputs, per_shard)
    producer = functools.partial(
        pairs, image_size=encoder.resolved_image_size, caption_field=caption_field, image_column=image_column,
        **({"understanding_size": understanding_encoder.resolved_image_size} if understanding_encoder else {}),
    )
    job = Job(
        source=source,
        kind="image_text",
        producer=producer,
        tokenizer=tokenizer,
        encoder=encoder,
        directions=tuple(directions),
        settings={
            "inputs": [str(i) for i in inputs],
            "caption_field": caption_field,
            "image_column": image_column,
            "per_shard": per_shard,
        },
        device=device,
        batch_size=batch_size,
        understanding_encoder=understanding_encoder,
    )
    return run_job(out, job, tasks, workers=workers, progress=progress)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(parser, per_shard=1000)
    add_encoder_arguments(parser)
    add_understanding_encoder_arguments(parser)
    parser.add_argument("--directions", default="i2t,t2i", help="i2t, t2i or i2t,t2i (checked by the job)")
    parser.add_argument("--caption-field", default="caption", help="caption key in json members / Parquet")
    parser.add_argument("--image-column", default="image", help="Parquet column with the image bytes")
    parser.add_argument("inputs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    manifest = image_text_job(
        args.out,
        args.source,
        args.inputs,
        directions=tuple(d.strip() for d in args.directions.split(",") if d.strip()),
        **encoding_options(args),
        caption_field=args.caption_field,
        image_column=args.image_column,
        per_shard=args.per_shard,
        understanding_encoder=understanding_spec(args),
    )
    print(f"wrote {manifest}")


if __name__ == "__main__":
    sys.exit(cli(main))
