"""Per-channel statistics of encoder latents: gathered by the writers, applied by the loader.

Encoders differ wildly in scale (raw pixels in [-1, 1], VAE latents of a few units, SigLIP
features in the tens), and flow matching assumes data of roughly unit variance against unit
Gaussian noise. So every writer accumulates per-channel sums over the latents it stores (in
float64, exactly mergeable across shards, workers and sources), the manifest keeps mean and
std, and the loader hands the model (z - mean) / std. Decoding generated latents goes
through `LatentNormalizer.denormalize` first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# A channel that never varies (a border that is always white, say) would divide by zero.
MIN_STD = 1e-3


@dataclass
class ChannelStats:
    """Running count, sum and sum of squares per channel (the last axis of the latents)."""

    count: int
    total: np.ndarray  # float64 [C]
    total_sq: np.ndarray  # float64 [C]

    @classmethod
    def empty(cls, channels: int) -> ChannelStats:
        return cls(0, np.zeros(channels), np.zeros(channels))

    def update(self, latents: np.ndarray) -> None:
        rows = latents.reshape(-1, latents.shape[-1]).astype(np.float64)
        self.count += len(rows)
        self.total += rows.sum(axis=0)
        self.total_sq += np.square(rows).sum(axis=0)

    def merge(self, other: ChannelStats) -> ChannelStats:
        return ChannelStats(self.count + other.count, self.total + other.total, self.total_sq + other.total_sq)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    @property
    def std(self) -> np.ndarray:
        var = self.total_sq / max(self.count, 1) - np.square(self.mean)
        return np.sqrt(np.maximum(var, 0.0))

    def to_json(self) -> dict[str, Any]:
        # The sums travel too, so manifests of several sources merge into exact pooled stats.
        return {
            "count": self.count,
            "sum": self.total.tolist(),
            "sum_sq": self.total_sq.tolist(),
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChannelStats:
        return cls(int(data["count"]), np.asarray(data["sum"], np.float64), np.asarray(data["sum_sq"], np.float64))


def to_float32(latents: np.ndarray) -> np.ndarray:
    """A float32 copy. Through torch: its vectorised float16 conversion is ~10x numpy's, and
    this is the loader's largest per-position cost at the paper's latent width."""
    return torch.from_numpy(np.ascontiguousarray(latents)).to(torch.float32, copy=True).numpy()


@dataclass(frozen=True)
class LatentNormalizer:
    mean: np.ndarray  # float32 [C]
    std: np.ndarray  # float32 [C], at least MIN_STD

    @classmethod
    def from_stats(cls, stats: ChannelStats) -> LatentNormalizer:
        return cls(stats.mean.astype(np.float32), np.maximum(stats.std, MIN_STD).astype(np.float32))

    def normalize(self, latents: np.ndarray) -> np.ndarray:
        """A new float32 array, normalised in place after one copy (the loader's hot path)."""
        out = to_float32(latents)
        out -= self.mean
        out /= self.std
        return out

    def denormalize(self, latents: np.ndarray) -> np.ndarray:
        return latents * self.std + self.mean
