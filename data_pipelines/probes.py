"""Seed 003's understanding/generation transfer sets: counting, diagonal relations, text rendering.

Each is scored exactly from its own ground truth: counts (accuracy and mean absolute deviation),
the diagonal relation of two object centroids (shapes are flat colours, so a generated image
can be segmented by colour), and the rendered sentence (WER/CER).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from unimm.data_pipelines.procedural import (
    COLOURS,
    SHAPES,
    SceneObject,
    TaskSample,
    pick_names,
    place,
    render,
    sample_rng,
)

NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
RELATIONS = ("top left", "top right", "bottom left", "bottom right")


def _plural(name: str, k: int) -> str:
    return name if k == 1 else f"{name}s"


def counting(index: int, seed: int, image_size: int = 224) -> TaskSample:
    """k in [0, 20] copies of one object among 0-3 kinds of distractor, none overlapping."""
    rng = sample_rng(seed, "counting", index)
    k = int(rng.integers(0, 21))
    picks = pick_names(rng, 1 + int(rng.integers(0, 4)))
    target, distractors = picks[0], picks[1:]
    counts = [k] + [int(rng.integers(1, 4)) for _ in distractors]
    names = [name for name, count in zip(picks, counts) for _ in range(count)]
    objects = place(rng, names, image_size) if names else []
    label = " ".join(target)
    scene = ", ".join(f"{c} {_plural(' '.join(p), c)}" for p, c in zip(picks, counts) if c)
    answer = str(k)
    return TaskSample(
        image=render(objects, image_size),
        question=f"A picture shows {scene or 'nothing'}. How many {label}s are there in the picture?",
        question_direct=f"How many {label}s are there in the image?",
        solution=f"Answer: {answer}",
        solution_direct=f"Answer: {answer}",
        answer=answer,
        caption=f"a photo of {NUMBER_WORDS[k]} {_plural(label, k)}",
        truth={"target": label, "count": k, "objects": [o.to_json() for o in objects]},
    )


def diagonal(index: int, seed: int, image_size: int = 224) -> TaskSample:
    """Two objects in one of the four diagonal relations, each relation equally often."""
    rng = sample_rng(seed, "diagonal", index)
    relation = RELATIONS[index % len(RELATIONS)]
    # Distinct colours, so a generated image can be scored by colour segmentation.
    ca, cb = (str(c) for c in rng.choice(list(COLOURS), size=2, replace=False))
    sa, sb = (str(s) for s in rng.choice(SHAPES, size=2))
    while True:
        ra, rb = rng.uniform(0.1, 0.16, size=2) * image_size
        xa, xb = sorted(rng.uniform(max(ra, rb), image_size - max(ra, rb), size=2))
        ya, yb = sorted(rng.uniform(max(ra, rb), image_size - max(ra, rb), size=2))
        # Sorted, a is left of and above b; flip to the wanted relation.
        if relation.endswith("right"):
            xa, xb = xb, xa
        if relation.startswith("bottom"):
            ya, yb = yb, ya
        gap = ra + rb
        if abs(xa - xb) > 0.6 * gap and abs(ya - yb) > 0.6 * gap and math.dist((xa, ya), (xb, yb)) > gap + 1:
            break
    a, b = SceneObject(ca, sa, (float(xa), float(ya)), float(ra)), SceneObject(cb, sb, (float(xb), float(yb)), float(rb))
    question = f"Where is the {a.name} located relative to the {b.name}?"
    statement = f"The {a.name} is located in the {relation} of the {b.name}."
    return TaskSample(
        image=render([a, b], image_size),
        question=(
            f"In a {image_size} x {image_size} picture, the {a.name} is centred at ({xa:.0f}, {ya:.0f}) and the "
            f"{b.name} at ({xb:.0f}, {yb:.0f}), in pixels from the top left. {question}"
        ),
        question_direct=question,
        solution=f"{statement} Answer: {relation}",
        solution_direct=f"{statement} Answer: {relation}",
        answer=relation,
        caption=statement,
        truth={"relation": relation, "objects": [a.to_json(), b.to_json()]},
    )


# Seed 003 renders Markdown headings with four CSS themes: (background, text colour).
THEMES = {
    "clean_light": ((255, 255, 255), (20, 20, 20)),
    "dark": ((30, 30, 36), (235, 235, 235)),
    "sepia": ((244, 236, 216), (91, 70, 54)),
    "blue_gray": ((220, 228, 236), (35, 55, 85)),
}
_WORDS = {
    "adjective": "quiet bright small ancient busy golden narrow distant gentle curious sturdy hidden".split(),
    "noun": "river garden library market village harbour forest bridge tower meadow station workshop".split(),
    "verb": "stands near,waits beside,lies behind,shines above,rests below,looks onto,leans against".split(","),
    "time": "every morning,at dawn,after the rain,before winter,on sunday,late at night,in spring".split(","),
}
MAX_CHARS = 120


def _sentence(rng: np.random.Generator) -> str:
    pick = lambda kind: _WORDS[kind][int(rng.integers(len(_WORDS[kind])))]  # noqa: E731
    parts = [f"the {pick('adjective')} {pick('noun')} {pick('verb')} the {pick('noun')}" for _ in range(int(rng.integers(1, 4)))]
    ending = f" {pick('time')}."
    while len(" and ".join(parts) + ending) > MAX_CHARS:
        parts.pop()  # whole clauses, so a sentence never ends mid-word
    return (" and ".join(parts) + ending).capitalize()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def text_rendering(index: int, seed: int, image_size: int = 256) -> TaskSample:
    """A generated sentence (<= 120 characters) as a heading, in one of four themes (index % 4)."""
    rng = sample_rng(seed, "text_rendering", index)
    sentence = _sentence(rng)
    theme = list(THEMES)[index % len(THEMES)]
    background, colour = THEMES[theme]
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    margin = image_size // 16
    size = max(6, image_size // 11)
    while True:  # the largest heading size whose wrapped lines fit the page
        font = ImageFont.load_default(size=size)
        lines = _wrap(draw, sentence, font, image_size - 2 * margin)
        if size == 6 or len(lines) * size * 1.25 <= image_size - 2 * margin:
            break
        size -= 1
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * size * 1.25), line, fill=colour, font=font)
    return TaskSample(
        image=np.asarray(image),
        question=f'A page has the heading "{sentence}". Extract all text from the page.',
        question_direct="Extract all text from the image.",
        solution=sentence,
        solution_direct=sentence,
        answer=sentence,
        caption=f'A page with the heading "{sentence}"',
        truth={"text": sentence, "theme": theme, "font_size": size},
    )
