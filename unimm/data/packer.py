"""Greedy packing of documents into rows of exactly `seq_len` positions (fields of batch.py).

A document that does not fit in the rest of a row starts the next row and the rest is padding,
so documents are never split: cutting one would cut through an image or separate a caption
from its image. A document longer than `seq_len` can never fit and is skipped (counted, logged).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from unimm.data.batch import IGNORE_INDEX, NO_FRAME, TEXT
from unimm.data.sequences import Document

logger = logging.getLogger(__name__)

# Past this many documents in a row that cannot fit, the data or seq_len is wrong: fail loudly
# instead of spinning forever.
MAX_CONSECUTIVE_TOO_LONG = 10_000

Row = dict[str, np.ndarray]


def pack_row(docs: list[Document], seq_len: int, latent_dim: int, pad_id: int) -> Row:
    """Lay `docs` side by side and pad to `seq_len`; labels are returned under "labels"."""
    used = sum(len(d) for d in docs)
    if used > seq_len:
        raise ValueError(f"{used} positions of documents do not fit in a row of {seq_len}")
    row: Row = {
        "tokens": np.full(seq_len, pad_id, dtype=np.int64),
        "latents": np.zeros((seq_len, latent_dim), dtype=np.float32),
        "modality": np.full(seq_len, TEXT, dtype=np.int64),
        "document_ids": np.empty(seq_len, dtype=np.int64),
        "frame_ids": np.full(seq_len, NO_FRAME, dtype=np.int64),
        "positions": np.empty(seq_len, dtype=np.int64),
        "denoise": np.zeros(seq_len, dtype=bool),
        "labels": np.full(seq_len, IGNORE_INDEX, dtype=np.int64),
    }
    start, frame_offset = 0, 0
    for doc_id, doc in enumerate(docs):
        span = slice(start, start + len(doc))
        row["tokens"][span] = doc.tokens
        row["modality"][span] = doc.modality
        row["document_ids"][span] = doc_id
        row["positions"][span] = np.arange(len(doc))
        row["denoise"][span] = doc.denoise
        row["labels"][span] = doc.labels
        visual = doc.frames != NO_FRAME
        row["frame_ids"][span] = np.where(visual, doc.frames + frame_offset, NO_FRAME)
        row["latents"][span][visual] = doc.latents
        frame_offset += int(doc.frames.max(initial=-1)) + 1
        start = span.stop
    # Padding is one more document, so it attends only to itself and never to real data.
    row["document_ids"][start:] = len(docs)
    row["positions"][start:] = np.arange(seq_len - start)
    return row


class Packer:
    """Greedy packer; its state is the document carried over to the next row, plus counters."""

    def __init__(self, seq_len: int, latent_dim: int, pad_id: int) -> None:
        self.seq_len, self.latent_dim, self.pad_id = seq_len, latent_dim, pad_id
        self.carry: Document | None = None
        self.too_long = 0
        self.padding = 0

    def next_row(self, next_document: Callable[[], Document]) -> Row:
        docs: list[Document] = []
        used, consecutive_too_long = 0, 0
        while used < self.seq_len:
            if self.carry is not None:
                doc, self.carry = self.carry, None
            else:
                doc = next_document()
            if len(doc) > self.seq_len:
                self.too_long += 1
                consecutive_too_long += 1
                if consecutive_too_long >= MAX_CONSECUTIVE_TOO_LONG:
                    raise RuntimeError(
                        f"{consecutive_too_long} documents in a row exceed seq_len {self.seq_len}"
                    )
                # Logged sparsely: a text corpus can hold many long documents.
                if self.too_long <= 10 or self.too_long & (self.too_long - 1) == 0:
                    logger.warning(
                        "skipping a document of %d positions > seq_len %d (%d skipped so far)",
                        len(doc),
                        self.seq_len,
                        self.too_long,
                    )
                continue
            consecutive_too_long = 0
            if used + len(doc) > self.seq_len:
                self.carry = doc
                break
            docs.append(doc)
            used += len(doc)
        self.padding += self.seq_len - used
        return pack_row(docs, self.seq_len, self.latent_dim, self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        # Plain arrays, so a checkpoint does not pickle a reference to a unimm class.
        carry = None if self.carry is None else dataclasses.asdict(self.carry)
        return {"carry": carry, "too_long": self.too_long, "padding": self.padding}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.carry = None if state["carry"] is None else Document(**state["carry"])
        self.too_long, self.padding = state["too_long"], state["padding"]
