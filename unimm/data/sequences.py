"""One sample -> one document: the per-position fields of the packed batch, before packing.

Formats (<boi>/<eoi> are text positions; the N patches of a frame are VISION positions):

    text                      [bos] text [eos]
    image_text, generation    [bos] caption [boi] latents [eoi] [eos]
      with caption dropped    [bos] [boi] latents [eoi] [eos]             (for classifier-free guidance)
    image_text, understanding [bos] [boi] latents [eoi] caption [eos]
    video                     [bos] caption [boi] f1 [eoi] [boi] f2 [eoi] ... [eos]
    action                    [bos] [boi] c1 [eoi] ... [boi] ck [eoi] action [boi] r1 [eoi] ... [eos]

An image-text sample is laid out in a direction its source allows (the sample's
``directions``): captioning only, generation only, or either, chosen with `p_understanding`.

Every image and frame is denoised by default, each with its own noise level (paper §2.1,
App. B: one independent t per image or frame, diffusion forcing), and carries the flow loss;
text after an image (a caption in the understanding direction, an action after context
frames) conditions on the noisy latents. `clean_conditioning_frames` instead keeps the frames
that only condition, understanding images and action context frames (NWM: 4 context frames
and 1 target; annotated video: 1-4 and 1-4), clean (t = 1, no flow loss), as Transfusion-style
captioning and State_t + Action -> State_t+1 rollouts with given context see them at
inference. Generation targets (T->I images, video frames, action result frames) are always
denoised.

Dual encoder (paper §6.3, as in Janus and Bagel): when the sample carries
``understanding_latents`` (the loader reads them for a model with a second input projection),
an understanding image (I->T) is fed with them instead of the generation latents, and is always
clean: it is not in the generation latent space, so it has no flow target and no noise level
(whatever `clean_conditioning_frames` says). Its positions are marked in
``Document.understanding`` and its latents kept in ``Document.understanding_latents``; the frame
takes the understanding encoder's tokens per frame. Generation targets keep the generation
latents; video and action frames always do (only image-text shards hold both).

Captions, video captions and actions are dropped with `cond_dropout`: every generation
condition needs the same unconditional branch for classifier-free guidance. Only that text
is dropped; frames stay, so the unconditional context of a later frame holds the earlier
frames (``unimm.sampling`` builds it the same way: the context less its condition text).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from unimm.data.batch import IGNORE_INDEX, NO_FRAME, TEXT, VISION

logger = logging.getLogger(__name__)


class SpecialTokens(Protocol):
    pad_id: int
    bos_id: int
    eos_id: int
    boi_id: int
    eoi_id: int


@dataclass
class Document:
    tokens: np.ndarray  # int64 [n]; pad id at visual positions
    modality: np.ndarray  # int64 [n]
    frames: np.ndarray  # int64 [n]; 0, 1, ... per image/frame within the document, NO_FRAME for text
    denoise: np.ndarray  # bool [n]
    labels: np.ndarray  # int64 [n]
    latents: np.ndarray  # float32 [number of visual positions, C], in position order (understanding frames' excluded)
    source: tuple[str, str] | None = None  # (shard, key) of the sample, for error messages
    understanding: np.ndarray | None = None
    """Dual encoder: bool [n], True at the positions of understanding frames; None: there are none."""
    understanding_latents: np.ndarray | None = None
    """Dual encoder: float32 [number of understanding positions, C_u], in position order."""

    def __len__(self) -> int:
        return len(self.tokens)


def next_token_labels(tokens: np.ndarray, modality: np.ndarray) -> np.ndarray:
    """Each text position predicts the next position's token if that one is text too.

    So the position before <boi> predicts <boi>, <boi> and the patches predict nothing, <eoi>
    predicts what follows it, and the last position of the document predicts nothing.
    """
    labels = np.full(len(tokens), IGNORE_INDEX, dtype=np.int64)
    text_pair = (modality[:-1] == TEXT) & (modality[1:] == TEXT)
    labels[:-1][text_pair] = tokens[1:][text_pair]
    return labels


# Text ids (a list or an int array), or one frame: (latents [N, C], denoise), or an
# understanding frame of a dual encoder: (understanding latents [N_u, C_u], False, True).
Segment = list[int] | np.ndarray | tuple[np.ndarray, bool] | tuple[np.ndarray, bool, bool]


def assemble(segments: list[Segment], pad_id: int, latent_dim: int) -> Document:
    """Concatenate text segments (token ids) and frames ((latents [N, C], denoise), or
    (latents, False, True) for an understanding frame) into a document."""
    tokens, modality, frames, denoise, latents = [], [], [], [], []
    understanding, understanding_latents = [], []
    frame = 0
    for seg in segments:
        if isinstance(seg, tuple):
            rows, noisy, *is_understanding = seg
            reads = bool(is_understanding and is_understanding[0])
            n = len(rows)
            tokens.append(np.full(n, pad_id, dtype=np.int64))
            modality.append(np.full(n, VISION, dtype=np.int64))
            frames.append(np.full(n, frame, dtype=np.int64))
            denoise.append(np.full(n, noisy and not reads, dtype=bool))
            understanding.append(np.full(n, reads, dtype=bool))
            (understanding_latents if reads else latents).append(np.asarray(rows, dtype=np.float32))
            frame += 1
        else:
            n = len(seg)
            tokens.append(np.asarray(seg, dtype=np.int64))
            modality.append(np.full(n, TEXT, dtype=np.int64))
            frames.append(np.full(n, NO_FRAME, dtype=np.int64))
            denoise.append(np.zeros(n, dtype=bool))
            understanding.append(np.zeros(n, dtype=bool))
    tok, mod = np.concatenate(tokens), np.concatenate(modality)
    return Document(
        tokens=tok,
        modality=mod,
        frames=np.concatenate(frames),
        denoise=np.concatenate(denoise),
        labels=next_token_labels(tok, mod),
        latents=np.concatenate(latents) if latents else np.zeros((0, latent_dim), dtype=np.float32),
        understanding=np.concatenate(understanding) if understanding_latents else None,
        understanding_latents=np.concatenate(understanding_latents) if understanding_latents else None,
    )


def _frames(latents: np.ndarray, denoise: bool, tk: SpecialTokens, *, understanding: bool = False) -> list[Segment]:
    segments: list[Segment] = []
    for frame in latents:
        segments += [[tk.boi_id], (frame, False, True) if understanding else (frame, denoise), [tk.eoi_id]]
    return segments


def _understanding_frames(sample: dict[str, Any], layout: LayoutSettings, tk: SpecialTokens) -> list[Segment]:
    """The image(s) of an I->T layout: the understanding latents, clean, when the sample has
    them (dual encoder), else the generation latents (noised unless clean_conditioning_frames)."""
    if sample.get("understanding_latents") is not None:
        return _frames(sample["understanding_latents"], False, tk, understanding=True)
    return _frames(sample["latents"], not layout.clean_conditioning_frames, tk)


@dataclass(frozen=True)
class LayoutSettings:
    """How samples become documents; the loader config's fields of the same names."""

    p_understanding: float = 0.5
    cond_dropout: float = 0.1
    clean_conditioning_frames: bool = False
    loss_on: Literal["all", "answers"] = "all"
    """``answers``: fine-tuning on question-answer data, LM targets only at the answer (answer_document)."""
    answer_flow_loss: bool = False
    """With loss_on answers: keep the flow loss on frames (default: every frame clean, no flow loss)."""


