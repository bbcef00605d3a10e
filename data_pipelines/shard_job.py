"""The engine every offline job runs on: shard tasks -> worker processes -> shards + manifest.

A job turns its inputs into `ShardTask`s up front (task i always holds the same inputs, so
task i always becomes shard i). A producer turns one input item into `Record`s (the sample's
json, its one text field and, for visual kinds, its frames as uint8 pixels at the encoder's
size) or `Skip`s (an input that cannot be used: counted, logged with its key, never fatal).
Workers tokenise the text, encode the frames in batches, and write::

    {source}-{i:06d}.tar          {key}.json         kind, ground truth, provenance, num_tokens
                                  {key}.tokens.npy   uint32 ids of the sample's text field
                                  {key}.latents.npy  float16 [F, N, C] (visual kinds)
                                  {key}.understanding_latents.npy  float16 [F, N_u, C_u]
                                                     (image_text with an understanding encoder)
    {source}-{i:06d}.stats.json   samples, skipped, tokens per modality, latent channel sums
    job.json                      what this folder is being written from
    manifest.json                 see `write_manifest`; written when every task is done

Safe re-runs: each tar is written under a temporary name and renamed, then its stats file
(the "done" marker) likewise, so a killed job leaves no half shard under a real name. A re-run
with the same job.json skips tasks that have a stats file. Once a task is done, a run with
different settings, inputs, encoder or tokenizer refuses to touch the folder; while none is
(a job that failed before finishing a shard), a run with corrected settings takes it over.

Dual encoder (paper §6.3, as in Janus and Bagel): an image_text job given an
``understanding_encoder`` encodes every image with both encoders: ``latents.npy`` holds the
generation encoder's (e.g. SD-VAE; the flow head predicts these), ``understanding_latents.npy``
the understanding encoder's (e.g. SigLIP 2; what the model reads for I->T). The two may
differ in width, tokens per frame and input size: a producer may give the frames at the
understanding encoder's size (``Record.understanding_frames``), else they are resized from
the generation frames. The manifest records both (``write_manifest``).

Latents are stored as float16 (half the disk of float32; the semantic encoders' features and
VAE latents are far inside its range, and non-finite values are rejected when written).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from tqdm import tqdm

from unimm.data.doc_lengths import DocumentLengths, document_length
from unimm.data.latent_stats import ChannelStats
from unimm.data.shards import DIRECTIONS, KINDS, MANIFEST_FORMAT, TEXT_REQUIRED
from unimm.data_pipelines.encoders import Encoder, EncoderSpec, load_encoder
from unimm.data_pipelines.images import fit_square
from unimm.errors import ConfigError
from unimm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

LATENT_DTYPE = "float16"


@dataclass(frozen=True)
class Record:
    key: str
    meta: dict[str, Any]  # json fields: ground truth, provenance (kind is added by the engine)
    text: str  # the one text field the loader's document uses
    frames: np.ndarray | None = None  # uint8 [F, S, S, 3] at the encoder's image size
    understanding_frames: np.ndarray | None = None
    """uint8 [F, S_u, S_u, 3] at the understanding encoder's size (dual encoder); None: resized from `frames`."""


@dataclass(frozen=True)
class Skip:
    key: str
    reason: str


Producer = Callable[[Any], Iterator[Record | Skip]]


@dataclass(frozen=True)
class ShardTask:
    index: int
    items: tuple  # what the producer turns into records; plain data, so it pickles and hashes


