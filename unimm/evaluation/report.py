"""Writing evaluation results: JSON (NaN and inf as null, numpy values as plain numbers) and
matplotlib figures drawn off pyplot's global state (Agg canvas)."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(data), indent=1) + "\n")
    return path


def figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: Path, dpi: int = 110) -> str:
    fig.tight_layout()
    # "tight" grows the canvas to every title: tight_layout alone clips a grid's top titles
    fig.savefig(path, dpi=dpi, format="png", bbox_inches="tight")
    return path.name


def printable(text: str) -> str:
    """``text`` with control characters (an untrained model's bytes) shown as '?', for titles."""
    return "".join(c if c.isprintable() or c == "\n" else "?" for c in text)


def clipped(text: str, width: int = 28, lines: int = 2) -> str:
    """``text`` wrapped for a small title: at most ``lines`` lines of ``width`` characters (long
    unbroken runs, such as an untrained model's bytes, are cut too)."""
    return textwrap.fill(printable(text).replace("\n", " "), width, max_lines=lines, placeholder=" ...") or '""'


def image_grid(path: Path, cells: list[tuple[np.ndarray | None, str, bool | None]], columns: int = 8) -> str:
    """A grid of images, each titled (green when its verdict is True, red when False)."""
    rows = max(1, math.ceil(len(cells) / columns))
    cols = max(1, min(columns, len(cells)))
    fig = figure((1.9 * cols, 2.2 * rows))
    for i, (pixels, title, verdict) in enumerate(cells):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.axis("off")
        if pixels is not None:
            ax.imshow(pixels, interpolation="nearest")
        colour = "black" if verdict is None else ("tab:green" if verdict else "tab:red")
        ax.set_title(printable(title), fontsize=6, color=colour)
    return save(fig, path, dpi=100)
