"""Captioning: image -> text on single-object images, colour and shape read off the caption.

Each held-out image holds one procedural object (``procedural.place`` at the run's image size,
as in the ``image_text`` training captions "a red circle"). The model reads ``[bos] [boi]
image [eoi]`` and captions greedily; the first palette colour and the first shape word of the
caption are its answer. Accuracies: colour, shape, and both exactly right.
"""

from __future__ import annotations

import re

import numpy as np

from unimm.evaluation.decoding import greedy_answer
from unimm.evaluation.report import clipped, image_grid

MAX_CAPTION_TOKENS = 48


def single_object_images(count: int, seed: int, image_size: int) -> list[tuple[np.ndarray, str, str]]:
    """(image, colour, shape) of ``count`` held-out single-object scenes."""
    from unimm.data_pipelines.procedural import place, render
    from unimm.evaluation.generation import single_object_names

    out = []
    for i, (colour, shape) in enumerate(single_object_names(count, seed + 7)):
        rng = np.random.default_rng([seed, 0xCA9, i])
        out.append((render(place(rng, [(colour, shape)], image_size), image_size), colour, shape))
    return out


def first_word(text: str, words) -> str | None:
    """The vocabulary word (e.g. a palette colour) that appears first in ``text``, as a whole word."""
    hits = [(m.start(), w) for w in words for m in [re.search(rf"\b{re.escape(w)}\b", text.lower())] if m]
    return min(hits)[1] if hits else None


def score_caption(caption: str, colour: str, shape: str) -> dict:
    from unimm.data_pipelines.procedural import COLOURS, SHAPES

    got_colour, got_shape = first_word(caption, COLOURS), first_word(caption, SHAPES)
    return {"colour": got_colour == colour, "shape": got_shape == shape,
            "both": got_colour == colour and got_shape == shape, "read": f"{got_colour} {got_shape}"}


def run_captioning(ev, out_dir, *, samples: int, seed: int, progress) -> dict:
    sampler = ev.sampler(seed=seed)
    rows, cells = [], []
    for image, colour, shape in progress(single_object_images(samples, seed, ev.understanding_image_size), desc="captioning"):
        latents = ev.reading_latents(image[None])[0]
        caption = greedy_answer(sampler, [], latents, MAX_CAPTION_TOKENS, ev.dual_encoder)
        verdict = score_caption(caption, colour, shape)
        rows.append({"colour": colour, "shape": shape, "caption": caption, **verdict})
        cells.append((image, f"{colour} {shape}\n{clipped('model: ' + caption)}", verdict["both"]))
    grid = image_grid(out_dir / "captioning.png", cells)
    accuracy = {k: float(np.mean([r[k] for r in rows])) for k in ("colour", "shape", "both")}
    return {"seed": seed, "samples": len(rows), "accuracy": accuracy,
            "chance": {"colour": 1 / 8, "shape": 1 / 8, "both": 1 / 64}, "captions": rows, "figures": [grid]}