@dataclass(frozen=True)
class Job:
    source: str
    kind: str
    producer: Producer  # a module-level function or a partial of one (workers unpickle it)
    tokenizer: Tokenizer.Config
    encoder: EncoderSpec | None = None
    directions: tuple[str, ...] = ()
    """image_text: the directions this source trains (i2t captioning, t2i generation)."""

    settings: dict[str, Any] = field(default_factory=dict)
    """The job's inputs and options, recorded in the manifest and compared on re-runs."""

    max_text_tokens: int = 0
    """text: longer documents are cut into pieces of at most this many ids; other kinds:
    longer texts are skipped. 0: no limit."""

    device: str = "cpu"
    batch_size: int = 32  # frames per encoder call
    understanding_encoder: EncoderSpec | None = None
    """image_text only: a second encoder whose latents are written beside the encoder's
    (dual encoder: understanding latents for I->T, the encoder's for T->I)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown kind {self.kind!r}; known: {KINDS}")
        if self.understanding_encoder is not None and self.kind != "image_text":
            raise ConfigError(f"kind {self.kind!r}: an understanding encoder is only for image_text sources")
        if (self.kind == "text") != (self.encoder is None):
            raise ConfigError(f"kind {self.kind!r}: an encoder is needed exactly for visual kinds")
        if self.kind == "image_text" and (not self.directions or set(self.directions) - set(DIRECTIONS)):
            raise ConfigError(f"image_text directions must be a non-empty subset of {DIRECTIONS}, got {self.directions}")
        if "/" in self.source or not self.source:
            raise ConfigError(f"source name {self.source!r} must be a non-empty file-name part")


def shard_name(source: str, index: int) -> str:
    return f"{source}-{index:06d}"


@dataclass
class ShardStats:
    samples: int = 0
    skipped: int = 0
    text_tokens: int = 0
    vision_tokens: int = 0
    latent_shape: list[int] | None = None  # [N, C]
    latents: ChannelStats | None = None
    lengths: DocumentLengths | None = field(default_factory=DocumentLengths)
    """Document lengths (None in stats written before they were counted)."""
    understanding_shape: list[int] | None = None  # [N_u, C_u] of the understanding latents (dual encoder)
    understanding: ChannelStats | None = None

    def add(
        self, ids: np.ndarray, latents: np.ndarray | None, key: str = "", understanding: np.ndarray | None = None
    ) -> None:
        self.samples += 1
        self.text_tokens += len(ids)
        if self.lengths is not None:
            frames, per_frame = latents.shape[:2] if latents is not None else (0, 0)
            if understanding is not None:  # a frame is laid out with either encoder's tokens
                per_frame = max(per_frame, understanding.shape[1])
            self.lengths.add(document_length(len(ids), frames, per_frame), key)
        if latents is not None:
            self.vision_tokens += latents.shape[0] * latents.shape[1]
            self.latent_shape = list(latents.shape[1:])
            if self.latents is None:
                self.latents = ChannelStats.empty(latents.shape[-1])
            self.latents.update(latents)
        if understanding is not None:
            self.understanding_shape = list(understanding.shape[1:])
            if self.understanding is None:
                self.understanding = ChannelStats.empty(understanding.shape[-1])
            self.understanding.update(understanding)

    def merge(self, other: ShardStats) -> ShardStats:
        def pooled(a: ChannelStats | None, b: ChannelStats | None) -> ChannelStats | None:
            return a.merge(b) if a is not None and b is not None else (a if a is not None else b)

        return ShardStats(
            self.samples + other.samples,
            self.skipped + other.skipped,
            self.text_tokens + other.text_tokens,
            self.vision_tokens + other.vision_tokens,
            self.latent_shape or other.latent_shape,
            pooled(self.latents, other.latents),
            None if self.lengths is None or other.lengths is None else self.lengths.merge(other.lengths),
            self.understanding_shape or other.understanding_shape,
            pooled(self.understanding, other.understanding),
        )

    def to_json(self) -> dict[str, Any]:
        data = {
            "samples": self.samples,
            "skipped": self.skipped,
            "tokens": {"text": self.text_tokens, "vision": self.vision_tokens},
            "latent_shape": self.latent_shape,
            "latents": None if self.latents is None else self.latents.to_json(),
        }
        if self.lengths is not None:
            data["document_lengths"] = self.lengths.to_json()
        if self.understanding is not None:
            data["understanding_shape"] = self.understanding_shape
            data["understanding_latents"] = self.understanding.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShardStats:
        latents = None if data["latents"] is None else ChannelStats.from_json(data["latents"])
        tokens = data["tokens"]
        lengths = DocumentLengths.from_json(data.get("document_lengths"))
        understanding = data.get("understanding_latents")
        return cls(
            data["samples"], data["skipped"], tokens["text"], tokens["vision"], data["latent_shape"], latents, lengths,
            data.get("understanding_shape"), None if understanding is None else ChannelStats.from_json(understanding),
        )


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, (json.dumps(data, indent=1) + "\n").encode())


class _Worker:
    """One process's encoder and tokenizer, loaded once, and the per-shard loop."""

    def __init__(self, job: Job, out: Path) -> None:
        self.job, self.out = job, out
        self.tokenizer = Tokenizer(job.tokenizer)
        self.encoder: Encoder | None = load_encoder(job.encoder, job.device) if job.encoder else None
        self.understanding: Encoder | None = (
            load_encoder(job.understanding_encoder, job.device) if job.understanding_encoder else None
        )

    def run(self, task: ShardTask) -> ShardStats:
        name = shard_name(self.job.source, task.index)
        stats = ShardStats()
        tar, tmp = self.out / f"{name}.tar", self.out / f".{name}.tar.tmp-{os.getpid()}"
        with wds.TarWriter(str(tmp)) as sink:
            for chunk in self._batches(self._tokenised(task, stats)):
                records = [r for r, _ in chunk]
                encoded = zip(chunk, self._encode(records), self._encode_understanding(records))
                for (record, ids), latents, understanding in encoded:
                    self._write(sink, record, ids, latents, stats, understanding)
        if stats.samples:
            os.replace(tmp, tar)
        else:  # nothing usable in these inputs: no shard, but the stats still mark the task done
            tmp.unlink()
        write_json(self.out / f"{name}.stats.json", stats.to_json())
        return stats

    def _skip(self, stats: ShardStats, key: str, reason: str) -> None:
        stats.skipped += 1
        logger.warning("source %s: skipping %s: %s", self.job.source, key, reason)

    def _tokenised(self, task: ShardTask, stats: ShardStats) -> Iterator[tuple[Record, np.ndarray]]:
        limit, kind = self.job.max_text_tokens, self.job.kind
        for item in task.items:
            for record in self.job.producer(item):
                if isinstance(record, Skip):
                    self._skip(stats, record.key, record.reason)
                    continue
                ids = np.asarray(self.tokenizer.encode(record.text), dtype=np.uint32)
                if kind in TEXT_REQUIRED and len(ids) == 0:
                    self._skip(stats, record.key, f"empty {TEXT_REQUIRED[kind]}")
                elif limit and len(ids) > limit and kind != "text":
                    self._skip(stats, record.key, f"{len(ids)} text tokens > {limit}")
                elif limit and len(ids) > limit:
                    # A long document becomes consecutive pieces that each fit a row.
                    for part, start in enumerate(range(0, len(ids), limit)):
                        piece = Record(f"{record.key}-part{part}", {**record.meta, "part": part}, "")
                        yield piece, ids[start : start + limit]
                else:
                    yield record, ids

    def _batches(self, pairs: Iterator[tuple[Record, np.ndarray]]) -> Iterator[list[tuple[Record, np.ndarray]]]:
        # Enough frames for one encoder call; text-only records go in groups of the same size.
        chunk: list[tuple[Record, np.ndarray]] = []
        frames = 0
        for pair in pairs:
            chunk.append(pair)
            frames += 1 if pair[0].frames is None else len(pair[0].frames)
            if frames >= self.job.batch_size:
                yield chunk
                chunk, frames = [], 0
        if chunk:
            yield chunk

    def _encode(self, records: list[Record]) -> list[np.ndarray | None]:
        if self.encoder is None:
            return [None] * len(records)
        size = self.encoder.image_size
        for r in records:
            if r.frames is None or r.frames.dtype != np.uint8 or r.frames.ndim != 4 or r.frames.shape[1:] != (size, size, 3):
                shape = None if r.frames is None else (r.frames.dtype, r.frames.shape)
                raise ValueError(f"record {r.key}: frames must be uint8 [F, {size}, {size}, 3], got {shape}")
        pixels = np.concatenate([r.frames for r in records])
        batch = self.job.batch_size
        latents = np.concatenate([self.encoder.encode(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])
        bounds = np.cumsum([0] + [len(r.frames) for r in records])
        return [latents[a:b].astype(LATENT_DTYPE) for a, b in zip(bounds[:-1], bounds[1:])]

    def _encode_understanding(self, records: list[Record]) -> list[np.ndarray | None]:
        """The understanding encoder's latents of each record's frames (dual encoder), from
        its `understanding_frames` or, without them, its frames resized to that encoder's input."""
        if self.understanding is None:
            return [None] * len(records)
        size = self.understanding.image_size
        pixels = []
        for r in records:
            frames = r.understanding_frames
            if frames is None:
                frames = r.frames if r.frames.shape[1] == size else np.stack([fit_square(f, size) for f in r.frames])
            if frames.dtype != np.uint8 or frames.shape != (len(r.frames), size, size, 3):
                raise ValueError(
                    f"record {r.key}: understanding frames must be uint8 [{len(r.frames)}, {size}, {size}, 3], "
                    f"got {frames.dtype} {list(frames.shape)}"
                )
            pixels.append(frames)
        pixels = np.concatenate(pixels)
        batch = self.job.batch_size
        latents = np.concatenate([self.understanding.encode(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])
        bounds = np.cumsum([0] + [len(r.frames) for r in records])
        return [latents[a:b].astype(LATENT_DTYPE) for a, b in zip(bounds[:-1], bounds[1:])]

    def _write(
        self, sink, record: Record, ids: np.ndarray, latents: np.ndarray | None, stats: ShardStats,
        understanding: np.ndarray | None = None,
    ) -> None:
        if latents is not None and not np.isfinite(latents).all():
            self._skip(stats, record.key, "non-finite latents")
            return
        if understanding is not None and not np.isfinite(understanding).all():
            self._skip(stats, record.key, "non-finite understanding latents")
            return
        meta = {**record.meta, "kind": self.job.kind, "num_tokens": len(ids)}
        if self.job.kind == "image_text":
            meta["directions"] = list(self.job.directions)
        # webdataset splits a file name at its first dot into key and extension.
        sample = {"__key__": record.key.replace(".", "_"), "json": meta, "tokens.npy": ids}
        if latents is not None:
            sample["latents.npy"] = latents
        if understanding is not None:
            sample["understanding_latents.npy"] = understanding
        sink.write(sample)
        stats.add(ids, latents, sample["__key__"], understanding)


_WORKER: _Worker | None = None
_WORKER_ERROR: BaseException | None = None


def _init_worker(job: Job, out: Path, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)  # workers share the cores instead of each taking all of them
    global _WORKER, _WORKER_ERROR
    try:
        _WORKER = _Worker(job, out)
    except Exception as exc:
        # An initializer that raises makes the pool start a new worker, forever: keep the
        # error and hand it to the parent with the first task instead.
        _WORKER_ERROR = exc


def _run_task(task: ShardTask) -> ShardStats:
    if _WORKER_ERROR is not None:
        raise _WORKER_ERROR
    assert _WORKER is not None
    return _WORKER.run(task)


def _identity(job: Job, tasks: list[ShardTask], tokenizer: Tokenizer) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps([[t.index, t.items] for t in tasks], default=str).encode()).hexdigest()
    identity = {
        "format": MANIFEST_FORMAT,
        "source": job.source,
        "kind": job.kind,
        "directions": list(job.directions),
        "encoder": None if job.encoder is None else job.encoder.latent_identity(),
        "tokenizer": tokenizer.fingerprint,
        "max_text_tokens": job.max_text_tokens,
        "settings": job.settings,
        "tasks": digest,
    }
    if job.understanding_encoder is not None:  # absent otherwise: folders written before it stay valid
        identity["understanding_encoder"] = job.understanding_encoder.latent_identity()
    return json.loads(json.dumps(identity, default=str))  # the form it has once read back


def _differences(old: Any, new: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) for every leaf where two job identities differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(old.keys() | new.keys()) for d in _differences(old.get(k), new.get(k), f"{key}.{k}" if key else k)]
    return [] if old == new else [(key, old, new)]


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _claim(out: Path, identity: dict[str, Any]) -> None:
    """Make `out` this job's folder. job.json binds once a task is done (has its stats file):
    until then nothing in the folder depends on the old settings, and a corrected run replaces them."""
    path = out / "job.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored == identity:
            return
        diffs = _differences(stored, identity)
        keys = sorted({k.split(".")[0] for k, _, _ in diffs})
        shown = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, a, b in diffs)
        done = sorted(out.glob("*.stats.json"))
        if done:
            raise ConfigError(
                f"{out} holds {len(done)} finished shard(s) written with different {', '.join(keys)} "
                f"(folder -> this run: {shown}): refusing to overwrite them. Rerun with the folder's "
                f"settings to finish it, write to a new --out folder, or delete {out} to start over"
            )
        # No task finished: what the old run left (shards renamed before their stats) is dropped.
        old_shard = re.compile(re.escape(str(stored.get("source", ""))) + r"-\d{6}\.tar")
        for leftover in out.iterdir():
            if old_shard.fullmatch(leftover.name) or leftover.name == "manifest.json":
                leftover.unlink()
        logger.warning("%s: no shard was finished under the old job.json; replacing it (%s)", out, shown)
    elif any(out.iterdir()):
        raise ConfigError(f"{out} is not empty and has no job.json: refusing to write shards into it")
    write_json(path, identity)


