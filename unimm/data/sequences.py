"""One sample -> one document: the per-position fields of the packed batch, before packing.

Formats (<boi>/<eoi> are text positions; the N patches of a frame are VISION positions):

    text                      [bos] text [eos]
    image_text, generation    [bos] caption [boi] latents [eoi] [eos]     latents denoised
      with caption dropped    [bos] [boi] latents [eoi] [eos]             (for classifier-free guidance)
    image_text, understanding [bos] [boi] latents [eoi] caption [eos]     latents clean
    video                     [bos] caption [boi] f1 [eoi] [boi] f2 [eoi] ... [eos], every frame denoised

Video captions are dropped with the same `cond_dropout` as image captions: frame generation
is guided by its caption in the same way and needs the same unconditional branch.
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

    def encode(self, text: str) -> list[int]: ...


@dataclass
class Document:
    tokens: np.ndarray  # int64 [n]; pad id at visual positions
    modality: np.ndarray  # int64 [n]
    frames: np.ndarray  # int64 [n]; 0, 1, ... per image/frame within the document, NO_FRAME for text
    denoise: np.ndarray  # bool [n]
    labels: np.ndarray  # int64 [n]
    latents: np.ndarray  # float32 [number of visual positions, C], in position order

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


Segment = list[int] | tuple[np.ndarray, bool]  # text ids, or one frame: (latents [N, C], denoise)


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


def build_document(
    sample: dict[str, Any],
    tokenizer: SpecialTokens,
    rng: np.random.Generator,
    *,
    latent_dim: int,
    p_understanding: float = 0.5,
    cond_dropout: float = 0.1,
) -> Document:
    """Format one sample from `unimm.data.shards`; `rng` decides direction and caption dropout."""
    tk = tokenizer
    kind = sample["kind"]
    if kind == "text":
        return assemble([[tk.bos_id, *tk.encode(sample["text"]), tk.eos_id]], tk.pad_id, latent_dim)
    caption = tk.encode(sample["caption"])
    latents = sample["latents"]
    if kind == "image_text" and rng.random() < p_understanding:
        understanding: list[Segment] = [[tk.bos_id, tk.boi_id], (latents[0], False)]
        return assemble(understanding + [[tk.eoi_id, *caption, tk.eos_id]], tk.pad_id, latent_dim)
    if rng.random() < cond_dropout:
        caption = []
    segments: list[Segment] = [[tk.bos_id, *caption, tk.boi_id]]
    for i, frame in enumerate(latents):
        segments += [(frame, True), [tk.eoi_id] + ([tk.boi_id] if i + 1 < len(latents) else [tk.eos_id])]
    return assemble(segments, tk.pad_id, latent_dim)
