"""Understanding: exact-match accuracy on the procedural question sets, image and text versions.

Sets (``data_pipelines``): SpatialMap, Grid, Ring (seed 000), counting, diagonal relations and
text rendering (seed 003), from a held-out seed, rendered at the run's image size. The image
version reads ``[bos] [boi] image [eoi] question_direct \\n`` and the text version
``[bos] question \\n`` (the layouts of the ``{set}_understanding`` and ``{set}_text`` shards);
the answer is decoded greedily until ``<eos>``, at most the reference solution's tokens plus
``ANSWER_SLACK``. A response is right when the text after its last "Answer:" (the whole
response when there is none) equals the sample's ``answer`` after normalisation (case,
whitespace, a leading "the", trailing punctuation). Text rendering is scored by CER and WER
of the whole response against the sentence (and exact match after the same normalisation).
A sample whose prompt and reference answer do not fit the run's ``seq_len`` is skipped and
counted (a model is not asked beyond the length it was trained on).
"""

from __future__ import annotations

import re

import numpy as np

from unimm.evaluation.decoding import greedy_answer
from unimm.evaluation.scorers import score_text

SETS = ("spatialmap", "grid", "ring", "counting", "diagonal", "text_rendering")
VIEWS = ("image", "text")
CHANCE = {"spatialmap": 0.25}  # four options; the other sets have open answers
ANSWER_SLACK = 8
_ANSWER = re.compile(r"answer\s*:", re.IGNORECASE)


def normalise_answer(text: str) -> str:
    """Lower case, whitespace runs as one space, no leading "the", no trailing punctuation."""
    text = " ".join(text.lower().split())
    text = text.strip(" .,;:!?\"'")
    return text[4:] if text.startswith("the ") else text


def extract_answer(response: str) -> str:
    """The text after the last "Answer:" of a response (all of it when there is none), normalised."""
    parts = _ANSWER.split(response)
    return normalise_answer(parts[-1])


def is_correct(response: str, answer: str) -> bool:
    return extract_answer(response) == normalise_answer(answer)


def task_sample(name: str, index: int, seed: int, image_size: int):
    from unimm.data_pipelines.write_shards import TASK_SETS

    return TASK_SETS[name](index, seed, image_size)


def score_response(name: str, response: str, sample) -> dict:
    if name == "text_rendering":
        text = score_text(sample.answer, response)
        return {"correct": normalise_answer(response) == normalise_answer(sample.answer), "cer": text.cer, "wer": text.wer}
    row = {"correct": is_correct(response, sample.answer)}
    if name == "counting":
        got = extract_answer(response)
        row["abs_error"] = abs(int(got) - int(sample.answer)) if got.isdigit() else None
    return row


def summarise(name: str, rows: list[dict], skipped: int) -> dict:
    n = len(rows)
    out = {"n": n, "skipped_too_long": skipped, "accuracy": float(np.mean([r["correct"] for r in rows])) if n else None,
           "chance": CHANCE.get(name)}
    if name == "text_rendering" and n:
        out["cer"] = float(np.mean([r["cer"] for r in rows]))
        out["wer"] = float(np.mean([r["wer"] for r in rows]))
    if name == "counting" and n:
        errors = [r["abs_error"] for r in rows if r["abs_error"] is not None]
        out["mean_abs_error"] = float(np.mean(errors)) if errors else None
        out["unparsed"] = n - len(errors)
    out["examples"] = rows[:3]
    return out


def run_understanding(ev, out_dir, *, samples: int, seed: int, progress) -> dict:
    sampler = ev.sampler(seed=seed)
    tk, limit = ev.tokenizer, ev.config.training.seq_len
    frame = ev.reading_tokens_per_frame + 2  # <boi> frame <eoi>
    results: dict[str, dict] = {}
    for name in progress(SETS, desc="understanding"):
        per_view: dict[str, dict] = {}
        for view in VIEWS:
            rows, skipped = [], 0
            for i in range(samples):
                sample = task_sample(name, i, seed, ev.understanding_image_size)
                question = sample.question_direct if view == "image" else sample.question
                solution = sample.solution_direct if view == "image" else sample.solution
                prompt = tk.encode(question + "\n")
                budget = len(tk.encode(solution)) + ANSWER_SLACK
                if 1 + len(prompt) + budget + (frame if view == "image" else 0) > limit:
                    skipped += 1
                    continue
                latents = ev.reading_latents(sample.image[None])[0] if view == "image" else None
                response = greedy_answer(sampler, prompt, latents, budget, ev.dual_encoder)
                rows.append({"index": i, "answer": sample.answer, "response": response,
                             **score_response(name, response, sample)})
            per_view[view] = summarise(name, rows, skipped)
        results[name] = per_view
    plot = _plot(results, out_dir / "understanding.png")
    scored = [v["accuracy"] for s in results.values() for v in s.values() if v["accuracy"] is not None]
    return {"seed": seed, "samples_per_set": samples, "sets": results,
            "mean_accuracy": float(np.mean(scored)) if scored else None, "figures": [plot]}


def _plot(results: dict, path) -> str:
    from unimm.evaluation.report import figure, save

    fig = figure((7.0, 3.4))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(results))
    for k, view in enumerate(VIEWS):
        acc = [results[s][view]["accuracy"] for s in results]
        ax.bar(x + (k - 0.5) * 0.38, [np.nan if a is None else a for a in acc], width=0.38, label=f"{view} version")
    ax.set_xticks(x, list(results), rotation=20, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("exact-match accuracy")
    ax.set_title("understanding (held-out procedural sets)")
    ax.legend(fontsize="small")
    return save(fig, path)
