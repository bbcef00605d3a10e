"""Generation: procedural prompts, images from the sampler, scored exactly from their pixels.

A GenEval-like score per category, each from prompts in the training captions' own words:

- colour and shape: "a red circle" (``procedural.image_sample``'s captions); the majority
  palette colour of the foreground, and the best template of the largest object;
- position: "The red circle is located in the top left of the blue star." (``probes.diagonal``'s
  captions, two distinct colours); the diagonal relation of the two colours' centroids;
- count: "a photo of three green squares" (``probes.counting``'s captions, 1 to ``MAX_COUNT``
  copies); the number of foreground components;
- overall: the mean of the four category scores.

Latents are decoded to pixels by the run's encoder (denormalised first); an encoder without a
decoder (a semantic encoder) cannot be scored from pixels, and the suite says so.
"""

from __future__ import annotations

import numpy as np

from unimm.evaluation.report import clipped, image_grid
from unimm.evaluation.scorers import score_colour, score_count, score_relation, score_shape

MAX_COUNT = 4
CATEGORIES = ("colour", "shape", "count", "position")


def single_object_names(count: int, seed: int) -> list[tuple[str, str]]:
    """``count`` (colour, shape) pairs: a Latin-square walk over seeded orders of the palette and
    the shapes, so every 8 prompts hold each colour once and every 64 each pair once."""
    from unimm.data_pipelines.procedural import COLOURS, SHAPES

    rng = np.random.default_rng([seed, 0x6E4])
    colours = [list(COLOURS)[int(i)] for i in rng.permutation(len(COLOURS))]
    shapes = [SHAPES[int(i)] for i in rng.permutation(len(SHAPES))]
    return [(colours[i % len(colours)], shapes[(i + i // len(colours)) % len(shapes)]) for i in range(count)]


def prompts(per_category: int, seed: int, image_size: int) -> list[dict]:
    from unimm.data_pipelines import probes
    from unimm.data_pipelines.procedural import SceneObject

    out = []
    for colour, shape in single_object_names(per_category, seed):
        name = SceneObject(colour, shape, (0.0, 0.0), 1.0).indefinite
        out.append({"category": "single", "prompt": name, "colour": colour, "shape": shape})
    for i in range(per_category):
        sample = probes.diagonal(i, seed, image_size)
        a, b = sample.truth["objects"]
        out.append({"category": "position", "prompt": sample.caption, "a": a["colour"], "b": b["colour"],
                    "relation": sample.truth["relation"]})
    rng = np.random.default_rng([seed, 0xC0])
    for colour, shape in single_object_names(per_category, seed + 1):
        k = int(rng.integers(1, MAX_COUNT + 1))
        label = f"{colour} {shape}"
        words = f"{probes.NUMBER_WORDS[k]} {label if k == 1 else label + 's'}"
        out.append({"category": "count", "prompt": f"a photo of {words}", "count": k})
    return out


def score(prompt: dict, pixels: np.ndarray) -> dict:
    """Verdicts of one generated image against its prompt."""
    kind = prompt["category"]
    if kind == "single":
        colour, shape = score_colour(pixels, prompt["colour"]), score_shape(pixels, prompt["shape"])
        return {"colour": colour.correct, "shape": shape.correct, "predicted": f"{colour.predicted} {shape.predicted}"}
    if kind == "position":
        rel = score_relation(pixels, prompt["a"], prompt["b"], prompt["relation"])
        return {"position": rel.correct, "predicted": rel.predicted}
    count = score_count(pixels, prompt["count"])
    return {"count": count.correct, "predicted": count.predicted}


def category_scores(rows: list[dict]) -> dict:
    scores = {}
    for name in CATEGORIES:
        verdicts = [r[name] for r in rows if name in r]
        scores[name] = float(np.mean(verdicts)) if verdicts else None
    present = [v for v in scores.values() if v is not None]
    scores["overall"] = float(np.mean(present)) if present else None
    return scores


def run_generation(ev, out_dir, *, per_category: int, seed: int, euler_steps: int, cfg_scale: float, progress) -> dict:
    if not ev.can_decode:
        name = (ev.manifest.info.get("encoder") or {}).get("name", "?")
        return {"skipped": f"encoder {name!r} has no decoder: generated latents cannot be turned into pixels to score"}
    sampler = ev.sampler(seed=seed, euler_steps=euler_steps, cfg_scale=cfg_scale)
    rows, cells = [], []
    for prompt in progress(prompts(per_category, seed, ev.image_size), desc="generation"):
        pixels = ev.pixels(sampler.text_to_image(prompt["prompt"]).numpy())
        verdict = score(prompt, pixels)
        rows.append({**prompt, **verdict})
        ok = all(v for k, v in verdict.items() if k in CATEGORIES)
        cells.append((pixels, f"{clipped(prompt['prompt'], 30, 3)}\ngot: {verdict['predicted']}", ok))
    grid = image_grid(out_dir / "generation.png", cells)
    return {"seed": seed, "euler_steps": euler_steps, "cfg_scale": cfg_scale, "scores": category_scores(rows),
            "images": rows, "figures": [grid]}
