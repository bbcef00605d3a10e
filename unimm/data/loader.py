"""The train-time loader: weighted source mixture -> documents -> packed rows -> batches.

Determinism and sharding contract. The data is cut into `num_streams` independent streams
(0 means one per data-parallel rank). Stream s has its own RNG seeded from (seed, s), its own
readers (shards or records with index % num_streams == s, endless, reshuffled every epoch) and
its own packer. Rank r of W owns streams [r*S/W, (r+1)*S/W); a local batch stacks
local_batch_size/(S/W) consecutive rows of each owned stream, in stream order. So the global
batch depends on (seed, S, global batch size) and not on how many ranks share it: 1 rank with
local batch 2b and 2 streams sees what 2 ranks with local batch b see together.

Exact resume: every stream's reader positions, RNG state and packer carry-over are in the
dataset's state_dict, which torchdata's StatefulDataLoader saves between batches.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset
from torchtitan.components.dataloader import ParallelAwareDataloader

from unimm.data.packer import Packer, Row
from unimm.errors import ConfigError
from unimm.data.sequences import Document, SpecialTokens, build_document
from unimm.data.shards import Manifest, ShardCursor, load_manifest
from unimm.data_pipelines.write_shards import ensure_procedural_shards

# Per-document sampling probabilities (paper E.8 mixes 50% text, 25% video, 22.5% image-text
# and 2.5% action data; action data has no procedural source yet).
DEFAULT_SOURCE_WEIGHTS = {"text": 0.5, "image_text": 0.25, "video": 0.25}
_SPECIAL_IDS = ("pad_id", "bos_id", "eos_id", "boi_id", "eoi_id")

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


class _Stream:
    """One deterministic stream: its RNG, one reader per source and a packer."""

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
        p_understanding: float,
        cond_dropout: float,
    ) -> None:
        self.index = index
        self.rng = np.random.default_rng([seed, index])
        self._names = sorted(weights)  # sorted: the draw must not depend on config dict order
        probs = np.array([weights[n] for n in self._names], dtype=np.float64)
        self._cumulative = np.cumsum(probs / probs.sum())
        self.cursors = {
            name: ShardCursor(
                name,
                manifest.sources[name],
                stream=index,
                num_streams=num_streams,
                seed=seed,
                tokens_per_frame=manifest.tokens_per_frame,
                latent_dim=manifest.latent_dim,
            )
            for name in self._names
        }
        self.packer = Packer(seq_len, manifest.latent_dim, tokenizer.pad_id)
        self._tokenizer, self._latent_dim = tokenizer, manifest.latent_dim
        self._p_understanding, self._cond_dropout = p_understanding, cond_dropout
        self.rows = 0
        self.documents: Counter[str] = Counter()

    def _next_document(self) -> Document:
        pick = int(np.searchsorted(self._cumulative, self.rng.random(), side="right"))
        name = self._names[min(pick, len(self._names) - 1)]
        sample = self.cursors[name].next()
        self.documents[sample["kind"]] += 1
        return build_document(
            sample,
            self._tokenizer,
            self.rng,
            latent_dim=self._latent_dim,
            p_understanding=self._p_understanding,
            cond_dropout=self._cond_dropout,
        )

    def next_row(self) -> Row:
        self.rows += 1
        return self.packer.next_row(self._next_document)

    def state_dict(self) -> dict[str, Any]:
        return {
            "rng": self.rng.bit_generator.state,
            "cursors": {name: c.state_dict() for name, c in self.cursors.items()},
            "packer": self.packer.state_dict(),
            "rows": self.rows,
            "documents": dict(self.documents),
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
        self.rows, self.documents = state["rows"], Counter(state["documents"])


class PackedMultimodalDataset(IterableDataset):
    """Endless iterable of whole local batches `(input_dict, labels)` for one data-parallel rank."""

    def __init__(
        self,
        *,
        manifest: Manifest,
        tokenizer: SpecialTokens,
        seq_len: int,
        local_batch_size: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        num_streams: int = 0,
        seed: int = 0,
        source_weights: dict[str, float] | None = None,
        p_understanding: float = 0.5,
        cond_dropout: float = 0.1,
    ) -> None:
        num_streams = num_streams or dp_world_size
        if num_streams % dp_world_size:
            raise ConfigError(
                f"num_streams {num_streams} is not divisible by the data-parallel world size {dp_world_size}"
            )
        per_rank = num_streams // dp_world_size
        if local_batch_size % per_rank:
            raise ConfigError(
                f"local_batch_size {local_batch_size} is not divisible by the {per_rank} streams "
                f"of each rank (num_streams {num_streams} / dp world size {dp_world_size})"
            )
        missing = [n for n in _SPECIAL_IDS if getattr(tokenizer, n, None) is None]
        if missing:
            raise ConfigError(f"tokenizer {type(tokenizer).__name__} lacks special token ids {missing}")
        weights = _check_weights(source_weights or DEFAULT_SOURCE_WEIGHTS, manifest)
        self.num_streams = num_streams
        self.rows_per_stream = local_batch_size // per_rank
        self.streams = [
            _Stream(
                s,
                num_streams=num_streams,
                manifest=manifest,
                weights=weights,
                seed=seed,
                tokenizer=tokenizer,
                seq_len=seq_len,
                p_understanding=p_understanding,
                cond_dropout=cond_dropout,
            )
            for s in range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        ]

    def next_batch(self) -> Batch:
        rows = [stream.next_row() for stream in self.streams for _ in range(self.rows_per_stream)]
        fields = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
        labels = fields.pop("labels")
        return fields, labels

    def __iter__(self):
        # All state lives in the streams, so a state_dict taken between batches resumes exactly.
        while True:
            yield self.next_batch()

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
        """Counters summed over this rank's streams, flat so they can go straight to a metrics logger."""
        out: Counter[str] = Counter()
        for stream in self.streams:
            out["rows"] += stream.rows
            out["padding_positions"] += stream.packer.padding
            out["too_long_documents"] += stream.packer.too_long
            for kind, n in stream.documents.items():
                out[f"documents/{kind}"] += n
            for name, cursor in stream.cursors.items():
                for key, n in cursor.counters.items():
                    out[f"{key}/{name}"] += n
                    out[key] += n
        return dict(out)


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


