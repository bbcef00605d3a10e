"""Reading webdataset shards written by `unimm.data_pipelines` (layout in shard_job.py).

A sample is one `{key}.json` (``kind``, ground truth, provenance), one `{key}.tokens.npy`
(ids of the sample's text field) and, for visual kinds, one `{key}.latents.npy` [F, N, C].
Samples come out as plain dicts: the json's fields plus ``key``, ``shard``, ``tokens`` (int64)
and ``latents`` (float32, per-channel normalised when the spec says so; None for text).

Dual encoder (paper §6.3): image-text shards written with an understanding encoder also hold
`{key}.understanding_latents.npy` [F, N_u, C_u], and the manifest an ``understanding`` entry
(its encoder, width, tokens per frame and statistics: `Manifest.understanding`). A spec with
``understanding`` (a dual-encoder model) reads, checks and normalises them into the sample's
``understanding_latents`` (with their own statistics); a missing part is a bad sample. A spec
without reads such shards as single-encoder ones.

Bad data must not stop a long run, and must never pass silently. Every sample a shard holds
ends up in exactly one counter:

- ``samples``: good, handed out.
- ``bad_samples``: read but skipped, logged with shard, key and byte offset: a missing part,
  undecodable content, token ids outside the vocabulary, an empty text where the kind needs
  one, latents of the wrong shape, non-finite latents or latents implausibly far from the
  manifest's per-channel statistics (`SampleSpec.max_latent_deviation`), a key already seen
  in the shard (the repeat is skipped, the first record kept).
- ``lost_samples``: not read at all, because the tar is cut short, damaged over them or cannot
  be opened: the shard's sample count (its ``{name}.stats.json``, written next to every tar
  by the data jobs) minus the records it gave, logged with shard and byte offsets. A tar with
  no stats file is still read to its end, but how many samples a cut took is then unknown
  (logged as such, and counted as a read error only).

Besides the samples, ``read_errors`` counts damaged places in tar data (each logged with shard
and byte offset; reading resynchronises at the next valid tar header, `tar_records`) and
``unreadable_shards`` the shards that could not be opened or read (deleted or unreadable
mid-run): both are skipped, and the run goes on. The loader turns a flood of any of these
into an error naming the source (`max_bad_fraction`).

webdataset keeps no resumable position (shared/FINDINGS.md), so `ShardCursor` keeps its own:
(epoch, shard in this epoch's order, records consumed in that shard). Resuming reopens the
shard and skips that many records, which reproduces the uninterrupted order exactly; what
was counted while reading them was counted before the checkpoint and is not counted again.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from webdataset.autodecode import basichandlers

from unimm.data.latent_stats import ChannelStats, LatentNormalizer, to_float32
from unimm.data.tar_records import End, Fault, Record, read_records
from unimm.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

KINDS = ("text", "image_text", "video", "action")
DIRECTIONS = ("i2t", "t2i")
# The text a kind cannot do without (raw video may come without captions).
TEXT_REQUIRED = {"text": "text", "image_text": "caption", "action": "action"}
MANIFEST_FORMAT = 2
# Latents further than this many standard deviations from the manifest's channel means are
# data errors (a 1e30 in one channel makes the flow loss infinite), not rare samples.
MAX_LATENT_DEVIATION = 1e3
# Every counter a reader keeps, per source (the loader reports them as data/NAME/SOURCE).
COUNTERS = ("samples", "bad_samples", "lost_samples", "read_errors", "unreadable_shards")


@dataclass(frozen=True)
class Manifest:
    path: Path
    latent_dim: int  # 0 for a text-only folder
    tokens_per_frame: int  # 0 for a text-only folder
    sources: dict[str, list[Path]]  # absolute shard paths per source
    info: dict[str, Any]  # the whole manifest.json: encoder, tokenizer, per-source counts
    normalizer: LatentNormalizer | None  # from the stored per-channel statistics
    understanding: UnderstandingLatents | None = None  # dual encoder: the second encoder's latents


@dataclass(frozen=True)
class UnderstandingLatents:
    """The understanding encoder's latents of a dual-encoder manifest (its ``understanding``)."""

    latent_dim: int
    tokens_per_frame: int
    normalizer: LatentNormalizer | None
    encoder: dict[str, Any]
    sources: tuple[str, ...]  # the sources that hold them (source_info's understanding_encoder)

    @classmethod
    def from_manifest(cls, info: dict[str, Any]) -> UnderstandingLatents | None:
        entry = info.get("understanding")
        if not entry:
            return None
        stats = entry.get("normalization")
        holders = tuple(sorted(n for n, s in (info.get("source_info") or {}).items() if (s or {}).get("understanding_encoder")))
        return cls(
            int(entry["latent_dim"] or 0),
            int(entry["tokens_per_frame"] or 0),
            None if stats is None else LatentNormalizer.from_stats(ChannelStats.from_json(stats)),
            entry.get("encoder") or {},
            holders,
        )


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
    # A source with no shard at all is a wrong folder; a few missing shards (deleted since the
    # run started, say) must not keep a run from resuming: the readers skip and count them.
    absent = [str(f) for files in sources.values() for f in files if not f.is_file()]
    missing = set(absent)
    gone = [name for name, files in sources.items() if files and all(str(f) in missing for f in files)]
    if gone:
        raise ConfigError(f"{path}: no shard file of sources {gone} exists, e.g. {absent[0]}")
    if absent:
        logger.warning(
            "%s: %d shard files do not exist, e.g. %s: the loader will skip them and count them under "
            "data/unreadable_shards", path, len(absent), absent[0],
        )
    stats = info["normalization"]
    normalizer = None if stats is None else LatentNormalizer.from_stats(ChannelStats.from_json(stats))
    understanding = UnderstandingLatents.from_manifest(info)
    return Manifest(path, latent_dim, int(info["tokens_per_frame"] or 0), sources, info, normalizer, understanding)


