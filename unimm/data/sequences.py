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

Captions, video captions and actions are dropped with `cond_dropout`: every generation
condition needs the same unconditional branch for classifier-free guidance. Only that text
is dropped; frames stay, so the unconditional context of a later frame holds the earlier
frames (``unimm.sampling`` builds it the same way: the context less its condition text).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from unimm.data.batch import IGNORE_INDEX, NO_FRAME, TEXT, VISION


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
    latents: np.ndarray  # float32 [number of visual positions, C], in position order
    source: tuple[str, str] | None = None  # (shard, key) of the sample, for error messages

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


# Text ids (a list or an int array), or one frame: (latents [N, C], denoise).
Segment = list[int] | np.ndarray | tuple[np.ndarray, bool]


def assemble(segments: list[Segment], pad_id: int, latent_dim: int) -> Document:
    """Concatenate text segments (token ids) and frames ((latents [N, C], denoise)) into a document."""
    tokens, modality, frames, denoise, latents = [], [], [], [], []
    frame = 0
    for seg in segments:
        if isinstance(seg, tuple):
            rows, noisy = seg
            n = len(rows)
            tokens.append(np.full(n, pad_id, dtype=np.int64))
            modality.append(np.full(n, VISION, dtype=np.int64))
            frames.append(np.full(n, frame, dtype=np.int64))
            denoise.append(np.full(n, noisy, dtype=bool))
            latents.append(np.asarray(rows, dtype=np.float32))
            frame += 1
        else:
            n = len(seg)
            tokens.append(np.asarray(seg, dtype=np.int64))
            modality.append(np.full(n, TEXT, dtype=np.int64))
            frames.append(np.full(n, NO_FRAME, dtype=np.int64))
            denoise.append(np.zeros(n, dtype=bool))
    tok, mod = np.concatenate(tokens), np.concatenate(modality)
    return Document(
        tokens=tok,
        modality=mod,
        frames=np.concatenate(frames),
        denoise=np.concatenate(denoise),
        labels=next_token_labels(tok, mod),
        latents=np.concatenate(latents) if latents else np.zeros((0, latent_dim), dtype=np.float32),
    )


def _frames(latents: np.ndarray, denoise: bool, tk: SpecialTokens) -> list[Segment]:
    segments: list[Segment] = []
    for frame in latents:
        segments += [[tk.boi_id], (frame, denoise), [tk.eoi_id]]
    return segments


@dataclass(frozen=True)
class LayoutSettings:
    """How samples become documents; the loader config's fields of the same names."""

    p_understanding: float = 0.5
    cond_dropout: float = 0.1
    clean_conditioning_frames: bool = False


def build_document(
    sample: dict[str, Any],
    tokenizer: SpecialTokens,
    rng: np.random.Generator,
    *,
    latent_dim: int,
    layout: LayoutSettings = LayoutSettings(),
) -> Document:
    """Format one sample from `unimm.data.shards`; `rng` decides direction and dropout."""
    tk, kind = tokenizer, sample["kind"]
    ids, latents = sample["tokens"], sample["latents"]
    if kind == "text":
        return assemble([[tk.bos_id], ids, [tk.eos_id]], tk.pad_id, latent_dim)
    if kind == "image_text":
        directions = sample["directions"]
        both = len(directions) == 2
        if (both and rng.random() < layout.p_understanding) or directions == ["i2t"]:
            segments = [[tk.bos_id], *_frames(latents, not layout.clean_conditioning_frames, tk), ids, [tk.eos_id]]
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