def _keep(batch: Batch) -> Batch:
    # The dataset already yields whole tensor batches; the default converter would turn the
    # (input_dict, labels) tuple into a list.
    return batch


class MultimodalDataLoader(ParallelAwareDataloader):
    """torchtitan dataloader over webdataset shards (or generated procedural data).

    Built by the trainer with ``config.dataloader.build(dp_world_size=..., dp_rank=...,
    tokenizer=..., seq_len=..., local_batch_size=..., snapshot_every_n_steps=...)`` after it has
    copied the model's latent width into ``config.dataloader.latent_dim``.
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
        samples_per_shard: int = 256
        procedural_seed: int = 0
        """Seed of the generated split; `seed` below only orders and mixes it."""

        source_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SOURCE_WEIGHTS))
        """Probability of drawing each source's next document (normalised)."""

        p_understanding: float = 0.5
        """Probability that an image-text pair is laid out image-first (captioning)."""

        cond_dropout: float = 0.1
        """Probability that a generation caption is dropped (classifier-free guidance)."""

        seed: int = 0
        num_streams: int = 0
        """Independent data streams; 0: one per data-parallel rank. Fix it to keep batches
        identical when the number of ranks changes between runs."""

        latent_dim: int = 0
        """Latent width C the model expects; the trainer sets it from the model config."""

        def prepare(self, seq_len: int) -> Manifest:
            """Find (or generate) the shards and check them against the model and seq_len.

            Called once before launch by `unimm train` and again by each rank's loader.
            """
            if self.latent_dim <= 0:
                raise ConfigError("dataloader.latent_dim is unset: the trainer copies the model's latent width into it")
            if not self.shards:
                procedural_dim = 3 * self.patch * self.patch
                if procedural_dim != self.latent_dim:
                    raise ConfigError(
                        f"dataloader.shards is empty, so procedural raw-pixel data (patch {self.patch}, latent width "
                        f"{procedural_dim}) would be used, but the model expects latent width {self.latent_dim}: "
                        "pass --dataloader.shards DIR (a folder with manifest.json)"
                    )
            manifest = load_manifest(_shard_folder(self), self.latent_dim)
            shortest_image_document = manifest.tokens_per_frame + 4  # <bos> <boi> patches <eoi> <eos>
            if shortest_image_document > seq_len:
                raise ConfigError(
                    f"training.seq_len={seq_len} cannot hold one image: {manifest.path} has "
                    f"{manifest.tokens_per_frame} patches per frame, plus 4 special tokens"
                )
            return manifest

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int,
        dp_rank: int,
        tokenizer: SpecialTokens,
        seq_len: int,
        local_batch_size: int,
        snapshot_every_n_steps: int | None = 1,
    ) -> None:
        if config.latent_dim <= 0:
            raise ConfigError(
                "dataloader latent_dim is unset: the trainer must copy the model's latent width into it"
            )
        if config.num_workers:
            # A batch takes rows from every stream of the rank; workers would each build whole
            # batches from a subset of streams and break the global-batch contract.
            raise ConfigError("the multimodal loader runs in the training process: set num_workers = 0")
        self.manifest = config.prepare(seq_len)
        dataset = PackedMultimodalDataset(
            manifest=self.manifest,
            tokenizer=tokenizer,
            seq_len=seq_len,
            local_batch_size=local_batch_size,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            num_streams=config.num_streams,
            seed=config.seed,
            source_weights=config.source_weights,
            p_understanding=config.p_understanding,
            cond_dropout=config.cond_dropout,
        )
        super().__init__(
            dataset,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            batch_size=None,
            collate_fn=_keep,
            pin_memory=config.pin_memory,
            snapshot_every_n_steps=snapshot_every_n_steps,
        )

    def stats(self) -> dict[str, int]:
        return self.dataset.stats()


def _shard_folder(config: MultimodalDataLoader.Config) -> Path:
    if config.shards:
        return Path(config.shards).expanduser()
    return ensure_procedural_shards(
        config.cache_dir,
        num_images=config.num_images,
        num_videos=config.num_videos,
        num_texts=config.num_texts,
        image_size=config.image_size,
        patch=config.patch,
        video_frames=config.video_frames,
        samples_per_shard=config.samples_per_shard,
        seed=config.procedural_seed,
    )