@dataclass(frozen=True)
class SampleSpec:
    """What a good sample must look like, and the normalisation applied to its latents."""

    tokens_per_frame: int
    latent_dim: int
    vocab_size: int
    normalizer: LatentNormalizer | None = None
    """Applied to the latents; None: handed out as stored (in float32)."""
    latent_stats: LatentNormalizer | None = None
    """The manifest's per-channel mean and std, for the plausibility check (default: those of
    `normalizer`; neither: only non-finite latents are refused)."""
    max_latent_deviation: float = MAX_LATENT_DEVIATION
    """Refuse latents with |z - mean| > max_latent_deviation * scale in any channel, where
    scale is the channel's std, or the mean std over channels when larger (so a channel that
    hardly varies in the statistics does not refuse ordinary values)."""
    understanding: SampleSpec | None = None
    """Dual encoder: what image-text samples' understanding latents must look like (their
    tokens per frame and width, normalisation and plausibility check); None: not read."""
    _bounds: tuple[np.ndarray, np.ndarray] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if not self.max_latent_deviation > 0:
            raise ConfigError(f"max_latent_deviation must be positive, got {self.max_latent_deviation}")
        stats = self.latent_stats or self.normalizer
        if stats is None:
            return
        mean, std = stats.mean.astype(np.float64), stats.std.astype(np.float64)
        reach = self.max_latent_deviation * np.maximum(std, std.mean())
        lo, hi = mean - reach, mean + reach
        if self.normalizer is not None:  # the check runs on the handed-out, normalised values
            lo = (lo - self.normalizer.mean) / self.normalizer.std
            hi = (hi - self.normalizer.mean) / self.normalizer.std
        object.__setattr__(self, "_bounds", (lo.astype(np.float32), hi.astype(np.float32)))

    def latent_problem(self, latents: np.ndarray) -> str:
        """"" for plausible latents (as handed out: float32, normalised when the spec says
        so), else why not."""
        if self._bounds is None:
            return "" if np.isfinite(latents).all() else "non-finite latents"
        lo, hi = self._bounds
        rows = latents.reshape(-1, latents.shape[-1])
        # min/max propagate NaN, and NaN fails every comparison, so these find both faults.
        # Whole-array extremes inside every channel's bounds settle it (fast); else per channel.
        if rows.min() >= lo.max() and rows.max() <= hi.min():
            return ""
        if (rows.min(axis=0) >= lo).all() and (rows.max(axis=0) <= hi).all():
            return ""
        if not np.isfinite(rows).all():
            return "non-finite latents"
        stats = self.latent_stats or self.normalizer
        raw = rows if self.normalizer is None else rows.astype(np.float64) * self.normalizer.std + self.normalizer.mean
        sigmas = np.abs(raw - stats.mean) / np.maximum(stats.std, stats.std.mean())
        channel = int(sigmas.max(axis=0).argmax())
        return (
            f"implausible latents: channel {channel} is {sigmas.max():.3g} standard deviations from the "
            f"manifest's mean (value {raw.reshape(-1, raw.shape[-1])[sigmas[:, channel].argmax(), channel]:.3g}; "
            f"limit dataloader.max_latent_deviation={self.max_latent_deviation:g})"
        )


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
    reason = spec.latent_problem(latents)
    if reason:
        return None, reason
    sample["latents"] = latents
    if spec.understanding is not None and kind == "image_text":
        understanding, reason = _decode(raw, "understanding_latents.npy")
        reason = reason or _check_latents(understanding, meta, spec.understanding)
        if reason:
            return None, f"understanding {reason}" if not reason.startswith("missing") else reason
        understanding = (
            to_float32(understanding) if spec.understanding.normalizer is None
            else spec.understanding.normalizer.normalize(understanding)
        )
        reason = spec.understanding.latent_problem(understanding)
        if reason:
            return None, f"understanding {reason}"
        sample["understanding_latents"] = understanding
    return sample, ""


