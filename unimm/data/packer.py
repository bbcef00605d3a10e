"""Greedy packing of documents into rows of exactly `seq_len` positions (fields of batch.py).

A document that does not fit in the rest of a row starts the next row and the rest is padding,
so documents are never split: cutting one would cut through an image or separate a caption
from its image. Documents longer than `seq_len` never reach the packer: the loader's stream
skips and counts them as bad data (loader.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from unimm.data.batch import IGNORE_INDEX, NO_FRAME, TEXT
from unimm.data.sequences import Document

Row = dict[str, np.ndarray]


def empty_rows(count: int, seq_len: int, latent_dim: int, pad_id: int, understanding_dim: int = 0) -> Row:
    """`count` rows of padding ([count, seq_len] per field, latents [count, seq_len, C]): the
    loader packs a whole batch into one allocation, so no row is copied again to stack it.
    ``understanding_dim`` > 0 (dual encoder) adds the fields ``understanding`` and
    ``understanding_latents`` [count, seq_len, C_u] (batch.py)."""
    shape = (count, seq_len)
    extra = {}
    if understanding_dim:
        extra = {
            "understanding": np.zeros(shape, dtype=bool),
            "understanding_latents": np.zeros((*shape, understanding_dim), dtype=np.float32),
        }
    return {
        "tokens": np.full(shape, pad_id, dtype=np.int64),
        "latents": np.zeros((*shape, latent_dim), dtype=np.float32),
        "modality": np.full(shape, TEXT, dtype=np.int64),
        "document_ids": np.empty(shape, dtype=np.int64),
        "frame_ids": np.full(shape, NO_FRAME, dtype=np.int64),
        "positions": np.empty(shape, dtype=np.int64),
        "denoise": np.zeros(shape, dtype=bool),
        "labels": np.full(shape, IGNORE_INDEX, dtype=np.int64),
        **extra,
    }


def pack_row(docs: list[Document], row: Row) -> None:
    """Lay `docs` side by side into `row` (one row of `empty_rows`); labels go under "labels"."""
    seq_len = len(row["tokens"])
    used = sum(len(d) for d in docs)
    if used > seq_len:
        raise ValueError(f"{used} positions of documents do not fit in a row of {seq_len}")
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
        if doc.understanding is not None:
            if "understanding" not in row:
                raise ValueError("a document with understanding frames (dual encoder) needs rows with understanding fields")
            row["understanding"][span] = doc.understanding
            row["understanding_latents"][span][doc.understanding] = doc.understanding_latents
            visual = visual & ~doc.understanding
        row["latents"][span][visual] = doc.latents
        frame_offset += int(doc.frames.max(initial=-1)) + 1
        start = span.stop
    # Padding is one more document, so it attends only to itself and never to real data.
    row["document_ids"][start:] = len(docs)
    row["positions"][start:] = np.arange(seq_len - start)


class Packer:
    """Greedy packer; its state is the document carried over to the next row, plus a counter."""

    def __init__(self, seq_len: int, latent_dim: int, pad_id: int, understanding_dim: int = 0) -> None:
        self.seq_len, self.latent_dim, self.pad_id = seq_len, latent_dim, pad_id
        self.understanding_dim = understanding_dim
        self.carry: Document | None = None
        self.padding = 0
        self.row_sources: list[tuple[str, str] | None] = []  # Document.source of the last row's documents

    def next_row(self, next_document: Callable[[], Document], out: Row | None = None) -> Row:
        """Fill `out` (a row of `empty_rows`; a fresh one if None) and return it.
        `next_document` must return documents of at most `seq_len` positions."""
        docs: list[Document] = []
        used = 0
        while used < self.seq_len:
            if self.carry is not None:
                doc, self.carry = self.carry, None
            else:
                doc = next_document()
            if len(doc) > self.seq_len:
                raise ValueError(f"a document of {len(doc)} positions cannot fit a row of {self.seq_len}")
            if used + len(doc) > self.seq_len:
                self.carry = doc
                break
            docs.append(doc)
            used += len(doc)
        self.padding += self.seq_len - used
        self.row_sources = [doc.source for doc in docs]
        row = out if out is not None else {
            k: v[0] for k, v in empty_rows(1, self.seq_len, self.latent_dim, self.pad_id, self.understanding_dim).items()
        }
        pack_row(docs, row)
        return row

    def state_dict(self) -> dict[str, Any]:
        # Plain arrays, so a checkpoint does not pickle a reference to a unimm class.
        carry = None if self.carry is None else dataclasses.asdict(self.carry)
        return {"carry": carry, "padding": self.padding}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.carry = None if state["carry"] is None else Document(**state["carry"])
        self.padding = state["padding"]
