"""The train-time loader: source mixture by token share -> documents -> packed rows -> batches.

Determinism and sharding contract. The data is cut into `num_streams` independent streams
(0 means one per data-parallel rank). Stream s has its own RNG seeded from (seed, s), its own
readers (shards or records with index % num_streams == s, endless, reshuffled every epoch) and
its own packer. Rank r of W owns streams [r*S/W, (r+1)*S/W); a local batch stacks
local_batch_size/(S/W) consecutive rows of each owned stream, in stream order. So the global
batch depends on (seed, S, global batch size) and not on how many ranks share it: 1 rank with
local batch 2b and 2 streams sees what 2 ranks with local batch b see together. Nodes need no
separate split: ranks are global, so every shard (or record) belongs to exactly one stream.

Mixture by token share. `source_weights` are target shares of the positions documents occupy
(paper App. E.8: 50% text, 25% video, 22.5% image-text, 2.5% action), not of documents: a
video clip is hundreds of positions, a caption pair a few dozen. Each stream draws the next
document's source with probability proportional to its deficit over a look-ahead window,
max(w_s * (T + H) - t_s, 0), where t_s counts the positions source s has contributed, T their
sum and H = MIXTURE_LOOKAHEAD_ROWS * seq_len. A source behind its share is drawn more often,
one ahead by more than w_s * H not at all, so every share stays within about H / T of its
target whatever the document lengths, while the order stays random. The counts are stream
state, so a resumed run continues the same draws.

Default weights. An empty `source_weights` takes them from the manifest (`manifest_weights`):
the paper's token shares per modality (above) over the modalities the mixture has,
renormalised, and inside a modality in proportion to each source's tokens, so that every
source of a modality is read at the same rate (a small probe set next to a large corpus is
not repeated many times over while the corpus is barely touched).

Bad data never stops a run and never passes silently: a sample that fails `shards.decode_sample`
(including latents more than `max_latent_deviation` standard deviations from the manifest's
means), a repeated key, samples lost to a cut or damaged tar, damaged tar data, a shard that
cannot be opened, and a document longer than a row are skipped, logged with shard and key or
byte offset, and counted per source (``data/bad_samples/SOURCE``, ``data/lost_samples/SOURCE``,
``data/read_errors/SOURCE``, ``data/unreadable_shards/SOURCE``, ``data/too_long/SOURCE`` in the
metrics; shards.py says what each counts). Once a source has shown MIN_SAMPLES_FOR_BAD_FRACTION
samples on a stream, more than `max_bad_fraction` of them bad (skipped, lost, or one per
damaged place or unreadable shard) raises a DataError naming it.

Provenance: every batch the loader hands out carries, under ``batch.PROVENANCE_KEY`` (not a
tensor; the trainer takes it off), the (shard, key) of each document of each row, row by row
(``Document.source``, ``Packer.row_sources``; the packer's carry-over keeps its own, so a
resumed run reports the same). `next_batch` returns the tensors only.

Exact resume: every stream's reader positions, RNG state, per-source counts and packer
carry-over are in the dataset's state_dict, which torchdata's StatefulDataLoader saves between
batches.

Dual encoder (paper §6.3): for a model with a second input projection (``understanding_dim``
> 0, bound from the model like ``latent_dim``), the shards must hold understanding latents of
that width (manifest ``understanding``), and every weighted image-text source must have them.
They are normalised with their own statistics and fed at the positions of understanding (I->T)
images, which stay clean (sequences.py); the batch gains ``understanding`` and
``understanding_latents`` (batch.py). The procedural data writes them when
``understanding_patch`` is set (raw pixels at ``understanding_image_size``, a CPU stand-in
for SigLIP 2 beside the generation encoder). A single-encoder model ignores them.

Worker processes (`num_workers` W > 0): the rank's streams are split into W contiguous groups,
worker w owns group w and builds whole local batches from its own streams only, and the
dataloader takes batches from the workers in turn. The batch sequence then depends on
(seed, S, global batch size, W); it stays deterministic and resumes exactly (torchdata keeps
each worker's dataset state). One worker is usually enough: docs/benchmarks.md measures one
process packing the paper's batches about 4x faster than an H100 consumes them.

Overlap with the device (``overlap``, on by default on CUDA): at least one worker builds the
next batches while the device computes, the DataLoader pins them, and the trainer copies them
non-blocking; one worker reads the same streams as the training process, so turning it on
changes no batch. Batches bound for a device (``device_type``, set by the trainer) travel in
the wire format (unimm.data.wire): latent rows only, in bfloat16 on CUDA, and the index
tensors of the step's heads and losses.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchtitan.components.dataloader import ParallelAwareDataloader

from unimm.data.batch import PROVENANCE_KEY
from unimm.data.doc_lengths import DocumentLengths
from unimm.data.packer import Packer, Row, empty_rows
from unimm.data.sequences import Document, LayoutSettings, SpecialTokens, build_document
from unimm.data.shards import MAX_LATENT_DEVIATION, Manifest, SampleSpec, ShardCursor, load_manifest
from unimm.data.wire import WireFormat, encode
from unimm.data_pipelines.write_shards import ensure_procedural_shards
from unimm.errors import ConfigError, DataError
from unimm.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Token shares of the paper's mixture by modality (App. E.8); the procedural sources carry
# the modalities' names, so they are also the default weights of the procedural mixture.
MODALITY_SHARES = {"text": 0.5, "video": 0.25, "image_text": 0.225, "action": 0.025}
DEFAULT_SOURCE_WEIGHTS = dict(MODALITY_SHARES)
MIXTURE_LOOKAHEAD_ROWS = 4
MIN_SAMPLES_FOR_BAD_FRACTION = 200
_SPECIAL_IDS = ("pad_id", "bos_id", "eos_id", "boi_id", "eoi_id")

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]
# Input-dict key of (stream group, counters) on its way from a worker to MultimodalDataLoader,
# which takes it off before the trainer sees the batch.
STATS_KEY = "_stream_stats"


class _Stream:
    """One deterministic stream: its RNG, one reader per source, the mixture counts, a packer."""

    def __init__(
        self,
        index: int,
        *,
        num_streams: int,
        manifest: Manifest,
        weights: dict[str, float],
        seed: int,
        tokenizer: SpecialTokens,
        seq_len: int,
        spec: SampleSpec,
        layout: LayoutSettings,
        max_bad_fraction: float,
    ) -> None:
        self.index = index
        self.rng = np.random.default_rng([seed, index])
        self._names = sorted(weights)  # sorted: the draw must not depend on config dict order
        targets = np.array([weights[n] for n in self._names], dtype=np.float64)
        self._targets = targets / targets.sum()
        self._lookahead = MIXTURE_LOOKAHEAD_ROWS * seq_len
        self.cursors = {
            name: ShardCursor(
                name, manifest.sources[name], stream=index, num_streams=num_streams, seed=seed, spec=spec
            )
            for name in self._names
        }
        understanding_dim = spec.understanding.latent_dim if spec.understanding is not None else 0
        self.packer = Packer(seq_len, spec.latent_dim, tokenizer.pad_id, understanding_dim)
        self._tokenizer, self._seq_len, self._latent_dim = tokenizer, seq_len, spec.latent_dim
        self._layout, self._max_bad_fraction = layout, max_bad_fraction
        self.rows = 0
        self.documents: Counter[str] = Counter()
        self.positions: Counter[str] = Counter()
        self.too_long: Counter[str] = Counter()

    def _pick_source(self) -> str:
        counts = np.array([self.positions[n] for n in self._names], dtype=np.float64)
        deficit = np.maximum(self._targets * (counts.sum() + self._lookahead) - counts, 0.0)
        cumulative = np.cumsum(deficit)  # the deficits sum to the look-ahead, so never all zero
        pick = int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right"))
        return self._names[min(pick, len(self._names) - 1)]

    def _check_bad_fraction(self, name: str) -> None:
        counters = self.cursors[name].counters
        seen = counters["samples"] + counters["bad_samples"] + counters["lost_samples"]
        parts = {
            "skipped": counters["bad_samples"],
            "lost": counters["lost_samples"],
            "damaged places": counters["read_errors"],
            "unreadable shards": counters["unreadable_shards"],
            "too long": self.too_long[name],
        }
        bad = sum(parts.values())
        if seen >= MIN_SAMPLES_FOR_BAD_FRACTION and bad > self._max_bad_fraction * seen:
            detail = ", ".join(f"{n} {what}" for what, n in parts.items() if n)
            raise DataError(
                f"source {name!r}, stream {self.index}: {bad} bad of {seen} samples ({bad / seen:.1%}: {detail}) "
                f"exceeds dataloader.max_bad_fraction={self._max_bad_fraction} (the warnings name each shard "
                "and key or byte offset)"
            )

    def _next_document(self) -> Document:
        while True:
            name = self._pick_source()
            sample = self.cursors[name].next()
            doc = build_document(sample, self._tokenizer, self.rng, latent_dim=self._latent_dim, layout=self._layout)
            if len(doc) <= self._seq_len:
                self.documents[name] += 1
                self.positions[name] += len(doc)
                doc.source = (sample["shard"], sample["key"])
                self._check_bad_fraction(name)
                return doc
            self.too_long[name] += 1
            logger.warning(
                "skipping sample %r in shard %s: its document of %d positions exceeds seq_len %d",
                sample["key"], sample["shard"], len(doc), self._seq_len,
            )
            self._check_bad_fraction(name)

    def next_row(self, out: Row) -> list[tuple[str, str]]:
        """Pack the next row into `out`; returns the (shard, key) of its documents."""
        self.rows += 1
        self.packer.next_row(self._next_document, out)
        return list(self.packer.row_sources)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.bit_generator.state,
            "cursors": {name: c.state_dict() for name, c in self.cursors.items()},
            "packer": self.packer.state_dict(),
            "rows": self.rows,
            "documents": dict(self.documents),
            "positions": dict(self.positions),
            "too_long": dict(self.too_long),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if sorted(state["cursors"]) != self._names:
            raise ConfigError(
                f"stream {self.index}: checkpoint has sources {sorted(state['cursors'])}, "
                f"config has {self._names}"
            )
        self.rng.bit_generator.state = state["rng"]
        for name, cursor_state in state["cursors"].items():
            self.cursors[name].load_state_dict(cursor_state)
        self.packer.load_state_dict(state["packer"])
        self.rows = state["rows"]
        self.documents, self.positions = Counter(state["documents"]), Counter(state["positions"])
        self.too_long = Counter(state["too_long"])


def check_tokenizer(manifest: Manifest, tokenizer: Tokenizer) -> None:
    """Shards hold token ids: they are only meaningful with the tokenizer that wrote them."""
    missing = [n for n in _SPECIAL_IDS if getattr(tokenizer, n, None) is None]
    if missing:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} lacks special token ids {missing}")
    written = manifest.info["tokenizer"]
    if written["fingerprint"] != tokenizer.fingerprint:
        raise ConfigError(
            f"{manifest.path}: shards were tokenised with {written['kind']} tokenizer {written['path']!r} "
            f"(fingerprint {written['fingerprint']}), but the run uses {tokenizer.vocabulary.kind} "
            f"{tokenizer.config.path!r} ({tokenizer.fingerprint}): set --tokenizer.path to the shards' tokenizer"
        )


class PackedMultimodalDataset(IterableDataset):
    """Endless iterable of whole local batches `(input_dict, labels)` for one data-parallel rank."""

    def __init__(
        self,
        *,
        manifest: Manifest,
        tokenizer: Tokenizer,
        seq_len: int,
        local_batch_size: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        num_streams: int = 0,
        seed: int = 0,
        source_weights: dict[str, float] | None = None,
        layout: LayoutSettings = LayoutSettings(),
        normalize_latents: bool = True,
        max_bad_fraction: float = 0.01,
        num_workers: int = 0,
        max_latent_deviation: float = MAX_LATENT_DEVIATION,
        understanding_dim: int = 0,
        wire: WireFormat | None = None,
    ) -> None:
        """``wire``: iteration yields the wire format (unimm.data.wire), for the trainer; None:
        the dense batches of batch.py (``next_batch`` gives those either way)."""
        num_streams = num_streams or dp_world_size
        if num_streams % dp_world_size:
            raise ConfigError(
                f"num_streams {num_streams} is not divisible by the data-parallel world size {dp_world_size}"
            )
        per_rank = num_streams // dp_world_size
        groups = max(num_workers, 1)
        if per_rank % groups:
            raise ConfigError(
                f"each rank's {per_rank} streams (num_streams {num_streams} / dp world size "
                f"{dp_world_size}) must split evenly over dataloader.num_workers={num_workers}"
            )
        per_group = per_rank // groups
        if local_batch_size % per_group:
            raise ConfigError(
                f"local_batch_size {local_batch_size} is not divisible by the {per_group} streams that "
                f"build each batch (num_streams {num_streams} / dp world size {dp_world_size} / workers {groups})"
            )
        if not 0 <= max_bad_fraction < 1:
            raise ConfigError(f"max_bad_fraction must be in [0, 1), got {max_bad_fraction}")
        check_tokenizer(manifest, tokenizer)
        if normalize_latents and manifest.latent_dim and manifest.normalizer is None:
            raise ConfigError(f"{manifest.path} has no normalization statistics (set normalize_latents false)")
        weights = _check_weights(source_weights or DEFAULT_SOURCE_WEIGHTS, manifest)
        understanding = None
        if understanding_dim:
            check_understanding(manifest, weights, understanding_dim)
            u = manifest.understanding
            if normalize_latents and u.normalizer is None:
                raise ConfigError(f"{manifest.path} has no understanding normalization statistics (set normalize_latents false)")
            understanding = SampleSpec(
                tokens_per_frame=u.tokens_per_frame,
                latent_dim=u.latent_dim,
                vocab_size=tokenizer.get_vocab_size(),
                normalizer=u.normalizer if normalize_latents else None,
                latent_stats=u.normalizer,
                max_latent_deviation=max_latent_deviation,
            )
        spec = SampleSpec(
            tokens_per_frame=manifest.tokens_per_frame,
            latent_dim=manifest.latent_dim,
            vocab_size=tokenizer.get_vocab_size(),
            normalizer=manifest.normalizer if normalize_latents else None,
            latent_stats=manifest.normalizer,
            max_latent_deviation=max_latent_deviation,
            understanding=understanding,
        )
        self.num_streams = num_streams
        self.rows_per_stream = local_batch_size // per_group
        self.streams_per_batch = per_group
        self._seq_len, self._latent_dim, self._pad_id = seq_len, spec.latent_dim, tokenizer.pad_id
        self._understanding_dim = understanding_dim
        self.wire = wire
        self.streams = [
            _Stream(
                s,
                num_streams=num_streams,
                manifest=manifest,
                weights=weights,
                seed=seed,
                tokenizer=tokenizer,
                seq_len=seq_len,
                spec=spec,
                layout=layout,
                max_bad_fraction=max_bad_fraction,
            )
            for s in range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        ]

    def _group(self, group: int) -> list[_Stream]:
        return self.streams[group * self.streams_per_batch : (group + 1) * self.streams_per_batch]

    def next_batch(self, group: int = 0) -> Batch:
        """One local batch from stream group ``group`` (the worker's; 0 without workers)."""
        fields, labels, _ = self._next_batch(group)
        return fields, labels

    def _next_batch(self, group: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[list[tuple[str, str]]]]:
        streams = self._group(group)
        batch = empty_rows(
            len(streams) * self.rows_per_stream, self._seq_len, self._latent_dim, self._pad_id, self._understanding_dim
        )
        provenance = [
            streams[i // self.rows_per_stream].next_row({k: v[i] for k, v in batch.items()})
            for i in range(len(streams) * self.rows_per_stream)
        ]
        fields = {k: torch.from_numpy(v) for k, v in batch.items()}
        labels = fields.pop("labels")
        return fields, labels, provenance

    def __iter__(self):
        # All state lives in the streams, so a state_dict taken between batches resumes exactly.
        # Each batch carries its group's counters for the metrics: a worker's streams advance
        # in the worker process, not in the trainer's copy of the dataset.
        worker = get_worker_info()
        group = 0 if worker is None else worker.id
        while True:
            fields, labels, provenance = self._next_batch(group)
            if self.wire is not None:
                fields = encode(fields, labels, self.wire, self._pad_id)
            fields[STATS_KEY] = (group, stream_stats(self._group(group)))
            fields[PROVENANCE_KEY] = provenance
            yield fields, labels

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_streams": self.num_streams,
            "streams": {str(s.index): s.state_dict() for s in self.streams},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        owned = [str(s.index) for s in self.streams]
        if state["num_streams"] != self.num_streams or sorted(state["streams"]) != sorted(owned):
            raise ConfigError(
                f"checkpoint holds streams {sorted(state['streams'])} of {state['num_streams']}, "
                f"this rank owns {owned} of {self.num_streams}: the stream layout must not change on resume"
            )
        for stream in self.streams:
            stream.load_state_dict(state["streams"][str(stream.index)])

    def stats(self) -> dict[str, int]:
        return stream_stats(self.streams)


def stream_stats(streams: list[_Stream]) -> dict[str, int]:
    """Counters summed over streams, flat so they can go straight to a metrics logger: totals,
    and per source ``documents/S``, ``positions/S``, ``samples/S``, ``bad_samples/S``,
    ``lost_samples/S``, ``read_errors/S``, ``unreadable_shards/S``, ``too_long/S``."""
    out: Counter[str] = Counter()
    for stream in streams:
        out["rows"] += stream.rows
        out["padding_positions"] += stream.packer.padding
        for name, cursor in stream.cursors.items():
            counts = {
                **cursor.counters,
                "documents": stream.documents[name],
                "positions": stream.positions[name],
                "too_long": stream.too_long[name],
            }
            for key, n in counts.items():
                out[f"{key}/{name}"] += n
                out[key] += n
    return dict(out)


def manifest_weights(manifest: Manifest) -> dict[str, float]:
    """Source weights from the manifest: `MODALITY_SHARES` over the modalities present
    (renormalised), split inside each modality by the sources' token counts."""
    info = manifest.info.get("source_info") or {}
    by_kind: dict[str, dict[str, float]] = {}
    for name, files in sorted(manifest.sources.items()):
        source = info.get(name) or {}
        kind = source.get("kind")
        if not files:
            continue
        if kind not in MODALITY_SHARES:
            raise ConfigError(
                f"{manifest.path}: source {name!r} has kind {kind!r}, so no default weight; "
                "give the whole mixture with --dataloader.source_weights NAME W [NAME W ...]"
            )
        tokens = source.get("tokens") or {}
        by_kind.setdefault(kind, {})[name] = float(tokens.get("text", 0) + tokens.get("vision", 0))
    if not by_kind:
        raise ConfigError(f"{manifest.path}: no source has shards")
    total_share = sum(MODALITY_SHARES[kind] for kind in by_kind)
    weights: dict[str, float] = {}
    for kind, tokens in by_kind.items():
        share = MODALITY_SHARES[kind] / total_share
        total = sum(tokens.values())
        for name, n in tokens.items():
            weights[name] = share * (n / total if total > 0 else 1 / len(tokens))
    return dict(sorted(weights.items()))


def check_document_lengths(
    manifest: Manifest, weights: dict[str, float], seq_len: int, max_bad_fraction: float
) -> list[str]:
    """Sources with documents longer than a row, from the manifest's length counts: a
    ConfigError when the loader would skip more than `max_bad_fraction` of a source's samples
    (the run would stop on it), else one warning line per such source (returned and logged).
    Sources whose manifest has no counts (written before they existed) are not checked."""
    info = manifest.info.get("source_info") or {}
    warnings, errors = [], []
    for name in sorted(weights):
        lengths = DocumentLengths.from_json((info.get(name) or {}).get("document_lengths"))
        if lengths is None or not lengths.samples:
            continue
        over = lengths.longer_than(seq_len)
        if not over:
            continue
        shard = next((str(f) for f in manifest.sources.get(name, []) if f.name == lengths.longest_shard), lengths.longest_shard)
        kind = (info.get(name) or {}).get("kind")
        fix = f"raise --training.seq_len to at least {lengths.longest}"
        if kind == "text":
            fix += f", or rewrite the source with the text job's --max-tokens {seq_len - 2} (cuts documents into pieces that fit)"
        else:
            fix += ", or rewrite the source with shorter captions or fewer frames"
        report = (
            f"source {name!r}: {over} of its {lengths.samples} samples ({over / lengths.samples:.1%}) make "
            f"documents longer than --training.seq_len={seq_len} (longest {lengths.longest} positions, "
            f"key {lengths.longest_key!r} in {shard}; median {lengths.percentile(50)}, "
            f"99th percentile {lengths.percentile(99)}; {manifest.path})"
        )
        if over > max_bad_fraction * lengths.samples:
            errors.append(
                f"{report}: the loader would skip them and stop the run, as more than "
                f"dataloader.max_bad_fraction={max_bad_fraction} of the source is bad. To fix: {fix}, "
                f"or leave the source out (--dataloader.source_weights)"
            )
        else:
            warnings.append(f"{report}: the loader will skip them (within dataloader.max_bad_fraction={max_bad_fraction})")
    if errors:
        raise ConfigError("documents longer than a row: " + "\n  ".join(errors))
    for line in warnings:
        logger.warning("%s", line)
    return warnings


def check_understanding(manifest: Manifest, weights: dict[str, float], understanding_dim: int) -> None:
    """A dual-encoder model (``understanding_dim`` wide understanding latents) needs shards
    that hold them, that wide, for every weighted image-text source."""
    u = manifest.understanding
    if u is None:
        raise ConfigError(
            f"{manifest.path}: the model reads understanding latents {understanding_dim} wide (a dual encoder), "
            "but the shards hold one encoder's latents; write the image-text sources with "
            "--understanding-encoder NAME (data_pipelines/image_text.py), or train a single-encoder recipe"
        )
    if u.latent_dim != understanding_dim:
        raise ConfigError(
            f"{manifest.path}: understanding latents are {u.latent_dim} wide (encoder {u.encoder.get('name', '?')!r}) "
            f"but the model's understanding_proj expects {understanding_dim}"
        )
    info = manifest.info.get("source_info") or {}
    lacking = sorted(
        name for name in weights if (info.get(name) or {}).get("kind") == "image_text" and name not in u.sources
    )
    if lacking:
        raise ConfigError(
            f"{manifest.path}: image-text sources {lacking} have no understanding latents (written without "
            f"--understanding-encoder); a dual-encoder model needs them for every image-text source "
            f"(these have them: {list(u.sources)}), or leave them out with --dataloader.source_weights"
        )


def _check_weights(weights: dict[str, float], manifest: Manifest) -> dict[str, float]:
    if any(w < 0 for w in weights.values()):
        raise ConfigError(f"source_weights must be non-negative, got {weights}")
    used = {name: float(w) for name, w in weights.items() if w > 0}
    if not used:
        raise ConfigError(f"source_weights {weights} select no source")
    absent = [name for name in used if not manifest.sources.get(name)]
    if absent:
        available = sorted(n for n, files in manifest.sources.items() if files)
        raise ConfigError(f"{manifest.path}: no shards for weighted sources {absent}; it has {available}")
    return used


OVERLAP_PREFETCH = 4
"""Batches each worker builds ahead when ``prefetch_factor`` is unset (torchtitan's default is
2): a step of several microbatches takes them in a burst."""


@dataclass(frozen=True, slots=True)
class LoaderSettings:
    """What ``MultimodalDataLoader.Config.resolved`` decides for the torch DataLoader."""

    num_workers: int
    pin_memory: bool
    prefetch_factor: int | None
    persistent_workers: bool
    wire: WireFormat | None


def _keep(batch: Batch) -> Batch:
    # The dataset already yields whole tensor batches; the default converter would turn the
    # (input_dict, labels) tuple into a list.
    return batch


class MultimodalDataLoader(ParallelAwareDataloader):
    """torchtitan dataloader over webdataset shards (or generated procedural data).

    Built by the trainer with ``config.dataloader.build(dp_world_size=..., dp_rank=...,
    tokenizer=..., seq_len=..., local_batch_size=..., snapshot_every_n_steps=...)`` after it has
    copied the model's latent width and vocabulary size into the config.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        shards: str = ""
        """Folder with manifest.json; empty: procedural data generated into `cache_dir`."""

        cache_dir: str = "~/.cache/unimm/procedural"
        image_size: int = 32
        patch: int = 8
        video_frames: int = 4
        num_images: int = 4096
        num_videos: int = 1024
        num_texts: int = 4096
        num_actions: int = 512
        samples_per_shard: int = 256
        procedural_seed: int = 0
        """Seed of the generated split; `seed` below only orders and mixes it."""

        source_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SOURCE_WEIGHTS))
        """Target share of the document positions from each source (normalised); a weight of 0
        drops a source. The command line re-weights the sources named here
        (--dataloader.source_weights.text 0.6). Empty (the ``mixture`` recipe): weights from
        the manifest (`manifest_weights`), and the command line gives a whole mixture instead
        (--dataloader.source_weights dclm 0.5 video 0.25 ...)."""

        p_understanding: float = 0.5
        """Probability that an image-text pair allowing both directions is laid out image-first."""

        cond_dropout: float = 0.1
        """Probability that a caption or action is dropped (classifier-free guidance)."""

        clean_conditioning_frames: bool = False
        """Keep understanding (I->T) images and action context frames clean (t = 1, no flow
        loss); default False: every frame is noised with its own t (paper App. B; sequences.py).
        A dual encoder's understanding images are clean either way (no flow target)."""

        loss_on: Literal["all", "answers"] = "all"
        """``answers``: fine-tune on question-answer data with the LM loss only on each answer
        and the <eos> after it (image-text pairs laid out image first; other documents get no
        targets) and no flow loss; ``all``: every text target (sequences.answer_document)."""

        answer_flow_loss: bool = False
        """With loss_on answers, keep the flow loss on frames as in pretraining."""

        normalize_latents: bool = True
        """Hand the model (latents - mean) / std with the manifest's per-channel statistics."""

        max_bad_fraction: float = 0.01
        """Fail when more than this fraction of a source's samples is bad (see loader.py)."""

        max_latent_deviation: float = MAX_LATENT_DEVIATION
        """Skip (as bad) samples with latents further than this many standard deviations from
        the manifest's per-channel means, or non-finite ones (see shards.SampleSpec)."""

        seed: int = 0
        num_streams: int = 0
        """Independent data streams; 0: one per data-parallel rank. Fix it to keep batches
        identical when the number of ranks changes between runs."""

        latent_dim: int = 0
        """Latent width C the model expects; the trainer sets it from the model config."""

        vocab_size: int = 0
        """The model's vocabulary size; the trainer sets it from the model config."""

        understanding_image_size: int = 0
        understanding_patch: int = 0
        """Procedural data only (dual encoder): also write raw-pixel understanding latents of the
        image-text images, fitted to this size, in patches of this side (0: one encoder)."""

        understanding_dim: int = 0
        """Width of the understanding latents the model reads (dual encoder; 0: none); the
        trainer sets it from the model config."""

        device_type: str = ""
        """The device type the batches go to ("cuda", "cpu"); the trainer sets it. Empty (tools,
        evaluation): dense float32 batches (batch.py) built in this process. Set: the wire
        format (unimm.data.wire), and the ``auto`` settings below follow the device."""

        overlap: Literal["auto", "on", "off"] = "auto"
        """Build batches in a worker process while the device computes (at least one worker,
        ``prefetch_factor`` batches ahead, pinned memory on CUDA for non-blocking copies).
        ``auto``: on when batches go to a CUDA device. One worker reads the same streams as
        the training process would, so the batches do not change (num_workers above 1 does)."""

        latent_wire_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
        """Dtype of the latent rows on their way to the device; ``auto``: bfloat16 on CUDA (the
        model computes in it), float32 elsewhere (exact)."""

        lm_capacity: float = 0.75
        """LM-target slots per batch as a fraction of its positions: the LM head and the
        cross-entropy run over this fixed number of rows (unimm.data.wire); a batch with
        more targets uses all positions. Text-only recipes: 1.0."""

        flow_capacity: float = 0.75
        """Denoised-position slots per batch as a fraction of its positions (the flow head and
        loss), like lm_capacity. Vision-heavy recipes: raise it toward 1.0."""

        def resolved(self) -> LoaderSettings:
            """The loader's process, pinning and wire settings for ``device_type``."""
            cuda = self.device_type == "cuda"
            overlap = self.overlap == "on" or (self.overlap == "auto" and cuda)
            workers = max(self.num_workers, 1) if overlap else self.num_workers
            wire = None
            if self.device_type:
                dtype = self.latent_wire_dtype if self.latent_wire_dtype != "auto" else ("bfloat16" if cuda else "float32")
                wire = WireFormat(latent_dtype=dtype, lm_capacity=self.lm_capacity, flow_capacity=self.flow_capacity)
            return LoaderSettings(
                num_workers=workers,
                pin_memory=self.pin_memory or (overlap and cuda),
                prefetch_factor=self.prefetch_factor or (OVERLAP_PREFETCH if workers else None),
                persistent_workers=self.persistent_workers,
                wire=wire,
            )

        def bind_model(self, model_config) -> None:
            """Take the latent widths and vocabulary the shards must fit from the model."""
            self.latent_dim, self.vocab_size = model_config.latent_dim, model_config.vocab_size
            self.understanding_dim = getattr(model_config, "understanding_dim", 0)

        def weights(self, manifest: Manifest) -> dict[str, float]:
            """The weighted sources: `source_weights`, or the manifest's defaults when empty."""
            return _check_weights(dict(self.source_weights) or manifest_weights(manifest), manifest)

        def prepare(self, seq_len: int, tokenizer: Tokenizer) -> Manifest:
            """Find (or generate) the shards and check them against the model, the tokenizer
            and seq_len. Called once before launch by `unimm train` and again by each rank's loader.
            """
            if self.latent_dim <= 0 or self.vocab_size <= 0:
                raise ConfigError(
                    "dataloader.latent_dim / vocab_size are unset: the trainer copies the model's values into them"
                )
            if tokenizer.get_vocab_size() > self.vocab_size:
                raise ConfigError(
                    f"tokenizer {tokenizer.config.path or 'bytes'!r} has {tokenizer.get_vocab_size()} ids "
                    f"(with its special tokens) but the model's vocabulary is {self.vocab_size}"
                )
            if not self.shards:
                procedural_dim = 3 * self.patch * self.patch
                if procedural_dim != self.latent_dim:
                    raise ConfigError(
                        f"dataloader.shards is empty, so procedural raw-pixel data (patch {self.patch}, latent width "
                        f"{procedural_dim}) would be used, but the model expects latent width {self.latent_dim}: "
                        "pass --dataloader.shards DIR (a folder with manifest.json)"
                    )
            if not self.shards and self.understanding_dim:
                procedural_dim = 3 * self.understanding_patch**2
                if procedural_dim != self.understanding_dim:
                    raise ConfigError(
                        f"dataloader.shards is empty, so procedural data would be used, whose raw-pixel understanding "
                        f"latents (dataloader.understanding_patch {self.understanding_patch}) are {procedural_dim} wide, "
                        f"but the model's understanding_proj expects {self.understanding_dim}: set "
                        "--dataloader.understanding_patch (and understanding_image_size), or pass --dataloader.shards DIR"
                    )
            manifest = load_manifest(_shard_folder(self, tokenizer), self.latent_dim)
            check_tokenizer(manifest, tokenizer)
            if self.understanding_dim:
                check_understanding(manifest, self.weights(manifest), self.understanding_dim)
            shortest_image_document = manifest.tokens_per_frame + 4  # <bos> <boi> patches <eoi> <eos>
            if manifest.tokens_per_frame and shortest_image_document > seq_len:
                raise ConfigError(
                    f"training.seq_len={seq_len} cannot hold one image: {manifest.path} has "
                    f"{manifest.tokens_per_frame} patches per frame, plus 4 special tokens"
                )
            check_document_lengths(manifest, self.weights(manifest), seq_len, self.max_bad_fraction)
            return manifest

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int,
        dp_rank: int,
        tokenizer: Tokenizer,
        seq_len: int,
        local_batch_size: int,
        snapshot_every_n_steps: int | None = 1,
    ) -> None:
        self.manifest = config.prepare(seq_len, tokenizer)
        self.settings = config.resolved()
        dataset = PackedMultimodalDataset(
            manifest=self.manifest,
            tokenizer=tokenizer,
            seq_len=seq_len,
            local_batch_size=local_batch_size,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            num_streams=config.num_streams,
            seed=config.seed,
            source_weights=config.weights(self.manifest),
            layout=LayoutSettings(
                config.p_understanding, config.cond_dropout, config.clean_conditioning_frames,
                loss_on=config.loss_on, answer_flow_loss=config.answer_flow_loss,
            ),
            normalize_latents=config.normalize_latents,
            max_bad_fraction=config.max_bad_fraction,
            num_workers=self.settings.num_workers,
            max_latent_deviation=config.max_latent_deviation,
            understanding_dim=config.understanding_dim,
            wire=self.settings.wire,
        )
        self._group_stats: dict[int, dict[str, int]] = {}
        super().__init__(
            dataset,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            batch_size=None,
            collate_fn=_keep,
            num_workers=self.settings.num_workers,
            persistent_workers=self.settings.persistent_workers,
            prefetch_factor=self.settings.prefetch_factor,
            pin_memory=self.settings.pin_memory,
            snapshot_every_n_steps=snapshot_every_n_steps,
        )

    def __iter__(self):
        for inputs, labels in super().__iter__():
            group, stats = inputs.pop(STATS_KEY)
            self._group_stats[group] = stats
            yield inputs, labels

    def stats(self) -> dict[str, int]:
        """Counters of this rank's streams as of the last batch handed out."""
        total: Counter[str] = Counter()
        for stats in self._group_stats.values():
            total.update(stats)
        return dict(total)


def _shard_folder(config: MultimodalDataLoader.Config, tokenizer: Tokenizer) -> Path:
    if config.shards:
        return Path(config.shards).expanduser()
    return ensure_procedural_shards(
        config.cache_dir,
        tokenizer.config,
        num_images=config.num_images,
        num_videos=config.num_videos,
        num_texts=config.num_texts,
        num_actions=config.num_actions,
        image_size=config.image_size,
        patch=config.patch,
        video_frames=config.video_frames,
        samples_per_shard=config.samples_per_shard,
        seed=config.procedural_seed,
        understanding_image_size=config.understanding_image_size,
        understanding_patch=config.understanding_patch,
    )