def shard_sample_count(shard: Path) -> int | None:
    """How many samples the tar `shard` holds, from the ``{name}.stats.json`` the data jobs
    write next to it (shard_job.py); None when there is none to read."""
    stats = shard.with_name(shard.name.removesuffix(".tar") + ".stats.json")
    try:
        count = json.loads(stats.read_text()).get("samples")
    except (OSError, ValueError, AttributeError):
        return None
    return count if isinstance(count, int) and count >= 0 else None


def _add(counters: dict[str, int], name: str, n: int = 1) -> None:
    counters[name] = counters.get(name, 0) + n


def _count_faults(faults: list[Fault], shard: Path, counters: dict[str, int]) -> None:
    for fault in faults:
        _add(counters, "read_errors")
        logger.warning("damaged tar data in shard %s %s", shard, fault)


def _checked(record: Record, shard: Path, spec: SampleSpec, counters: dict[str, int]) -> dict[str, Any] | None:
    """Count the record's faults, then the record: a good sample, or a bad one (None)."""
    _count_faults(record.faults, shard, counters)
    if record.duplicate_of is not None:
        sample, reason = None, f"duplicate key (its first record in this shard is at byte {record.duplicate_of})"
    else:
        sample, reason = decode_sample({**record.parts, "__key__": record.key, "__url__": str(shard)}, spec)
    if sample is None:
        _add(counters, "bad_samples")
        note = f" (near damaged tar data {record.note})" if record.note else ""
        logger.warning("skipping bad sample %r in shard %s at byte %d: %s%s", record.key, shard, record.offset, reason, note)
        return None
    _add(counters, "samples")
    return sample


def _count_end(
    end: End, shard: Path, expected: int | None, counters: dict[str, int], *, owner: bool = True, lost: int | None = None
) -> None:
    """Count what the end of a shard reveals: damage after its last record, an unreadable
    file, samples the shard holds but did not give (`lost`: this reader's share of them, all
    when None). `owner`: this reader counts and logs the faults (readers that split a
    shard's records count its lost samples each, its faults once)."""
    if owner and end.unreadable:
        _add(counters, "unreadable_shards")
        logger.warning("skipping shard %s: %s", shard, "; ".join(f.what for f in end.faults))
    elif owner:
        _count_faults(end.faults, shard, counters)
    missing = None if expected is None else expected - end.records
    if missing is not None and missing > 0:
        _add(counters, "lost_samples", missing if lost is None else lost)
        if owner:
            where = f"tar damaged at bytes {list(end.damage)}" if end.damage else "no damage found"
            logger.warning(
                "shard %s: %d of its %d samples could not be read and are lost (%s)",
                shard, missing, expected, where,
            )
    elif owner and expected is None and end.truncated and not end.unreadable:
        logger.warning(
            "shard %s is cut short at byte %d: the samples after it are lost, an unknown number "
            "(no %s to say how many the shard holds)",
            shard, end.damage[-1] if end.damage else 0, shard.name.removesuffix(".tar") + ".stats.json",
        )


