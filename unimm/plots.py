"""Loss curves from metrics.jsonl as a PNG, for a person to look at after a run."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from unimm.titan.metrics_jsonl import read_metrics  # noqa: E402


def plot_losses(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> Path | None:
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(
        axes, ("loss", "loss_lm", "loss_flow"), ("total", "text: next-token CE", "vision: flow matching MSE")
    ):
        ax.plot(steps, [r.get(key) for r in rows], marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(str(Path(metrics_path).parent.name))
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
