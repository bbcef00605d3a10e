"""Pictures of rollouts and plans for a person: PNG strips, GIFs, trajectory plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

GIF_SIDE = 128  # frames are tiny (16-32 px): shown enlarged, pixel for pixel


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_strip(path: Path, frames: np.ndarray | None, titles: Sequence[str], heading: str, note: str | None = None) -> None:
    """One row of frames (uint8 [T, S, S, 3]) with a title each; without pixels (no decoder),
    the titles over empty panels and ``note`` saying why."""
    plt = _figure()
    T = len(titles)
    fig, axes = plt.subplots(1, T, figsize=(1.3 * T, 1.9), squeeze=False)
    for t, ax in enumerate(axes[0]):
        ax.axis("off")
        if frames is not None:
            ax.imshow(frames[t], interpolation="nearest")
        ax.set_title(titles[t], fontsize=6)
    fig.suptitle(heading if note is None else f"{heading}\n{note}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_gif(path: Path, frames: np.ndarray, seconds_per_frame: float = 0.4) -> None:
    """uint8 [T, S, S, 3] as a looping GIF, each frame enlarged to GIF_SIDE pixels."""
    scale = max(1, GIF_SIDE // frames.shape[1])
    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(seconds_per_frame * 1000), loop=0)


def save_grid(path: Path, rows: Sequence[tuple[str, np.ndarray | None, Sequence[str]]], note: str | None = None) -> None:
    """Several strips, one per row: (row title, uint8 [T, S, S, 3] or None, frame titles)."""
    plt = _figure()
    columns = max(len(titles) for _, _, titles in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.2 * columns, 1.35 * len(rows) + 0.4), squeeze=False)
    for (title, frames, titles), line in zip(rows, axes):
        for t, ax in enumerate(line):
            ax.axis("off")
            if t < len(titles):
                if frames is not None:
                    ax.imshow(frames[t], interpolation="nearest")
                ax.set_title(titles[t], fontsize=5)
        line[0].text(-0.1, 0.5, title, transform=line[0].transAxes, fontsize=5, ha="right", va="center")
    if note:
        fig.suptitle(note, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_trajectories(path: Path, panels: Sequence[dict], columns: int = 4) -> None:
    """Planned against true trajectories, one panel per episode: each panel a dict with
    ``title`` and ``paths`` {label: poses [T, 3]}; the true path in black, the goal starred."""
    plt = _figure()
    styles = {"truth": ("black", "-"), "cem": ("tab:blue", "-"), "random": ("tab:gray", ":"),
              "mean_action": ("tab:orange", "--"), "oracle": ("tab:green", "--")}
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, panel in zip(axes.flat, panels):
        ax.axis("on")
        for label, poses in panel["paths"].items():
            colour, line = styles.get(label, ("tab:purple", "-"))
            p = np.asarray(poses)
            ax.plot(p[:, 0], p[:, 1], line, color=colour, marker=".", markersize=3, label=label, linewidth=1)
        truth = np.asarray(panel["paths"]["truth"])
        ax.plot(truth[0, 0], truth[0, 1], "o", color="black", markersize=5)
        ax.plot(truth[-1, 0], truth[-1, 1], "*", color="black", markersize=9)
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_title(panel["title"], fontsize=7)
        ax.tick_params(labelsize=6)
    axes.flat[0].legend(fontsize=6, loc="best")
    fig.suptitle("planned vs true trajectories (x, y in metres; o start, * goal)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
