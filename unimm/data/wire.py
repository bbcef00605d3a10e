"""The batch on its way from the loader to the device (the wire format), and back to the dense batch.

The packer lays rows out densely (batch.py): latents ``[B, L, C]`` with zeros at every text
position. The trainer's step needs more than that dense batch: the flat positions of the LM
targets and of the noised latents, as index tensors of a fixed length, so that the heads and
losses gather rows with shapes known before the step (no boolean indexing, which waits for the
device to count the rows) and the loss path compiles into one graph. The loader (in its worker
processes) computes them and sends the latents as rows only:

- ``tokens``, ``modality``, ``document_ids``, ``frame_ids``, ``positions``, ``denoise`` (and the
  dual encoder's ``understanding``): the ``[B, L]`` fields of batch.py, unchanged.
- ``latents`` ``[N_vis, C]`` in ``WireFormat.latent_dtype`` (bfloat16 on CUDA): the latent rows
  of the visual positions ``latent_index`` ``[N_vis]`` (flat, ``b * L + l``), nothing at text.
- ``understanding_latents`` ``[N_u, C_u]`` at ``understanding_index`` (dual encoder only).
- ``lm_index``, ``lm_labels`` ``[K_lm]``: the positions with an LM target and those targets,
  padded to the capacity ``K_lm`` with position 0 and ``IGNORE_INDEX`` (which the
  cross-entropy skips).
- ``flow_index``, ``flow_valid`` ``[K_flow]``: the denoised positions, padded with position 0
  and ``False``.
- ``counts`` int64 ``[3]``: LM targets, denoised positions and real (non-padding) positions of
  the batch, counted on the host, so the global loss normalisers need no device reduction.

``labels`` ``[B, L]`` stays the batch's second element (torchtitan counts tokens from it).
``to_device`` moves a wire batch (non-blocking: the loader pins it on CUDA) and scatters the
latent rows into the dense ``[B, L, C]`` float32 latents on the device.

Capacities. ``K`` is a fixed fraction of the batch's positions (``capacity``), so every batch
of a run has the same head and loss shapes; a batch with more targets than that (rare with a
fraction above the mixture's share) takes all ``B * L`` positions: a second shape, never a
dropped target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from unimm.data.batch import IGNORE_INDEX, NO_FRAME, padding_mask
from unimm.errors import ConfigError

WireDtype = Literal["float32", "bfloat16", "float16"]
CAPACITY_MULTIPLE = 64  # capacities are rounded up to this many rows (kernel-friendly sizes)


@dataclass(frozen=True, slots=True)
class WireFormat:
    latent_dtype: WireDtype = "float32"
    """The latents' dtype on the wire: float32 is exact; bfloat16 and float16 halve the bytes."""
    lm_capacity: float = 1.0
    """LM target slots per batch as a fraction of its positions (see the module docstring)."""
    flow_capacity: float = 1.0
    """Denoised-position slots per batch as a fraction of its positions."""

    def __post_init__(self):
        for name in ("lm_capacity", "flow_capacity"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"dataloader.{name}={value}: expected a fraction of the batch's positions in (0, 1]")
        if self.latent_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dataloader.latent_wire_dtype={self.latent_dtype!r}: expected float32, bfloat16 or float16")


def capacity(needed: int, positions: int, fraction: float) -> int:
    """Slots for ``needed`` rows of a batch of ``positions``: ``fraction * positions`` rounded up
    to ``CAPACITY_MULTIPLE`` (at most ``positions``), or all ``positions`` when that is too few."""
    base = min(positions, math.ceil(fraction * positions / CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE)
    return base if needed <= base else positions


def _padded(index_N: np.ndarray, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``index_N`` padded with 0 to ``slots``, and True at the real entries."""
    padded = np.zeros(slots, dtype=np.int64)
    padded[: len(index_N)] = index_N
    valid = np.zeros(slots, dtype=bool)
    valid[: len(index_N)] = True
    return torch.from_numpy(padded), torch.from_numpy(valid)


def _rows(latents_BLC: torch.Tensor, positions_BL: np.ndarray, dtype: WireDtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``latents_BLC`` at ``positions_BL`` in ``dtype``, and their flat indices."""
    index_N = np.flatnonzero(positions_BL)
    rows_NC = np.asarray(latents_BLC).reshape(positions_BL.size, -1)[index_N]  # numpy: no torch op overhead
    return torch.from_numpy(rows_NC).to(getattr(torch, dtype)), torch.from_numpy(index_N)


def encode(
    fields: dict[str, torch.Tensor], labels_BL: torch.Tensor, wire: WireFormat, pad_id: int
) -> dict[str, torch.Tensor]:
    """The wire inputs of a dense batch (``fields`` as ``PackedMultimodalDataset.next_batch``
    gives them; not modified); host tensors only, no device involved."""
    B, L = labels_BL.shape
    out = {k: v for k, v in fields.items() if k not in ("latents", "understanding_latents")}
    # the packer writes generation latents exactly at framed positions outside understanding frames
    visual_BL = np.asarray(fields["frame_ids"]) != NO_FRAME
    if "understanding" in fields:
        understanding_BL = np.asarray(fields["understanding"])
        visual_BL &= ~understanding_BL
        out["understanding_latents"], out["understanding_index"] = _rows(
            fields["understanding_latents"], understanding_BL, wire.latent_dtype
        )
    out["latents"], out["latent_index"] = _rows(fields["latents"], visual_BL, wire.latent_dtype)

    labels_N = np.asarray(labels_BL).reshape(-1)
    lm_N = np.flatnonzero(labels_N != IGNORE_INDEX)
    out["lm_index"], lm_valid = _padded(lm_N, capacity(len(lm_N), B * L, wire.lm_capacity))
    out["lm_labels"] = torch.where(lm_valid, torch.from_numpy(labels_N[out["lm_index"].numpy()]), IGNORE_INDEX)
    flow_N = np.flatnonzero(np.asarray(fields["denoise"]))
    out["flow_index"], out["flow_valid"] = _padded(flow_N, capacity(len(flow_N), B * L, wire.flow_capacity))
    real = int((~padding_mask(np.asarray(fields["tokens"]), np.asarray(fields["modality"]), pad_id)).sum())
    out["counts"] = torch.tensor([len(lm_N), len(flow_N), real], dtype=torch.int64)
    return out


def _scatter_rows(rows_NC: torch.Tensor, index_N: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """Float32 ``[B, L, C]`` with ``rows_NC`` at the flat positions ``index_N``, zeros elsewhere."""
    dense = torch.zeros(B * L, rows_NC.shape[1], dtype=torch.float32, device=rows_NC.device)
    return dense.index_copy_(0, index_N, rows_NC.float()).view(B, L, -1)


def to_device(inputs: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """A wire batch on ``device`` with its latent rows scattered into the dense float32
    ``latents`` (and ``understanding_latents``) ``[B, L, C]`` of batch.py; the index fields stay.
    Copies are non-blocking (asynchronous from pinned memory) and the scatter runs on the
    device: nothing here waits for it."""
    batch = {
        k: v.to(device, non_blocking=True) for k, v in inputs.items() if isinstance(v, torch.Tensor) and k != "counts"
    }
    B, L = batch["tokens"].shape
    batch["latents"] = _scatter_rows(batch["latents"], batch["latent_index"], B, L)
    if "understanding_index" in batch:
        batch["understanding_latents"] = _scatter_rows(
            batch["understanding_latents"], batch["understanding_index"], B, L
        )
    return batch
