"""Reading webdataset shards written by `unimm.data_pipelines` (layout in shard_job.py).

A sample is one `{key}.json` (``kind``, ground truth, provenance), one `{key}.tokens.npy`
(ids of the sample's text field) and, for visual kinds, one `{key}.latents.npy` [F, N, C].
Samples come out as plain dicts: the json's fields plus ``key``, ``shard``, ``tokens`` (int64)
and ``latents`` (float32, per-channel normalised when the spec says so; None for text).

Bad data must not stop a long run: a sample with a missing part, undecodable content, token
ids outside the vocabulary, an empty text where the kind needs one, latents of the wrong
shape or non-finite latents is skipped, counted and logged with its shard and key; a shard
that cannot be read to its end is logged and left at the point of failure. The loader turns
a flood of such samples into an error (`max_bad_fraction`).

webdataset keeps no resumable position (shared/FINDINGS.md), so `ShardCursor` keeps its own:
(epoch, shard in this epoch's order, records consumed in that shard). Resuming reopens the
shard and skips that many records, which reproduces the uninterrupted order exactly.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from webdataset.autodecode import basichandlers
from webdataset.tariterators import group_by_keys, tar_file_expander

from unimm.data.latent_stats import ChannelStats, LatentNormalizer, to_float32
from unimm.errors import ConfigError

logger = logging.getLogger(__name__)

KINDS = ("text", "image_text", "video", "action")
DIRECTIONS = ("i2t", "t2i")
# The text a kind cannot do without (raw video may come without captions).
TEXT_REQUIRED = {"text": "text", "image_text": "caption", "action": "action"}
MANIFEST_FORMAT = 2


@dataclass(frozen=True)
class Manifest:
    path: Path
    latent_dim: int  # 0 for a text-only folder
    tokens_per_frame: int  # 0 for a text-only folder
    sources: dict[str, list[Path]]  # absolute shard paths per source
    info: dict[str, Any]  # the whole manifest.json: encoder, tokenizer, per-source counts
    normalizer: LatentNormalizer | None  # from the stored per-channel statistics


def load_manifest(folder: str | Path, expected_latent_dim: int) -> Manifest:
    """Read `folder/manifest.json` and check it against the model before any training starts."""
    path = Path(folder).expanduser() / "manifest.json"
    if not path.is_file():
        raise ConfigError(f"no manifest.json in {path.parent} (dataloader.shards must name a folder written by data_pipelines)")
    info = json.loads(path.read_text())
    if info.get("format") != MANIFEST_FORMAT:
        raise ConfigError(f"{path}: manifest format {info.get('format')}, this code reads {MANIFEST_FORMAT} (regenerate the shards)")
    missing = {"latent_dim", "tokens_per_frame", "sources", "tokenizer", "normalization"} - info.keys()
    if missing:
        raise ConfigError(f"{path}: missing fields {sorted(missing)}")
    latent_dim = info["latent_dim"] or 0
    if latent_dim and latent_dim != expected_latent_dim:
        encoder = (info.get("encoder") or {}).get("name", "?")
        raise ConfigError(
            f"{path}: latent_dim is {latent_dim} but the model expects {expected_latent_dim} "
            f"(encoder {encoder!r}; regenerate the shards or change the model's latent width)"
        )
    sources = {name: [path.parent / f for f in files] for name, files in info["sources"].items()}
    absent = [str(f) for files in sources.values() for f in files if not f.is_file()]
    if absent:
        raise ConfigError(f"{path}: {len(absent)} shard files do not exist, e.g. {absent[0]}")
    stats = info["normalization"]
    normalizer = None if stats is None else LatentNormalizer.from_stats(ChannelStats.from_json(stats))
    return Manifest(path, latent_dim, int(info["tokens_per_frame"] or 0), sources, info, normalizer)


@dataclass(frozen=True)
class SampleSpec:
    """What a good sample must look like, and the normalisation applied to its latents."""

    tokens_per_frame: int
    latent_dim: int
    vocab_size: int
    normalizer: LatentNormalizer | None = None


def _decode(raw: dict[str, Any], ext: str) -> tuple[Any, str]:
    if ext not in raw:
        return None, f"missing {ext}"
    # Corrupt bytes can fail inside json or numpy in many ways; any failure only condemns the sample.
    try:
        return basichandlers(ext, raw[ext]), ""
    except Exception as exc:
        return None, f"undecodable {ext} ({exc!r})"


def _check_latents(latents: Any, meta: dict[str, Any], spec: SampleSpec) -> str:
    kind = meta["kind"]
    if not isinstance(latents, np.ndarray) or latents.ndim != 3 or latents.dtype.kind != "f":
        return f"latents are {getattr(latents, 'dtype', type(latents).__name__)} {list(getattr(latents, 'shape', []))}, expected float [F, N, C]"
    frames = {"image_text": 1}.get(kind, latents.shape[0])
    if latents.shape != (frames, spec.tokens_per_frame, spec.latent_dim) or frames < 1:
        return f"latents shape {list(latents.shape)}, expected {[frames, spec.tokens_per_frame, spec.latent_dim]}"
    if kind == "action":
        context = meta.get("num_context")
        if not isinstance(context, int) or not 1 <= context < len(latents):
            return f"num_context {context!r} must leave 1 to {len(latents) - 1} result frames of {len(latents)}"
    return ""


def decode_sample(raw: dict[str, Any], spec: SampleSpec) -> tuple[dict[str, Any] | None, str]:
    """(sample, "") for a good record, (None, reason) for a bad one."""
    meta, reason = _decode(raw, "json")
    if reason:
        return None, reason
    if not isinstance(meta, dict):
        return None, "json is not an object"
    kind = meta.get("kind")
    if kind not in KINDS:
        return None, f"unknown kind {kind!r}"
    tokens, reason = _decode(raw, "tokens.npy")
    if reason:
        return None, reason
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1 or tokens.dtype.kind not in "iu":
        return None, f"tokens are {getattr(tokens, 'dtype', type(tokens).__name__)}, expected a 1-D integer array"
    if kind in TEXT_REQUIRED and len(tokens) == 0:
        return None, f"empty {TEXT_REQUIRED[kind]}"
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= spec.vocab_size):
        return None, f"token ids outside the vocabulary of {spec.vocab_size}"
    if kind == "image_text":
        directions = meta.setdefault("directions", list(DIRECTIONS))
        valid = isinstance(directions, list) and directions and len(set(directions)) == len(directions)
        if not valid or set(directions) - set(DIRECTIONS):
            return None, f"directions {directions!r} are not a non-empty subset of {list(DIRECTIONS)}"
    sample = {**meta, "key": raw["__key__"], "shard": raw["__url__"], "tokens": tokens.astype(np.int64), "latents": None}
    if kind == "text":
        return sample, ""
    latents, reason = _decode(raw, "latents.npy")
    reason = reason or _check_latents(latents, meta, spec)
    if reason:
        return None, reason
    # Normalising keeps NaN and Inf, and float32 checks far faster than float16.
    latents = to_float32(latents) if spec.normalizer is None else spec.normalizer.normalize(latents)
    if not np.isfinite(latents).all():
        return None, "non-finite latents"
    sample["latents"] = latents
    return sample, ""


def _records(path: Path, stream: BinaryIO, on_error) -> Iterator[dict[str, Any]]:
    """Raw records (bytes per extension) of one tar, grouped by key, in stored order."""
    files = tar_file_expander([{"url": str(path), "stream": stream}], handler=on_error)
    return group_by_keys(files, handler=on_error)


def _error_handler(shard: Path, counters: dict[str, int]):
    def on_error(exc: Exception) -> bool:
        counters["read_errors"] = counters.get("read_errors", 0) + 1
        logger.warning("unreadable data in shard %s: %r", shard, exc)
        return True

    return on_error


def _checked(raw, shard: Path, spec: SampleSpec, counters: dict[str, int]):
    sample, reason = decode_sample(raw, spec)
    if sample is None:
        counters["bad_samples"] = counters.get("bad_samples", 0) + 1
        logger.warning("skipping bad sample %r in shard %s: %s", raw.get("__key__"), shard, reason)
        return None
    counters["samples"] = counters.get("samples", 0) + 1
    return sample


def read_samples(
    shards: list[Path], spec: SampleSpec, counters: dict[str, int] | None = None
) -> Iterator[dict[str, Any]]:
    """Every good sample of `shards` once, in order (evaluation, inspection)."""
    counters = counters if counters is not None else {}
    for shard in shards:
        with open(shard, "rb") as stream:
            for raw in _records(shard, stream, _error_handler(shard, counters)):
                sample = _checked(raw, shard, spec, counters)
                if sample is not None:
                    yield sample


class ShardCursor:
    """An endless, resumable, per-stream reader over one source's shards.

    Stream `stream` of `num_streams` owns shards i with i % num_streams == stream; when there are
    fewer shards than streams, it reads every shard and owns records j with j % num_streams ==
    stream instead, so small datasets still give every stream data. Each epoch visits the owned
    shards in a fresh order derived from (seed, stream, source, epoch) only, so the order need not
    be stored. Records inside a shard keep their stored order (the writer shuffles, if wanted):
    a shuffle buffer would have to be checkpointed with its latents.
    """

    def __init__(
        self,
        source: str,
        shards: list[Path],
        *,
        stream: int,
        num_streams: int,
        seed: int,
        spec: SampleSpec,
    ) -> None:
        if not shards:
            raise ValueError(f"source {source!r} has no shards")
        self.source, self.stream = source, stream
        self._split_records = len(shards) < num_streams
        self._num_streams = num_streams
        self._shards = shards if self._split_records else shards[stream::num_streams]
        self._seed_key = [seed, stream, zlib.crc32(source.encode())]
        self._spec = spec
        self.epoch, self.shard, self.record, self._good_in_epoch = 0, 0, 0, 0
        self.counters: dict[str, int] = {"samples": 0, "bad_samples": 0, "read_errors": 0}
        self._order = self._epoch_order()
        self._file: BinaryIO | None = None
        self._iter: Iterator[dict[str, Any]] | None = None

    def _epoch_order(self) -> list[int]:
        rng = np.random.default_rng(self._seed_key + [self.epoch])
        return [int(i) for i in rng.permutation(len(self._shards))]

    def _current_path(self) -> Path:
        return self._shards[self._order[self.shard]]

    def _open(self) -> None:
        path = self._current_path()
        self._file = open(path, "rb")  # noqa: SIM115 (stays open across next() calls; closed in _close)
        self._iter = _records(path, self._file, _error_handler(path, self.counters))
        for _ in range(self.record):  # resume: drop what was consumed before the checkpoint
            if next(self._iter, None) is None:
                break

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._iter = None, None

    def _next_shard(self) -> None:
        self._close()
        self.shard, self.record = self.shard + 1, 0
        if self.shard < len(self._shards):
            return
        if self._good_in_epoch == 0:
            raise RuntimeError(
                f"source {self.source!r}, stream {self.stream}: a whole pass over "
                f"{len(self._shards)} shards gave no usable sample"
            )
        self.epoch, self.shard, self._good_in_epoch = self.epoch + 1, 0, 0
        self._order = self._epoch_order()

    def next(self) -> dict[str, Any]:
        while True:
            if self._iter is None:
                self._open()
            raw = next(self._iter, None)
            if raw is None:
                self._next_shard()
                continue
            index, self.record = self.record, self.record + 1
            if self._split_records and index % self._num_streams != self.stream:
                continue
            sample = _checked(raw, self._current_path(), self._spec, self.counters)
            if sample is not None:
                self._good_in_epoch += 1
                return sample

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "shard": self.shard,
            "record": self.record,
            "good_in_epoch": self._good_in_epoch,
            "counters": dict(self.counters),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._close()
        self.epoch, self.shard, self.record = state["epoch"], state["shard"], state["record"]
        self._good_in_epoch = state["good_in_epoch"]
        self.counters = dict(state["counters"])
        self._order = self._epoch_order()
