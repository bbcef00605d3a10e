"""The packed batch: what the loader hands the trainer, one tensor of shape [B, L] per field.

Every position of a packed row is either a text token or one visual latent patch. The ids
below are all the attention mask, the model and the losses need:

- ``tokens``       int64. Text token id; at visual positions the id of ``<pad>`` (unused).
- ``latents``      float32 [B, L, C]. Clean latent patch at visual positions, zeros elsewhere.
- ``modality``     int64. ``TEXT`` or ``VISION``.
- ``document_ids`` int64. Index of the packed sample within its row (0, 1, ...); trailing
                   padding gets its own id so it attends only to itself.
- ``frame_ids``    int64. For visual positions, an index unique within the row for each
                   image or video frame; ``NO_FRAME`` (-1) for text.
- ``positions``    int64. Position inside the document (RoPE restarts at each document).
- ``denoise``      bool. Visual positions that are noised and trained with the flow loss:
                   every image and frame by default (paper App. B); with
                   ``dataloader.clean_conditioning_frames`` the images that condition text
                   (understanding direction) and action context frames stay clean: False.
- ``labels``       int64. Next text token to predict at this position, ``IGNORE_INDEX``
                   where there is none (visual positions, the last token of a document,
                   padding).

Dual encoder only (a model with ``understanding_dim`` > 0; paper §6.3), two more fields:

- ``understanding``          bool. Visual positions of understanding (I->T) images, fed with
                             the understanding encoder's latents through the model's
                             ``understanding_proj``; never denoised (``denoise`` False).
- ``understanding_latents``  float32 [B, L, C_u]. Those latents at those positions, zeros
                             elsewhere. ``latents`` then holds zeros there: it carries the
                             generation latents, at the positions that hold them.

This is the dense batch that ``PackedMultimodalDataset.next_batch`` gives and tools use. On
its way to the training device a batch travels in the wire format of unimm.data.wire (latent
rows only, index tensors of the LM targets and denoised positions), which ``wire.to_device``
turns back into these fields on the device.
"""

from __future__ import annotations

TEXT = 0
VISION = 1
NO_FRAME = -1
IGNORE_INDEX = -100  # torchtitan's value, kept identical for its loss utilities


def padding_mask(tokens_BL, modality_BL, pad_id: int):
    """True at the packer's trailing padding: text positions holding ``<pad>`` (documents hold
    ``<pad>`` only at visual positions, whose token is unused). Works on arrays and tensors."""
    return (tokens_BL == pad_id) & (modality_BL == TEXT)


BATCH_KEYS = ("tokens", "latents", "modality", "document_ids", "frame_ids", "positions", "denoise")
UNDERSTANDING_KEYS = ("understanding", "understanding_latents")
"""The dual-encoder fields; a batch has both or neither (the model's keyword arguments of the
same names take them)."""

PROVENANCE_KEY = "_provenance"
"""Optional input-dict entry (not a tensor): per row, the ``(shard, key)`` of each sample
packed into it (``Packer.row_sources``). The trainer takes it off before the forward pass and
names these samples when a step has a non-finite loss (``unimm.titan.nonfinite``)."""
