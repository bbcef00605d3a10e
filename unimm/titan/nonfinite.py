"""Steps with a non-finite loss or gradient norm: skipped, counted, and stopped when they persist.

The trainer checks the step's loss parts (summed over data-parallel ranks) and the global
gradient norm before the optimizer step, every step. A non-finite step changes nothing: no
optimizer, LR-schedule or expert-bias update, gradients zeroed, loss-centering state rolled
back. It is counted (``train/skipped_nonfinite_steps`` in metrics.jsonl, checkpointed with the
train state), logged with what the batch held, and written to ``nonfinite_steps.jsonl``
(rank 0; every rank's samples). ``max_consecutive_nonfinite_steps`` of them in a row stop the
run with NonFiniteLossError, whose message names each of those steps, its loss parts and the
shards and keys of its batch; the checkpoints on disk are then all from before the streak.

Batch provenance: the loader puts the ``(shard, key)`` of every sample packed into a batch
under ``unimm.data.batch.PROVENANCE_KEY``; the trainer takes it off before the forward pass
and keeps it for this report only.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torchtitan.tools.logging import logger

from unimm.errors import ConfigError, RunStopped

MAX_KEYS_PER_SHARD = 8
MAX_SHARDS_PER_RANK = 4


class NonFiniteLossError(RunStopped):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


@dataclass
class SkippedStep:
    step: int
    loss: float
    loss_lm: float
    loss_flow: float
    balance: float
    grad_norm: float
    batch: list[Any] = field(default_factory=list)
    """Per rank: a list of [shard, key] pairs, or a string when the loader carried none."""


def samples_of(provenance: Any) -> list[tuple[str, str]] | None:
    """The (shard, key) pairs of one rank's microbatches (a list per microbatch of a list per
    row of pairs), or None when the loader carried none."""
    if not provenance or all(p is None for p in provenance):
        return None
    pairs = []
    for microbatch in provenance:
        for row in microbatch or []:
            for source in row or []:
                if source:
                    pairs.append((str(source[0]), str(source[1])))
    return pairs


def describe_batch(batch: Any) -> str:
    """One rank's batch in a line: keys grouped by shard (truncated), or the position text."""
    if isinstance(batch, str):
        return batch
    by_shard: dict[str, list[str]] = {}
    for shard, key in batch:
        by_shard.setdefault(shard, []).append(key)
    parts = []
    for shard, keys in list(by_shard.items())[:MAX_SHARDS_PER_RANK]:
        more = f" (+{len(keys) - MAX_KEYS_PER_SHARD} more)" if len(keys) > MAX_KEYS_PER_SHARD else ""
        parts.append(f"{shard} keys {', '.join(keys[:MAX_KEYS_PER_SHARD])}{more}")
    if len(by_shard) > MAX_SHARDS_PER_RANK:
        parts.append(f"+{len(by_shard) - MAX_SHARDS_PER_RANK} more shards")
    return "; ".join(parts) or "no samples"


def describe_step(record: SkippedStep) -> str:
    ranks = [f"rank {r}: {describe_batch(b)}" for r, b in enumerate(record.batch)]
    return (
        f"step {record.step}: loss {record.loss:.6g} (lm {record.loss_lm:.6g}, flow {record.loss_flow:.6g}, "
        f"balance {record.balance:.6g}), grad_norm {record.grad_norm:.6g}; batch {' | '.join(ranks)}"
    )


class NonFiniteGuard:
    """The count of skipped steps, the current streak and the stop rule."""

    def __init__(self, max_in_a_row: int, log_path: str | os.PathLike | None):
        if max_in_a_row < 1:
            raise ConfigError(f"max_consecutive_nonfinite_steps must be at least 1, got {max_in_a_row}")
        self.max_in_a_row = max_in_a_row
        self.log_path = Path(log_path) if log_path is not None else None
        self.skipped = 0
        self.streak: list[SkippedStep] = []

    @staticmethod
    def finite(values: list[float]) -> bool:
        return all(math.isfinite(v) for v in values)

    def passed(self) -> None:
        self.streak.clear()

    def skip(self, record: SkippedStep) -> None:
        """Count a skipped step; raise NonFiniteLossError when the streak reaches the limit."""
        self.skipped += 1
        self.streak.append(record)
        if self.log_path is not None:
            with self.log_path.open("a") as f:
                row = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in asdict(record).items()}
                f.write(json.dumps(row) + "\n")
        logger.warning(
            f"skipped {describe_step(record)} ({len(self.streak)} in a row; the run stops at "
            f"{self.max_in_a_row}; {self.skipped} skipped in all)"
        )
        if len(self.streak) >= self.max_in_a_row:
            first, last = self.streak[0].step, self.streak[-1].step
            where = f" (every rank's samples: {self.log_path})" if self.log_path is not None else ""
            message = (
                f"stopping at step {last}: {len(self.streak)} consecutive steps ({first}-{last}) had a non-finite "
                f"loss or gradient norm (max_consecutive_nonfinite_steps={self.max_in_a_row}); they were skipped, so "
                f"every checkpoint holds the weights from before step {first}. Lower the learning rate or leave out "
                f"the data below, then resume{where}.\n  " + "\n  ".join(describe_step(r) for r in self.streak)
            )
            logger.error(message)
            raise NonFiniteLossError(message)
