"""Captioning: image -> text on single-object images, colour and shape read off the caption.

Each held-out image holds one procedural object at the run's image size, placed as the run's
own single-object data places it (``procedural.place_single``: anywhere, as the ``image_text``
scenes; or large and centred, as the demo's ``single_object_centred``). The model reads ``[bos] [boi]
image [eoi]`` and captions greedily. A caption has the colour right when the only palette
colour it names is the scene's, and the shape right when the only shape it names is the
scene's (a caption hedging over two colours, or naming a second object, is wrong). Accuracies:
colour, shape, and both exactly right.
"""

from __future__ import annotations

import re

import numpy as np

from unimm.evaluation.decoding import greedy_answer
from unimm.evaluation.report import clipped, image_grid

MAX_CAPTION_TOKENS = 48


def single_object_images(count: int, seed: int, image_size: int, layout: str = "anywhere") -> list[tuple[np.ndarray, str, str]]:
    """(image, colour, shape) of ``count`` held-out single-object scenes, the object placed by
    ``layout`` (``procedural.SINGLE_OBJECT_LAYOUTS``)."""
    from unimm.data_pipelines.procedural import place_single, render
    from unimm.evaluation.generation import single_object_names

    out = []
    for i, (colour, shape) in enumerate(single_object_names(count, seed + 7)):
        rng = np.random.default_rng([seed, 0xCA9, i])
        out.append((render(place_single(rng, colour, shape, image_size, layout), image_size), colour, shape))
    return out


def run_layout(source_names) -> str:
    """The single-object layout a run trained on: "centred" when its data has the demo's
    ``single_object_centred`` source, else "anywhere" (every other source's placement)."""
    return "centred" if "single_object_centred" in source_names else "anywhere"


def named(text: str) -> tuple[list[str], list[str]]:
    """The palette colours and the shapes a caption names, in order, as whole words."""
    from unimm.data_pipelines.procedural import COLOURS, SHAPES

    words = re.findall(r"[a-z]+", text.lower())
    return [w for w in words if w in COLOURS], [w for w in words if w in SHAPES]


def score_caption(caption: str, colour: str, shape: str) -> dict:
    colours, shapes = named(caption)
    right_colour, right_shape = colours == [colour], shapes == [shape]
    return {"colour": right_colour, "shape": right_shape, "both": right_colour and right_shape,
            "read": " ".join(colours + shapes)}


def run_captioning(ev, out_dir, *, samples: int, seed: int, progress) -> dict:
    sampler = ev.sampler(seed=seed)
    layout = run_layout(ev.manifest.info.get("sources", {}))
    rows, cells = [], []
    scenes = single_object_images(samples, seed, ev.understanding_image_size, layout)
    for image, colour, shape in progress(scenes, desc="captioning"):
        latents = ev.reading_latents(image[None])[0]
        caption = greedy_answer(sampler, [], latents, MAX_CAPTION_TOKENS, ev.dual_encoder)
        verdict = score_caption(caption, colour, shape)
        rows.append({"colour": colour, "shape": shape, "caption": caption, **verdict})
        cells.append((image, f"{colour} {shape}\n{clipped('model: ' + caption)}", verdict["both"]))
    grid = image_grid(out_dir / "captioning.png", cells)
    accuracy = {k: float(np.mean([r[k] for r in rows])) for k in ("colour", "shape", "both")}
    return {"seed": seed, "samples": len(rows), "layout": layout, "accuracy": accuracy,
            "chance": {"colour": 1 / 8, "shape": 1 / 8, "both": 1 / 64}, "captions": rows, "figures": [grid]}