def build_document(
    sample: dict[str, Any],
    tokenizer: SpecialTokens,
    rng: np.random.Generator,
    *,
    latent_dim: int,
    layout: LayoutSettings = LayoutSettings(),
) -> Document:
    """Format one sample from `unimm.data.shards`; `rng` decides direction and dropout."""
    if layout.loss_on != "all":
        return answer_document(sample, tokenizer, rng, latent_dim=latent_dim, layout=layout)
    tk, kind = tokenizer, sample["kind"]
    ids, latents = sample["tokens"], sample["latents"]
    if kind == "text":
        return assemble([[tk.bos_id], ids, [tk.eos_id]], tk.pad_id, latent_dim)
    if kind == "image_text":
        directions = sample["directions"]
        both = len(directions) == 2
        if (both and rng.random() < layout.p_understanding) or directions == ["i2t"]:
            segments = [[tk.bos_id], *_understanding_frames(sample, layout, tk), ids, [tk.eos_id]]
            return assemble(segments, tk.pad_id, latent_dim)
    condition = ids[:0] if rng.random() < layout.cond_dropout else ids
    if kind == "action":
        k = sample["num_context"]
        segments = [
            [tk.bos_id],
            *_frames(latents[:k], not layout.clean_conditioning_frames, tk),
            condition,
            *_frames(latents[k:], True, tk),
            [tk.eos_id],
        ]
    else:  # image_text generation, video
        segments = [[tk.bos_id], condition, *_frames(latents, True, tk), [tk.eos_id]]
    return assemble(segments, tk.pad_id, latent_dim)


