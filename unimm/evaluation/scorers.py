"""Exact, pixel-level scorers for images generated from the procedural prompts.

The procedural scenes (``unimm.data_pipelines.procedural``) are flat palette colours on a plain
background, so a generated image can be judged without a learned judge:

* colour: segment the foreground (pixels far from the background), map each pixel to its nearest
  palette colour, take the majority;
* shape: template matching; every candidate shape is drawn with the project's own ``render`` at
  the segmented object's centroid and area-equivalent size and the best IoU wins;
* count: connected components of the foreground (4-connected) of at least ``min_area`` pixels;
* relation: left/right/above/below (or the diagonal probe relations) from two objects' centroids,
  with the same tie rule as ``procedural._relation`` (horizontal when |dx| > |dy|);
* text: character and word error rates (Levenshtein distance / reference length), for the text
  rendering probe once an OCR transcript of the generated image is available.

Each scorer returns a small frozen dataclass with the prediction and ``correct``.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from unimm.data_pipelines.procedural import BACKGROUND, COLOURS, SHAPES, SceneObject, render

# A pixel is foreground when some channel differs from the background by more than this. Every
# palette colour differs from white by >= 127 in its strongest channel, so half of that keeps the
# anti-aliased rim out of the mask without losing interiors.
FOREGROUND_THRESHOLD = 60
# Pixels farther than this (RGB Euclidean) from every palette colour are rim/blend pixels and do
# not vote in the colour majority (unless no pixel is closer, then everyone votes).
PALETTE_TOLERANCE = 60.0

_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _PALETTE_NAMES], dtype=np.float64)  # [P, 3]


# --------------------------------------------------------------------------- segmentation


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] < 3:
        raise ValueError(f"expected an [H, W, 3] RGB image, got shape {image.shape}")
    if image.dtype != np.uint8:
        image = np.clip(np.asarray(image, dtype=np.float64), 0, 255).round().astype(np.uint8)
    return image[..., :3]


def foreground_mask(
    image: np.ndarray, background: Sequence[int] = BACKGROUND, threshold: int = FOREGROUND_THRESHOLD
) -> np.ndarray:
    """Boolean [H, W]: pixels whose largest channel difference to ``background`` > threshold."""
    rgb = _as_rgb(image).astype(np.int16)
    diff = np.abs(rgb - np.asarray(background, dtype=np.int16)[None, None, :]).max(axis=-1)
    return diff > threshold


def connected_components(mask: np.ndarray, min_area: int = 1) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as boolean masks, largest first.

    Components smaller than ``min_area`` pixels are dropped. Breadth-first search in Python: the
    procedural images are at most a few hundred pixels a side.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    components: list[np.ndarray] = []
    next_label = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        next_label += 1
        labels[y0, x0] = next_label
        queue = deque([(int(y0), int(x0))])
        pixels = []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = next_label
                    queue.append((ny, nx))
        if len(pixels) >= min_area:
            comp = np.zeros((h, w), dtype=bool)
            ys, xs = zip(*pixels)
            comp[list(ys), list(xs)] = True
            components.append(comp)
    components.sort(key=lambda m: int(m.sum()), reverse=True)
    return components


def default_min_area(image_size: int) -> int:
    """Smallest object worth counting: 0.2% of the image, at least 4 pixels.

    The smallest procedural object (radius 0.14 * S shrunk twice by 0.8, a star) covers more than
    0.5% of the image; anti-aliasing specks and stray generated pixels are far below it.
    """
    return max(4, int(0.002 * image_size * image_size))


def centroid(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) pixel centroid of a non-empty mask, x to the right and y down (procedural convention)."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("empty mask has no centroid")
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5  # pixel centres, as render() samples them


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


# --------------------------------------------------------------------------- colour


@dataclass(frozen=True)
class ColourScore:
    predicted: str | None  # palette name; None when there is no foreground
    expected: str
    correct: bool
    votes: dict[str, int]  # palette name -> pixels that voted for it


def nearest_palette(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index into ``COLOURS`` order and Euclidean distance of each [N, 3] pixel's nearest colour."""
    d = np.linalg.norm(np.asarray(pixels, dtype=np.float64)[:, None, :] - _PALETTE[None], axis=-1)
    idx = d.argmin(axis=1)
    return idx, d[np.arange(len(idx)), idx]