def run_job(out: str | Path, job: Job, tasks: list[ShardTask], *, workers: int = 1, progress: bool = True) -> Path:
    """Write every task's shard (skipping finished ones) and the manifest; returns its path."""
    out = Path(out).expanduser()
    if job.encoder is not None:
        job.encoder.check_weights()  # a wrong --encoder-path is refused before anything is written
    if job.understanding_encoder is not None:
        try:
            job.understanding_encoder.check_weights()
        except ConfigError as err:
            raise ConfigError(f"understanding {str(err).replace('--encoder-path', '--understanding-encoder-path', 1)}") from None
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(job.tokenizer)
    _claim(out, _identity(job, tasks, tokenizer))
    for stale in out.glob(".*.tmp-*"):  # left by a killed run; their tasks have no stats file
        stale.unlink()
    todo = [t for t in tasks if not (out / f"{shard_name(job.source, t.index)}.stats.json").is_file()]
    one_process = workers <= 1 or len(todo) <= 1
    worker = _Worker(job, out) if one_process and todo else None  # loads the encoder: may fail
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc=f"{job.source} -> {out}", unit="shard", disable=not progress)
    if one_process:
        for task in todo:
            worker.run(task)
            bar.update()
    else:
        threads = max(1, (os.cpu_count() or 1) // workers)
        # spawn, not fork: a forked copy of a process that has used torch's thread pools can hang.
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=(job, out, threads)) as pool:
            for _ in pool.imap_unordered(_run_task, todo):
                bar.update()
    bar.close()
    return write_manifest(out, job, tasks, tokenizer)


