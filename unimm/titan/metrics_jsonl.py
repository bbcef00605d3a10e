"""A torchtitan metrics logger that appends one JSON object per logged step to a file.

``metrics.jsonl`` is what the CLI plots and what sweeps collect; TensorBoard stays available
through torchtitan's own ``--metrics.enable_tensorboard``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from torchtitan.components.metrics import BaseLogger

logger = logging.getLogger(__name__)

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
    """The rows of a JSON-lines file. A line that does not parse (a write cut short when the
    process was killed) is skipped with a warning instead of making every reader fail."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s:%d: skipping a line that is not JSON (a torn write?): %.80r", path, number, line)
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            logger.warning("%s:%d: skipping a row without an integer 'step'", path, number)
    return rows


def keep_rows(path: str | os.PathLike, keep) -> None:
    """Rewrite a JSON-lines file with the parseable rows for which ``keep(row)`` holds
    (atomically: a temporary file renamed over it). A missing file stays missing."""
    path = Path(path)
    if not path.exists():
        return
    kept = [row for row in read_metrics(path) if keep(row)]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    os.replace(tmp, path)


def drop_rows_after(path: str | os.PathLike, step: int) -> None:
    """Resuming from the checkpoint of ``step``: the rows a crashed run wrote after it will be
    written again, so they go (and a torn last line with them)."""
    keep_rows(path, lambda row: row["step"] <= step)


class JsonlLogger(BaseLogger):
    def __init__(self, path: str | os.PathLike, world_size: int, passthrough: BaseLogger):
        self.path = Path(path)
        self.world_size = world_size
        self.passthrough = passthrough
        self._truncated = False

    def _drop_rows_from(self, step: int) -> None:
        # A resumed run re-logs the steps after its checkpoint; rows a crashed run wrote
        # past that point would otherwise appear twice. (The trainer also drops the rows
        # after the checkpoint's step as it loads it: drop_rows_after.)
        keep_rows(self.path, lambda row: row["step"] < step)

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
            f.write(json.dumps(row) + "\n")  # one write per row: a kill tears at most the last line

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