def majority_colour(image: np.ndarray, mask: np.ndarray) -> tuple[str | None, dict[str, int]]:
    pixels = _as_rgb(image)[np.asarray(mask, dtype=bool)]
    if len(pixels) == 0:
        return None, {}
    idx, dist = nearest_palette(pixels)
    core = dist <= PALETTE_TOLERANCE
    if core.any():
        idx = idx[core]
    counts = np.bincount(idx, minlength=len(_PALETTE_NAMES))
    votes = {_PALETTE_NAMES[i]: int(c) for i, c in enumerate(counts) if c}
    return _PALETTE_NAMES[int(counts.argmax())], votes


def score_colour(
    image: np.ndarray,
    expected: str,
    mask: np.ndarray | None = None,
    background: Sequence[int] = BACKGROUND,
) -> ColourScore:
    """Majority palette colour of the foreground (or of ``mask``, e.g. one object's component)."""
    if expected not in COLOURS:
        raise ValueError(f"unknown colour {expected!r}; palette: {', '.join(COLOURS)}")
    if mask is None:
        mask = foreground_mask(image, background)
    predicted, votes = majority_colour(image, mask)
    return ColourScore(predicted, expected, predicted == expected, votes)


# --------------------------------------------------------------------------- shape


@functools.lru_cache(maxsize=None)
def _unit_area(shape: str, colour: str) -> float:
    """Foreground pixels of ``shape`` drawn by ``render`` at radius 1 (measured at radius 100)."""
    size, r = 256, 100.0
    img = render([SceneObject(colour, shape, (size / 2, size / 2), r)], size)
    return float(foreground_mask(img).sum()) / (r * r)


@dataclass(frozen=True)
class ShapeScore:
    predicted: str | None  # None when there is no foreground
    expected: str
    correct: bool
    ious: dict[str, float]  # best IoU of each candidate template