# -- fine-tuning with the loss on answers only (seed 000's transfer protocol) --------------------

RESPONSE_FIELDS = ("solution_direct", "solution", "answer")
"""Sample fields that hold the response to a question (data_pipelines.procedural.TaskSample:
the understanding view's text is ``question_direct + "\n" + solution_direct``, the text view's
``question + "\n" + solution``; ``answer`` alone is the bare label)."""
QUESTION_FIELDS = ("question_direct", "question")


def answer_length(sample: dict[str, Any], tokenizer) -> int:
    """How many of the sample's last text tokens are the answer, which the document lays out
    right before its final ``<eos>``; 0 when it has none.

    A question-answer sample (``question``/``solution`` fields, any view): the response
    (``solution_direct`` first for the understanding view, then ``solution``, ``answer``)
    whose token ids end the sample's tokens; failing that, what follows the question and its
    newline. An image-text pair without such fields that can be laid out image first: its
    caption, the answer to the image. Anything else (plain text, generation-only pairs,
    video, actions) has no answer. Needs ``tokenizer.encode``."""
    ids = np.asarray(sample["tokens"])
    kind = sample["kind"]
    if not (kind == "text" or (kind == "image_text" and "i2t" in sample.get("directions", ()))):
        return 0
    order = RESPONSE_FIELDS if sample.get("view") == "understanding" else ("solution", "solution_direct", "answer")
    for key in order:
        text = sample.get(key)
        if isinstance(text, str) and text:
            answer = tokenizer.encode(text)
            if 0 < len(answer) <= len(ids) and np.array_equal(ids[len(ids) - len(answer) :], answer):
                return len(answer)
    for key in QUESTION_FIELDS:
        text = sample.get(key)
        if isinstance(text, str) and text:
            prompt = tokenizer.encode(text + "\n")
            if len(prompt) < len(ids) and np.array_equal(ids[: len(prompt)], prompt):
                return len(ids) - len(prompt)
    if any(isinstance(sample.get(key), str) for key in RESPONSE_FIELDS + QUESTION_FIELDS):
        logger.warning(
            "sample %r in shard %s: its answer is not at the end of its tokens and its question not at the start; "
            "it gets no answer targets", sample.get("key"), sample.get("shard"),
        )
        return 0
    return len(ids) if kind == "image_text" else 0


def answer_document(
    sample: dict[str, Any], tokenizer, rng: np.random.Generator, *, latent_dim: int, layout: LayoutSettings
) -> Document:
    """The document of ``loss_on answers``: laid out as in pretraining but image first wherever
    the source allows it; labels IGNORE_INDEX everywhere except at the positions whose target is
    an answer token or the ``<eos>`` after it (the loss covers the answer and its end); every
    frame clean, so no flow loss, unless ``answer_flow_loss``."""
    if layout.loss_on != "answers":
        raise ValueError(f"loss_on must be 'all' or 'answers', got {layout.loss_on!r}")
    plain = dataclasses.replace(layout, loss_on="all", p_understanding=1.0)
    doc = build_document(sample, tokenizer, rng, latent_dim=latent_dim, layout=plain)
    n = answer_length(sample, tokenizer)
    keep = np.zeros(len(doc), dtype=bool)
    if n:
        eos = len(doc) - 1  # text and image-first layouts end "... answer <eos>"
        keep[eos - n - 1 : eos] = True  # position p predicts token p + 1
    doc.labels = np.where(keep, doc.labels, IGNORE_INDEX)
    if not layout.answer_flow_loss:
        doc.denoise = np.zeros_like(doc.denoise)
    return doc