def read_samples(
    shards: list[Path], spec: SampleSpec, counters: dict[str, int] | None = None
) -> Iterator[dict[str, Any]]:
    """Every good sample of `shards` once, in order (evaluation, inspection); bad, lost and
    unreadable data counted in `counters` (module docstring) and logged."""
    counters = counters if counters is not None else {}
    for shard in shards:
        shard = Path(shard)
        for item in read_records(shard):
            if isinstance(item, End):
                _count_end(item, shard, shard_sample_count(shard), counters)
                continue
            sample = _checked(item, shard, spec, counters)
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
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._order = self._epoch_order()
        self._iter: Iterator[Record | End] | None = None
        self._skip = 0  # records to pass over after a resume (counted before the checkpoint)
        self._sizes: dict[Path, int | None] = {}  # shard -> its sample count, read once

    def _epoch_order(self) -> list[int]:
        rng = np.random.default_rng(self._seed_key + [self.epoch])
        return [int(i) for i in rng.permutation(len(self._shards))]

    def _current_path(self) -> Path:
        return self._shards[self._order[self.shard]]

    def _open(self) -> None:
        path = self._current_path()
        if path not in self._sizes:
            self._sizes[path] = shard_sample_count(path)
        self._iter = read_records(path)  # an unreadable file comes out as an End, not an error
        self._skip = self.record

    def _close(self) -> None:
        if self._iter is not None:
            self._iter.close()
        self._iter, self._skip = None, 0

    def _owns(self, index: int) -> bool:
        return not self._split_records or index % self._num_streams == self.stream

    def _end_of_shard(self, end: End) -> None:
        # With split records, every stream reads the whole shard: record i is stream
        # i % num_streams's, and so are the samples missing at index i and the faults found
        # with the i-th item, so that the streams together count each exactly once.
        path, expected = self._current_path(), self._sizes.get(self._current_path())
        lost = None
        if self._split_records and expected is not None:
            first = end.records + (self.stream - end.records) % self._num_streams
            lost = len(range(first, expected, self._num_streams))
        _count_end(end, path, expected, self.counters, owner=self._owns(end.records), lost=lost)

    def _next_shard(self) -> None:
        self._close()
        self.shard, self.record = self.shard + 1, 0
        if self.shard < len(self._shards):
            return
        if self._good_in_epoch == 0:
            raise DataError(
                f"source {self.source!r}, stream {self.stream}: a whole pass over "
                f"{len(self._shards)} shards gave no usable sample (so far {self.counters['bad_samples']} "
                f"bad samples, {self.counters['lost_samples']} lost, {self.counters['unreadable_shards']} "
                "unreadable shards; the warnings name each shard)"
            )
        self.epoch, self.shard, self._good_in_epoch = self.epoch + 1, 0, 0
        self._order = self._epoch_order()

    def next(self) -> dict[str, Any]:
        while True:
            if self._iter is None:
                self._open()
            item = next(self._iter)
            if isinstance(item, End):
                self._end_of_shard(item)
                self._next_shard()
                continue
            if self._skip:
                self._skip -= 1
                continue
            index, self.record = self.record, self.record + 1
            if not self._owns(index):
                continue
            sample = _checked(item, self._current_path(), self._spec, self.counters)
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
        self.counters = {**dict.fromkeys(COUNTERS, 0), **state["counters"]}  # older checkpoints lack some
        self._order = self._epoch_order()
