"""Procedural, download-free samples with exact ground truth (see shared/DATASETS.md).

This module holds the shapes, their rendering and three generators: images of 1-3 coloured
shapes with a caption, short videos of one shape moving at constant velocity and bouncing off
the edges, and templated sentences about shapes. `reasoning.py` (seed 000's SpatialMap, Grid,
Ring), `probes.py` (seed 003's counting, diagonal relations, text rendering) and
`navigation.py` (the action world) build on it. Every sample is a pure function of
(seed, index): the RNG is seeded from both, so sample i does not depend on how many samples
are generated and a split is reproducible from its seed alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "blue": (30, 60, 220),
    "yellow": (235, 205, 20),
    "orange": (245, 135, 20),
    "pink": (245, 120, 190),
    "purple": (130, 40, 170),
    "green": (30, 160, 50),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "pentagon",
    "hexagon",
    "octagon",
    "diamond",
)
BACKGROUND = (255, 255, 255)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
SHAPE_FACTS = {
    "circle": "a circle has no corners.",
    "square": "a square has four equal sides.",
    "triangle": "a triangle has three sides.",
    "star": "a star has five points.",
    "pentagon": "a pentagon has five sides.",
    "hexagon": "a hexagon has six sides.",
    "octagon": "an octagon has eight sides.",
    "diamond": "a diamond is a square standing on one corner.",
}
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
EDGES = {"left": "left", "right": "right", "up": "top", "down": "bottom"}

# Distinct stream per kind so that adding images never changes the texts of the same seed.
_KIND_CODES = {
    "image_text": 1,
    "video": 2,
    "text": 3,
    "navigation": 4,
    "navigation_map": 5,
    "spatialmap": 6,
    "grid": 7,
    "ring": 8,
    "counting": 9,
    "diagonal": 10,
    "text_rendering": 11,
    "single_object": 12,
}
# Shapes are drawn at 4x and downsampled: at 32 px an aliased star is not recognisable.
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    centre: tuple[float, float]  # pixels, x to the right, y down
    radius: float  # pixels; the shape fits in the circle of this radius

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def indefinite(self) -> str:
        return f"{'an' if self.colour[0] in 'aeiou' else 'a'} {self.name}"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TaskSample:
    """One question-answering scene in every view DATASETS.md asks for (seed 000's field names).

    Views: understanding [image][question_direct][solution_direct], text-only
    [question][solution], generation [caption][image]. `answer` is the exact label to score.
    """

    image: np.ndarray  # uint8 [S, S, 3]
    question: str  # text version: the scene in words, then the query
    question_direct: str  # image version: the query, the scene left to the image
    solution: str
    solution_direct: str
    answer: str
    caption: str  # describes the image, for generation
    truth: dict  # scene ground truth (objects, positions, program), JSON-ready


def sample_rng(seed: int, kind: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _KIND_CODES[kind], index])


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ngon(n: int, radius: float, phase: float) -> list[tuple[float, float]]:
        return [
            (
                cx + radius * math.cos(phase + 2 * math.pi * k / n),
                cy + radius * math.sin(phase + 2 * math.pi * k / n),
            )
            for k in range(n)
        ]

    up = -math.pi / 2  # first vertex points up (y grows downwards)
    if shape == "square":
        return ngon(4, r, math.pi / 4)
    if shape == "diamond":
        return ngon(4, r, up)
    if shape == "triangle":
        return ngon(3, r, up)
    if shape == "pentagon":
        return ngon(5, r, up)
    if shape == "hexagon":
        return ngon(6, r, 0.0)
    if shape == "octagon":
        return ngon(8, r, math.pi / 8)
    if shape == "star":
        outer, inner = ngon(5, r, up), ngon(5, 0.45 * r, up + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    raise ValueError(f"unknown shape {shape!r}")


def blank(image_size: int) -> np.ndarray:
    return np.full((image_size, image_size, 3), BACKGROUND, np.uint8)


def render(objects: list[SceneObject], image_size: int, background: np.ndarray | None = None) -> np.ndarray:
    """Draw objects on `background` (default white); returns uint8 [H, W, 3]."""
    s = _SUPERSAMPLE
    base = blank(image_size) if background is None else background
    canvas = Image.fromarray(base).resize((image_size * s, image_size * s), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for obj in objects:
        cx, cy, r = obj.centre[0] * s, obj.centre[1] * s, obj.radius * s
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_shape_polygon(obj.shape, cx, cy, r), fill=fill)
    return np.asarray(canvas.resize((image_size, image_size), Image.LANCZOS), dtype=np.uint8)


def pick_names(rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    # Distinct (colour, shape) pairs, so every caption names each object unambiguously.
    colours, shapes = list(COLOURS), list(SHAPES)
    picks = rng.choice(len(colours) * len(shapes), size=count, replace=False)
    return [(colours[int(p) // len(shapes)], shapes[int(p) % len(shapes)]) for p in picks]


def place(rng: np.random.Generator, names: list[tuple[str, str]], image_size: int) -> list[SceneObject]:
    """Non-overlapping placement by rejection; shrinks the objects if a layout keeps failing."""
    scale = 1.0
    while True:
        objects: list[SceneObject] = []
        for colour, shape in names:
            r = float(rng.uniform(0.14, 0.24)) * image_size * scale
            for _ in range(100):
                c = (float(rng.uniform(r, image_size - r)), float(rng.uniform(r, image_size - r)))
                if all(math.dist(c, o.centre) >= r + o.radius + 1.0 for o in objects):
                    objects.append(SceneObject(colour, shape, c, r))
                    break
            else:
                break
        if len(objects) == len(names):
            return objects
        scale *= 0.8


def _join(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " and " + names[-1]


def image_sample(index: int, seed: int, image_size: int = 32) -> dict:
    """1-3 shapes; caption "a red circle and a blue square"."""
    rng = sample_rng(seed, "image_text", index)
    objects = place(rng, pick_names(rng, int(rng.integers(1, 4))), image_size)
    return {
        "image": render(objects, image_size),
        "caption": _join([o.indefinite for o in objects]),
        "objects": objects,
    }


# single_object_sample's layouts: "anywhere" places the shape as image_sample does (radius
# 0.14-0.24 of the image, anywhere inside it); "centred" draws it large (diameter 0.56-0.82 of
# the image, 18-26 px at 32 px) within 1/16 of the image of the centre, so that its outline
# spans several patches and a model of a few CPU minutes can draw and read the shape (the demo).
SINGLE_OBJECT_LAYOUTS = ("anywhere", "centred")
_CENTRED_RADIUS = (0.28, 0.41)  # fraction of the image size
_CENTRED_JITTER = 1 / 16  # largest offset of the centre from the image centre, per axis


def single_object_sample(index: int, seed: int, image_size: int = 32, layout: str = "anywhere") -> dict:
    """One shape; caption "a red circle". The 64 colour-shape pairs one at a time are the
    quickest image-text task to learn in both directions (the demo's main source). ``layout``:
    one of SINGLE_OBJECT_LAYOUTS (see there)."""
    rng = sample_rng(seed, "single_object", index)
    ((colour, shape),) = pick_names(rng, 1)
    objects = place_single(rng, colour, shape, image_size, layout)
    return {"image": render(objects, image_size), "caption": objects[0].indefinite, "objects": objects}


def place_single(rng: np.random.Generator, colour: str, shape: str, image_size: int, layout: str) -> list[SceneObject]:
    """One object placed by a `SINGLE_OBJECT_LAYOUTS` rule (also the held-out scenes of
    ``unimm eval``'s captioning, which follow the run's own layout)."""
    if layout not in SINGLE_OBJECT_LAYOUTS:
        raise ValueError(f"single_object layout {layout!r}: expected one of {', '.join(SINGLE_OBJECT_LAYOUTS)}")
    if layout == "anywhere":
        return place(rng, [(colour, shape)], image_size)
    r = float(rng.uniform(*_CENTRED_RADIUS)) * image_size
    cx, cy = image_size / 2 + rng.uniform(-_CENTRED_JITTER, _CENTRED_JITTER, size=2) * image_size
    return [SceneObject(colour, shape, (float(cx), float(cy)), r)]


def video_sample(index: int, seed: int, image_size: int = 32, num_frames: int = 4) -> dict:
    """One shape moving along a cardinal direction, reflected at the edges."""
    rng = sample_rng(seed, "video", index)
    ((colour, shape),) = pick_names(rng, 1)
    r = float(rng.uniform(0.14, 0.24)) * image_size
    direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
    speed = float(rng.uniform(0.12, 0.25)) * image_size
    velocity = np.array(DIRECTIONS[direction], dtype=np.float64) * speed
    position = rng.uniform(r, image_size - r, size=2)
    lo, hi = r, image_size - r
    centres, bounced = [position.copy()], False
    for _ in range(num_frames - 1):
        position = position + velocity
        for axis in range(2):
            if position[axis] < lo or position[axis] > hi:
                wall = lo if position[axis] < lo else hi
                position[axis] = 2 * wall - position[axis]
                velocity[axis] = -velocity[axis]
                bounced = True
        centres.append(position.copy())
    objects = [SceneObject(colour, shape, (float(c[0]), float(c[1])), r) for c in centres]
    caption = f"{objects[0].indefinite} moving {direction}"
    if bounced:
        caption += f" and bouncing off the {EDGES[direction]} edge"
    return {
        "frames": np.stack([render([o], image_size) for o in objects]),
        "caption": caption,
        "object": {"colour": colour, "shape": shape, "radius": r},
        "centres": [list(o.centre) for o in objects],
        "direction": direction,
        "speed": speed,
        "bounced": bounced,
    }


def _relation(a: SceneObject, b: SceneObject) -> str:
    dx, dy = a.centre[0] - b.centre[0], a.centre[1] - b.centre[1]
    if abs(dx) > abs(dy):
        where = "to the left of" if dx < 0 else "to the right of"
    else:
        where = "above" if dy < 0 else "below"
    return f"the {a.name} is {where} the {b.name}."


def text_sample(index: int, seed: int) -> dict:
    """2-4 sentences about a random (unrendered) scene, all true of its ground truth.

    Relations are computed from the object centres, so a model can only get them right
    consistently by tracking the scene; facts and counts add vocabulary and arithmetic words.
    """
    rng = sample_rng(seed, "text", index)
    objects = place(rng, pick_names(rng, int(rng.integers(2, 5))), 100)
    sentences = [_relation(a, b) for a, b in zip(objects, objects[1:])]
    if rng.random() < 0.5:
        sentences.append(SHAPE_FACTS[objects[int(rng.integers(len(objects)))].shape])
    shapes = [o.shape for o in objects]
    counted = shapes[int(rng.integers(len(shapes)))]
    n = shapes.count(counted)
    sentences.append(f"there {'is' if n == 1 else 'are'} {NUMBER_WORDS[n]} {counted}{'' if n == 1 else 's'}.")
    return {"text": " ".join(sentences), "objects": objects}
