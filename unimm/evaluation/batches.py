"""Evaluation documents -> model inputs, one document per row, and the model's forward on them.

Documents are laid out as in training (``unimm.data.sequences``): text ``[bos] text [eos]``,
generation ``[bos] caption [boi] frame [eoi] [eos]``, understanding ``[bos] [boi] frame [eoi]
text [eos]``. One document per row (padded to the longest of its batch) keeps the row index
the document's index, which the probes and the routing capture pool over.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from unimm.data.batch import padding_mask
from unimm.data.packer import empty_rows, pack_row
from unimm.data.sequences import Document, assemble
from unimm.masks import build_attention_mask


def text_document(ids: list[int], tk, latent_dim: int) -> Document:
    return assemble([[tk.bos_id], list(ids), [tk.eos_id]], tk.pad_id, latent_dim)


def generation_document(caption_ids: list[int], latents_NC: np.ndarray, tk, latent_dim: int) -> Document:
    """T->I: the caption, then the frame (noised: it carries the flow loss)."""
    segments = [[tk.bos_id], list(caption_ids), [tk.boi_id], (latents_NC, True), [tk.eoi_id], [tk.eos_id]]
    return assemble(segments, tk.pad_id, latent_dim)


def understanding_document(
    latents_NC: np.ndarray, text_ids: list[int], tk, latent_dim: int, *, dual_encoder: bool = False
) -> Document:
    """I->T with a clean image (as inference reads it); ``dual_encoder``: understanding latents."""
    frame = (latents_NC, False, True) if dual_encoder else (latents_NC, False)
    segments = [[tk.bos_id], [tk.boi_id], frame, [tk.eoi_id], list(text_ids), [tk.eos_id]]
    return assemble(segments, tk.pad_id, latent_dim)


def document_batches(
    docs: list[Document], pad_id: int, latent_dim: int, rows: int = 16, understanding_dim: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``rows`` documents, one per row, padded to the batch's longest document;
    fields of ``unimm.data.batch`` plus ``labels`` and ``valid`` (False at padding)."""
    for start in range(0, len(docs), rows):
        chunk = docs[start : start + rows]
        batch = empty_rows(len(chunk), max(len(d) for d in chunk), latent_dim, pad_id, understanding_dim)
        for i, doc in enumerate(chunk):
            pack_row([doc], {name: field[i] for name, field in batch.items()})
        tensors = {name: torch.from_numpy(field) for name, field in batch.items()}
        tensors["valid"] = ~padding_mask(tensors["tokens"], tensors["modality"], pad_id)
        yield tensors


def attention_mask(model, batch: dict[str, torch.Tensor]):
    """The batch's hybrid mask; build it once when the same batch runs several times (it costs
    more than the tiny models' forward)."""
    device = next(model.parameters()).device
    return build_attention_mask(batch["document_ids"], batch["frame_ids"], model.config.mask_backend(device))


def forward(model, batch: dict[str, torch.Tensor], latents_BLC, t_BL, lm_BL, flow_BL, mask=None):
    """LM logits at ``lm_BL`` and flow-head outputs at ``flow_BL`` of one batch."""
    mask = attention_mask(model, batch) if mask is None else mask
    extra = {}
    if "understanding" in batch:
        extra = {"understanding": batch["understanding"], "understanding_latents": batch["understanding_latents"]}
    outputs = model(
        batch["tokens"], latents_BLC, t_BL, batch["modality"], batch["positions"], mask, lm_BL, flow_BL,
        valid_BL=batch["valid"], **extra,
    )
    return outputs[0], outputs[1]


@contextmanager
def layer_outputs(model) -> Iterator[list[torch.Tensor]]:
    """Collects each block's output hidden states [B, L, D], in layer order, for every forward
    run inside the ``with`` (the list is cleared by the caller between forwards)."""
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append((output[0] if isinstance(output, tuple) else output).detach())

    handles = [layer.register_forward_hook(hook) for layer in model.layers.values()]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
