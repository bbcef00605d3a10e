"""A torchtitan metrics logger that appends one JSON object per logged step to a file.

``metrics.jsonl`` is what the CLI plots and what sweeps collect; TensorBoard stays available
through torchtitan's own ``--metrics.enable_tensorboard``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from torchtitan.components.metrics import BaseLogger

# torchtitan's metric names -> the short names of metrics.jsonl
RENAMES = {
    "loss_metrics/global_avg_loss": "loss",
    "throughput(tps)": "tokens_per_s_per_device",
    "grad_norm": "grad_norm",
    "tflops": "tflops_per_device",
    "mfu(%)": "mfu_pct",
    "memory/max_reserved(GiB)": "memory_gib",
    "time_metrics/end_to_end(s)": "step_time_s",
}


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class JsonlLogger(BaseLogger):
    def __init__(self, path: str | os.PathLike, world_size: int, passthrough: BaseLogger):
        self.path = Path(path)
        self.world_size = world_size
        self.passthrough = passthrough
        self._truncated = False

    def _drop_rows_from(self, step: int) -> None:
        # A resumed run re-logs the steps after its checkpoint; rows a crashed run wrote
        # past that point would otherwise appear twice.
        kept = [row for row in read_metrics(self.path) if row["step"] < step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        os.replace(tmp, self.path)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.passthrough.log(metrics, step)
        if not self._truncated:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._drop_rows_from(step)
            self._truncated = True
        row: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            row[RENAMES.get(key, key)] = value
        row["tokens_per_s"] = row["tokens_per_s_per_device"] * self.world_size
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self.passthrough.close()


class ExpertLoadLog:
    """Tokens per expert of every MoE layer at each logged step, one JSON line per step, for
    expert maps and specialisation analyses (too wide for the scalar metrics)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def write(self, step: int, tokens_per_expert_LE) -> None:
        row = {"step": step, "tokens_per_expert": tokens_per_expert_LE.long().tolist()}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
