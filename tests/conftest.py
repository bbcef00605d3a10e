import subprocess
import sys
from pathlib import Path

import pytest

from unimm.titan.metrics_jsonl import read_metrics


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One small procedural dataset for every training test of the session."""
    return tmp_path_factory.mktemp("procedural")


def small_run_options(cache: Path) -> list[str]:
    """debug_cpu shrunk to seconds per run: small batches, a small procedural dataset."""
    return [
        "--training.local_batch_size", "4",
        "--dataloader.num_images", "256",
        "--dataloader.num_videos", "64",
        "--dataloader.num_texts", "256",
        "--dataloader.samples_per_shard", "64",
        "--dataloader.cache_dir", str(cache),
        "--metrics.log_freq", "1",
    ]


def run_unimm(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unimm.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    return {row["step"]: row[key] for row in read_metrics(run_dir / "metrics.jsonl")}
