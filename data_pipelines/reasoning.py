"""Seed 000's cross-modal transfer sets (App. C): SpatialMap, Grid and Ring.

Each scene has an image version (the layout is in the picture; `question_direct` only names
the objects) and a text version (`question` spells the layout out), with step-by-step
`solution`s and the exact `answer`. Splits (seed 000): train and in-distribution test share
the parameters below, `ood=True` makes scenes harder: SpatialMap 7 -> 8 objects, Grid 3x3 ->
4x4 with 8 -> up to 12 moves, Ring 8 -> 12 objects with up to 8 -> up to 12 moves.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
from PIL import Image, ImageDraw

from unimm.data_pipelines.procedural import DIRECTIONS, SceneObject, TaskSample, blank, pick_names, render, sample_rng

OPTIONS = "Possible options: Northeast, Northwest, Southeast, Southwest."
_LINE = (200, 200, 200)
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven")


def _steps(k: int) -> str:
    return f"{_NUMBERS[k] if k < len(_NUMBERS) else k} step{'' if k == 1 else 's'}"


def _listing(names: list[str]) -> str:
    return ", ".join(f"the {n}" for n in names)


def _background(image_size: int, paint) -> np.ndarray:
    canvas = Image.fromarray(blank(image_size))
    paint(ImageDraw.Draw(canvas))
    return np.asarray(canvas)


# ------------------------------------------------------------------ SpatialMap


def _compass(rows: list[int], cols: list[int], a: int, b: int) -> str:
    """Where a is relative to b; row 0 is north, column 0 west; ranks are distinct."""
    return ("North" if rows[a] < rows[b] else "South") + ("east" if cols[a] > cols[b] else "west")


def _tree_path(edges: dict[int, list[int]], a: int, b: int) -> list[int]:
    parent = {a: a}
    queue = deque([a])
    while queue:
        node = queue.popleft()
        for nxt in edges[node]:
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    path = [b]
    while path[-1] != a:
        path.append(parent[path[-1]])
    return path[::-1]


def spatialmap(index: int, seed: int, image_size: int = 224, ood: bool = False) -> TaskSample:
    """n objects with independent random row and column ranks, drawn at their cells.

    The text version states a random spanning tree of pairwise relations; the queried pair is
    two objects not stated together whose relation follows by chaining (every step of the
    path between them goes the same way vertically and horizontally).
    """
    rng = sample_rng(seed, "spatialmap", index)
    n = 8 if ood else 7
    picks = pick_names(rng, n)
    names = [f"{c} {s}" for c, s in picks]
    while True:
        rows, cols = [int(v) for v in rng.permutation(n)], [int(v) for v in rng.permutation(n)]
        order = [int(v) for v in rng.permutation(n)]
        edges: dict[int, list[int]] = {i: [] for i in range(n)}
        stated: list[tuple[int, int]] = []
        for k in range(1, n):
            child, parent = order[k], order[int(rng.integers(k))]
            edges[child].append(parent)
            edges[parent].append(child)
            stated.append((child, parent))
        candidates = []
        for a in range(n):
            for b in range(n):
                path = _tree_path(edges, a, b) if a != b else []
                if len(path) >= 3 and len({_compass(rows, cols, p, q) for p, q in zip(path, path[1:])}) == 1:
                    candidates.append(path)
        if candidates:
            break
    path = candidates[int(rng.integers(len(candidates)))]
    a, b = path[0], path[-1]
    answer = _compass(rows, cols, a, b)
    statements = [f"The {names[c]} is to the {_compass(rows, cols, c, p)} of the {names[p]}." for c, p in stated]
    statements = [statements[int(i)] for i in rng.permutation(len(statements))]
    listed = _listing([names[int(i)] for i in rng.permutation(n)])
    query = f"Where is the {names[a]} relative to the {names[b]}? {OPTIONS}"
    steps = " ".join(f"The {names[p]} is to the {_compass(rows, cols, p, q)} of the {names[q]}." for p, q in zip(path, path[1:]))
    vertical, horizontal = ("north", "south")[answer.startswith("South")], ("west", "east")[answer.endswith("east")]
    cell = image_size / n
    objects = [
        SceneObject(colour, shape, ((cols[i] + 0.5) * cell, (rows[i] + 0.5) * cell), 0.42 * cell)
        for i, (colour, shape) in enumerate(picks)
    ]
    return TaskSample(
        image=render(objects, image_size),
        question=f"Consider a map with the following objects: {listed}. {' '.join(statements)} {query}",
        question_direct=f"Consider the map in the image with the following objects: {listed}. {query}",
        solution=f"{steps} Every step goes {vertical} and {horizontal}, so the {names[a]} is to the {answer} of the {names[b]}. Answer: {answer}.",
        solution_direct=(
            f"In the image, the {names[a]} is {'above' if vertical == 'north' else 'below'} and to the "
            f"{'right' if horizontal == 'east' else 'left'} of the {names[b]}, so it is to the {answer} of it. Answer: {answer}."
        ),
        answer=answer,
        caption=f"A map with the following objects: {listed}. {' '.join(statements)}",
        truth={"objects": names, "rows": rows, "cols": cols, "statements": stated, "query": [a, b]},
    )


# ------------------------------------------------------------------ Grid


def grid(index: int, seed: int, image_size: int = 224, ood: bool = False) -> TaskSample:
    """n x n cells, one object each; a start object and a valid program of moves."""
    rng = sample_rng(seed, "grid", index)
    n = 4 if ood else 3
    picks = pick_names(rng, n * n)  # row-major
    names = [f"{c} {s}" for c, s in picks]
    moves_count = int(rng.integers(8, 13)) if ood else 8
    r, c = int(rng.integers(n)), int(rng.integers(n))
    start = (r, c)
    program, trace = [], []
    for _ in range(moves_count):
        room = {"up": r, "down": n - 1 - r, "left": c, "right": n - 1 - c}
        direction = sorted(d for d in room if room[d] > 0)[int(rng.integers(sum(room[d] > 0 for d in room)))]
        k = int(rng.integers(1, room[direction] + 1))
        dx, dy = DIRECTIONS[direction]
        r, c = r + dy * k, c + dx * k
        program.append((direction, k))
        trace.append((r, c))
    name_at = lambda rc: names[rc[0] * n + rc[1]]  # noqa: E731
    where = lambda rc: f"row {rc[0] + 1}, column {rc[1] + 1}"  # noqa: E731
    moves = ", then ".join(f"{d} {_steps(k)}" for d, k in program)
    query = f"Start at the {name_at(start)}. Move {moves}. Which object do you land on?"
    cells = " ".join(f"Row {i // n + 1}, column {i % n + 1}: the {names[i]}." for i in range(n * n))
    walk = " ".join(
        f"Move {d} {_steps(k)} to the {name_at(rc)} ({where(rc)})." for (d, k), rc in zip(program, trace)
    )
    answer = name_at(trace[-1])
    solution = f"Start at the {name_at(start)} ({where(start)}). {walk} Answer: the {answer}."
    cell = image_size / n
    objects = [
        SceneObject(colour, shape, ((i % n + 0.5) * cell, (i // n + 0.5) * cell), 0.38 * cell)
        for i, (colour, shape) in enumerate(picks)
    ]

    def lines(draw: ImageDraw.ImageDraw) -> None:
        for k in range(1, n):
            draw.line([(k * cell, 0), (k * cell, image_size)], fill=_LINE)
            draw.line([(0, k * cell), (image_size, k * cell)], fill=_LINE)

    rows_text = " ".join(f"Row {i + 1}: {_listing(names[i * n : (i + 1) * n])}." for i in range(n))
    return TaskSample(
        image=render(objects, image_size, _background(image_size, lines)),
        question=f"The grid has {n} rows and {n} columns, numbered from the top left. {cells} {query}",
        question_direct=f"The image shows a {n} x {n} grid with these objects: {_listing([names[int(i)] for i in rng.permutation(n * n)])}. {query}",
        solution=solution,
        solution_direct=solution,
        answer=answer,
        caption=f"A {n} by {n} grid of objects. {rows_text}",
        truth={"objects": names, "size": n, "start": list(start), "program": program, "trace": trace},
    )


# ------------------------------------------------------------------ Ring


def ring(index: int, seed: int, image_size: int = 224, ood: bool = False) -> TaskSample:
    """N objects clockwise from the top of a circle; answer index (start + sum of signed k) mod N."""
    rng = sample_rng(seed, "ring", index)
    n = 12 if ood else 8
    picks = pick_names(rng, n)  # clockwise from the top
    names = [f"{c} {s}" for c, s in picks]
    start = int(rng.integers(n))
    program = [
        ("clockwise" if rng.random() < 0.5 else "counterclockwise", int(rng.integers(1, n)))
        for _ in range(int(rng.integers(1, (12 if ood else 8) + 1)))
    ]
    position, trace = start, []
    for direction, k in program:
        position = (position + (k if direction == "clockwise" else -k)) % n
        trace.append(position)
    moves = ", then ".join(f"{_steps(k)} {d}" for d, k in program)
    query = f"Start at the {names[start]}. Move {moves}. Which object do you land on?"
    walk = " ".join(f"Move {_steps(k)} {d} to the {names[p]}." for (d, k), p in zip(program, trace))
    solution = f"Start at the {names[start]}. {walk} Answer: the {names[trace[-1]]}."
    radius = 0.36 * image_size
    centre = image_size / 2
    # Image y grows downwards, so increasing angles run clockwise on screen; 0 is the top.
    angles = [-math.pi / 2 + 2 * math.pi * i / n for i in range(n)]
    size = min(0.8 * radius * math.sin(math.pi / n), 0.1 * image_size)
    objects = [
        SceneObject(colour, shape, (centre + radius * math.cos(t), centre + radius * math.sin(t)), size)
        for (colour, shape), t in zip(picks, angles)
    ]

    def circle(draw: ImageDraw.ImageDraw) -> None:
        draw.ellipse((centre - radius, centre - radius, centre + radius, centre + radius), outline=_LINE)

    listed = _listing(names)
    return TaskSample(
        image=render(objects, image_size, _background(image_size, circle)),
        question=f"Objects are arranged clockwise on a ring, starting from the top: {listed}. {query}",
        question_direct=f"The image shows objects on a ring: {_listing([names[int(i)] for i in rng.permutation(n)])}. {query}",
        solution=solution,
        solution_direct=solution,
        answer=names[trace[-1]],
        caption=f"A ring of {n} objects, clockwise from the top: {listed}.",
        truth={"objects": names, "start": start, "program": program, "trace": trace},
    )