def _coverage(rgb: np.ndarray, colour: str, background: Sequence[int]) -> np.ndarray:
    """Per-pixel coverage in [0, 1] of a flat ``colour`` over ``background`` (anti-aliasing kept)."""
    bg = np.asarray(background, dtype=np.float64)
    span = np.asarray(COLOURS[colour], dtype=np.float64) - bg  # [3]
    denom = float(span @ span)
    if denom == 0:
        return np.zeros(rgb.shape[:2])
    alpha = (rgb.astype(np.float64) - bg) @ span / denom  # projection onto background->colour
    return np.clip(alpha, 0.0, 1.0)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def match_shape(
    image: np.ndarray,
    mask: np.ndarray,
    candidates: Sequence[str] = SHAPES,
    colour: str | None = None,
    scales: Sequence[float] = (0.92, 0.96, 1.0, 1.04, 1.08),
    background: Sequence[int] = BACKGROUND,
) -> tuple[str | None, dict[str, float]]:
    """Best-IoU template for one object's mask; returns (shape, {candidate: best IoU}).

    Each candidate is drawn with ``procedural.render`` at the mask's centroid (a regular polygon's
    and the star's centroid is its centre) and at the radius whose drawn area equals the mask's
    area, times each of ``scales`` (the area-to-radius estimate is off by the anti-aliased rim).
    The IoU is the soft (fuzzy) one, sum(min) / sum(max), of the anti-aliased coverage of the
    object's colour in the image and in the template, over the object's mask grown by two pixels;
    coverage keeps the rim, which is what separates a small circle from an octagon. Templates are
    drawn on a square crop around the object on the same pixel grid, so drawing stays cheap.
    """
    mask = np.asarray(mask, dtype=bool)
    area = int(mask.sum())
    if area == 0:
        return None, {}
    rgb = _as_rgb(image)
    h, w = mask.shape
    if colour is None:
        colour, _ = majority_colour(rgb, mask)
    cx, cy = centroid(mask)
    region = _dilate(mask, 2)
    ys, xs = np.nonzero(region)
    # Square crop holding the region and the largest template, on the image's integer pixel grid.
    r_max = max((area / _unit_area(s, colour)) ** 0.5 for s in candidates) * max(scales)
    half = int(np.ceil(max(r_max, (ys.max() - ys.min() + 1) / 2, (xs.max() - xs.min() + 1) / 2))) + 3
    x0, y0 = int(np.floor(cx)) - half, int(np.floor(cy)) - half
    side = 2 * half + 1
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[...] = np.asarray(background, dtype=np.uint8)
    crop_img = canvas.copy()
    sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y0 + side, h), min(x0 + side, w)
    crop_img[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = rgb[sy0:sy1, sx0:sx1]
    crop_region = np.zeros((side, side), bool)
    crop_region[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = region[sy0:sy1, sx0:sx1]
    target = _coverage(crop_img, colour, background) * crop_region
    ious: dict[str, float] = {}
    for shape in candidates:
        r0 = (area / _unit_area(shape, colour)) ** 0.5
        best = 0.0
        for s in scales:
            obj = SceneObject(colour, shape, (cx - x0, cy - y0), r0 * s)
            template = _coverage(render([obj], side, background=canvas), colour, background) * crop_region
            union = np.maximum(target, template).sum()
            best = max(best, float(np.minimum(target, template).sum() / union) if union else 0.0)
        ious[shape] = best
    return max(ious, key=ious.get), ious


def score_shape(
    image: np.ndarray,
    expected: str,
    mask: np.ndarray | None = None,
    candidates: Sequence[str] = SHAPES,
    background: Sequence[int] = BACKGROUND,
) -> ShapeScore:
    """Shape of ``mask`` (default: the largest foreground component) by template IoU."""
    if expected not in SHAPES:
        raise ValueError(f"unknown shape {expected!r}; shapes: {', '.join(SHAPES)}")
    if mask is None:
        comps = connected_components(foreground_mask(image, background))
        if not comps:
            return ShapeScore(None, expected, False, {})
        mask = comps[0]
    predicted, ious = match_shape(image, mask, candidates, background=background)
    return ShapeScore(predicted, expected, predicted == expected, ious)


# --------------------------------------------------------------------------- count


@dataclass(frozen=True)
class CountScore:
    predicted: int
    expected: int
    correct: bool
    abs_error: int
    areas: tuple[int, ...]  # pixel area of each counted component, largest first


def score_count(
    image: np.ndarray,
    expected: int,
    min_area: int | None = None,
    background: Sequence[int] = BACKGROUND,
) -> CountScore:
    """Number of 4-connected foreground components with at least ``min_area`` pixels.

    ``min_area`` defaults to ``default_min_area(image side)``. Overlapping or touching objects
    count as one, as a person would need to look twice too; procedural scenes never overlap.
    """
    mask = foreground_mask(image, background)
    if min_area is None:
        min_area = default_min_area(max(mask.shape))
    comps = connected_components(mask, min_area)
    n = len(comps)
    return CountScore(n, int(expected), n == int(expected), abs(n - int(expected)), tuple(int(c.sum()) for c in comps))


# --------------------------------------------------------------------------- relation

_CARDINAL_ALIASES = {
    "left": "left",
    "left of": "left",
    "to the left of": "left",
    "right": "right",
    "right of": "right",
    "to the right of": "right",
    "above": "above",
    "up": "above",
    "top": "above",
    "below": "below",
    "down": "below",
    "bottom": "below",
    "under": "below",
}
DIAGONAL_RELATIONS = ("top left", "top right", "bottom left", "bottom right")


def relation_of(a: tuple[float, float], b: tuple[float, float], scheme: str = "cardinal") -> str:
    """Where point ``a`` is relative to ``b`` (x right, y down).

    cardinal: "left"/"right" when |dx| > |dy|, else "above"/"below" (``procedural._relation``);
    diagonal: "top left" ... "bottom right" (``probes.diagonal``; ties go to right/bottom).
    """
    dx, dy = a[0] - b[0], a[1] - b[1]
    if scheme == "cardinal":
        if abs(dx) > abs(dy):
            return "left" if dx < 0 else "right"
        return "above" if dy < 0 else "below"
    if scheme == "diagonal":
        return f"{'top' if dy < 0 else 'bottom'} {'left' if dx < 0 else 'right'}"
    raise ValueError(f"unknown relation scheme {scheme!r} (cardinal, diagonal)")


def normalise_relation(relation: str) -> tuple[str, str]:
    """(canonical relation, scheme) from a phrase such as "to the left of" or "top right"."""
    key = " ".join(relation.lower().split())
    if key in DIAGONAL_RELATIONS:
        return key, "diagonal"
    if key in _CARDINAL_ALIASES:
        return _CARDINAL_ALIASES[key], "cardinal"
    raise ValueError(f"unknown relation {relation!r}")


@dataclass(frozen=True)
class RelationScore:
    predicted: str | None  # None when either object is not found
    expected: str
    correct: bool
    centroid_a: tuple[float, float] | None
    centroid_b: tuple[float, float] | None


def find_object(
    image: np.ndarray,
    colour: str,
    shape: str | None = None,
    min_area: int | None = None,
    background: Sequence[int] = BACKGROUND,
) -> np.ndarray | None:
    """Largest foreground component whose majority colour is ``colour`` (and, if given, whose
    template shape is ``shape``); None when no component fits."""
    mask = foreground_mask(image, background)
    if min_area is None:
        min_area = default_min_area(max(mask.shape))
    for comp in connected_components(mask, min_area):
        got, _ = majority_colour(image, comp)
        if got != colour:
            continue
        if shape is not None and match_shape(image, comp, colour=colour, background=background)[0] != shape:
            continue
        return comp
    return None


def score_relation(
    image: np.ndarray,
    a: str | tuple[str, str],
    b: str | tuple[str, str],
    expected: str,
    min_area: int | None = None,
    background: Sequence[int] = BACKGROUND,
) -> RelationScore:
    """Is object ``a`` ``expected`` of object ``b``? Objects are a colour or (colour, shape)."""
    canonical, scheme = normalise_relation(expected)
    masks = []
    for obj in (a, b):
        colour, shape = (obj, None) if isinstance(obj, str) else obj
        masks.append(find_object(image, colour, shape, min_area, background))
    if masks[0] is None or masks[1] is None or masks[0] is masks[1]:
        return RelationScore(None, canonical, False, None, None)
    ca, cb = centroid(masks[0]), centroid(masks[1])
    predicted = relation_of(ca, cb, scheme)
    return RelationScore(predicted, canonical, predicted == canonical, ca, cb)


# --------------------------------------------------------------------------- text


def levenshtein(ref: Sequence, hyp: Sequence) -> int:
    """Edit distance (unit-cost insertions, deletions, substitutions) between two sequences."""
    if len(ref) < len(hyp):
        ref, hyp = hyp, ref  # the row is the shorter sequence; distance is symmetric
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def _normalise_text(text: str, case_sensitive: bool) -> str:
    text = " ".join(text.split())  # line wrapping in the render is not an error
    return text if case_sensitive else text.lower()


@dataclass(frozen=True)
class TextScore:
    reference: str
    hypothesis: str
    cer: float  # character edits / reference characters
    wer: float  # word edits / reference words
    char_edits: int
    word_edits: int
    correct: bool  # exact match after normalisation


def score_text(reference: str, hypothesis: str, case_sensitive: bool = True) -> TextScore:
    """CER and WER of ``hypothesis`` (e.g. an OCR transcript) against ``reference``.

    Whitespace runs (including the render's line breaks) collapse to one space before scoring.
    An empty reference divides by 1, so CER/WER are then the hypothesis length (0 when both are
    empty). Rates can exceed 1 when the hypothesis is much longer than the reference.
    """
    ref, hyp = _normalise_text(reference, case_sensitive), _normalise_text(hypothesis, case_sensitive)
    ce = levenshtein(ref, hyp)
    rw, hw = ref.split(), hyp.split()
    we = levenshtein(rw, hw)
    return TextScore(ref, hyp, ce / max(len(ref), 1), we / max(len(rw), 1), ce, we, ref == hyp)


def cer(reference: str, hypothesis: str) -> float:
    return score_text(reference, hypothesis).cer


def wer(reference: str, hypothesis: str) -> float:
    return score_text(reference, hypothesis).wer