def write_manifest(out: Path, job: Job, tasks: list[ShardTask], tokenizer: Tokenizer) -> Path:
    """manifest.json of a one-source folder (`mix.py` combines several)::

    latent_dim, tokens_per_frame   of the stored latents (null for text)
    latent_dtype                   float16
    encoder                        name, path, image_size, patch (null for text)
    tokenizer                      kind, path, fingerprint, vocab_size, special_ids
    normalization                  per-channel count, sum, sum_sq, mean, std (null for text)
    sources                        {source: [shard tar names]}
    source_info                    {source: kind, directions, samples, skipped,
                                    tokens {text, vision}, settings,
                                    document_lengths {longest, longest_key, longest_shard,
                                    p50, p99, counts {length: samples}} (doc_lengths.py;
                                    absent when a shard's stats predate it),
                                    understanding_encoder (dual encoder only)}
    understanding                  dual encoder only (absent otherwise): the understanding
                                   encoder's encoder, latent_dim, tokens_per_frame and
                                   normalization, as above for the encoder's (generation) latents
    """
    total, shards = ShardStats(), []
    for task in tasks:
        name = shard_name(job.source, task.index)
        stats = ShardStats.from_json(json.loads((out / f"{name}.stats.json").read_text()))
        if stats.lengths is not None:
            stats.lengths.in_shard(f"{name}.tar")
        total = total.merge(stats)
        if stats.samples:
            shards.append(f"{name}.tar")
    tokens_per_frame, latent_dim = total.latent_shape or (None, None)
    manifest = {
        "format": MANIFEST_FORMAT,
        "latent_dim": latent_dim,
        "tokens_per_frame": tokens_per_frame,
        "latent_dtype": LATENT_DTYPE,
        "encoder": None if job.encoder is None else job.encoder.describe(),
        "tokenizer": tokenizer.describe(),
        "normalization": None if total.latents is None else total.latents.to_json(),
        "sources": {job.source: shards},
        "source_info": {
            job.source: {
                "kind": job.kind,
                "directions": list(job.directions),
                "samples": total.samples,
                "skipped": total.skipped,
                "tokens": {"text": total.text_tokens, "vision": total.vision_tokens},
                "settings": job.settings,
            }
        },
    }
    if total.lengths is not None:
        manifest["source_info"][job.source]["document_lengths"] = total.lengths.to_json()
    if job.understanding_encoder is not None:
        shape = total.understanding_shape or (None, None)
        manifest["understanding"] = {
            "encoder": job.understanding_encoder.describe(),
            "latent_dim": shape[1],
            "tokens_per_frame": shape[0],
            "normalization": None if total.understanding is None else total.understanding.to_json(),
        }
        manifest["source_info"][job.source]["understanding_encoder"] = job.understanding_encoder.name
    path = out / "manifest.json"
    write_json(path, json.loads(json.dumps(manifest, default=str)))
    return path


def chunked(items: list, size: int) -> list[ShardTask]:
    """Consecutive runs of `size` items as tasks 0, 1, ..."""
    if size <= 0:
        raise ConfigError(f"items per shard must be positive, got {size}")
    return [ShardTask(i, tuple(items[s : s + size])) for i, s in enumerate(range(0, len(items), size))]


def add_job_arguments(parser, *, per_shard: int) -> None:
    """Options every job has."""
    parser.add_argument("--out", required=True, type=Path, help="output folder (one source)")
    parser.add_argument("--source", required=True, help="source name, as the loader's source_weights know it")
    parser.add_argument("--tokenizer", default="", help="sentencepiece .model or tokenizer.json; empty: bytes")
    parser.add_argument("--workers", type=int, default=1, help="processes (each loads the encoder once)")
    parser.add_argument("--per-shard", type=int, default=per_shard, help="input items per shard")


def cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run a job's main: warnings (skipped inputs) to stderr, a ConfigError as one line."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
