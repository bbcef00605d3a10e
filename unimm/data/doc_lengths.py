"""Document lengths per source: counted by the shard writers, checked before a run starts.

A document longer than a packed row (``training.seq_len``) cannot be trained on: the loader
skips it, and a source where more than ``dataloader.max_bad_fraction`` of the samples are
skipped stops the run. The writers count every sample's document length (in positions, as
`document_length` computes it from the layout of `unimm.data.sequences`), so `unimm train`
can tell from the manifest alone, before any process starts, which sources would be skipped
and by how much.

The counts are exact (a histogram {length: samples}), so the share of samples over any
seq_len is exact too, including the common case of text cut to exactly ``seq_len - 2``
tokens. Its size is bounded by the number of distinct lengths (at most the job's
``--max-tokens`` for cut text, a few hundred for captions). Manifests written before these
counts existed simply have none, and the check is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def document_length(num_tokens: int, frames: int = 0, tokens_per_frame: int = 0) -> int:
    """Positions of the longest document the loader builds from a sample (sequences.py):
    ``<bos>``, the text ids, each frame as ``<boi>`` N patches ``<eoi>``, ``<eos>``. Caption
    dropout only shortens it; every kind and direction has the same longest length."""
    return 2 + num_tokens + frames * (tokens_per_frame + 2)


@dataclass
class DocumentLengths:
    """Exact histogram of document lengths, and where the longest document is."""

    counts: dict[int, int] = field(default_factory=dict)
    longest_key: str = ""
    longest_shard: str = ""

    def add(self, length: int, key: str) -> None:
        if not self.counts or length > self.longest:
            self.longest_key = key
        self.counts[length] = self.counts.get(length, 0) + 1

    @property
    def samples(self) -> int:
        return sum(self.counts.values())

    @property
    def longest(self) -> int:
        return max(self.counts, default=0)

    def in_shard(self, shard: str) -> DocumentLengths:
        """Name the shard of the longest document (the writer knows it only per shard)."""
        if not self.longest_shard:
            self.longest_shard = shard
        return self

    def merge(self, other: DocumentLengths) -> DocumentLengths:
        counts = dict(self.counts)
        for length, n in other.counts.items():
            counts[length] = counts.get(length, 0) + n
        first = other if other.longest > self.longest else self  # ties: the earlier shard
        return DocumentLengths(counts, first.longest_key, first.longest_shard)

    def longer_than(self, limit: int) -> int:
        """Samples whose document has more than ``limit`` positions."""
        return sum(n for length, n in self.counts.items() if length > limit)

    def percentile(self, q: float) -> int:
        """The smallest length at or under which at least ``q`` percent of the samples lie."""
        need, seen = q / 100 * self.samples, 0
        for length in sorted(self.counts):
            seen += self.counts[length]
            if seen >= need:
                return length
        return 0

    def to_json(self) -> dict[str, Any]:
        return {
            "longest": self.longest,
            "longest_key": self.longest_key,
            "longest_shard": self.longest_shard,
            "p50": self.percentile(50),
            "p99": self.percentile(99),
            "counts": {str(length): self.counts[length] for length in sorted(self.counts)},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> DocumentLengths | None:
        """None for stats written before the counts existed."""
        if not data:
            return None
        counts = {int(length): int(n) for length, n in data["counts"].items()}
        return cls(counts, data.get("longest_key", ""), data.get("longest_shard", ""))
