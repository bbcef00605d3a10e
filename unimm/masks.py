"""The hybrid attention mask: causal text, bidirectional inside each image or video frame.

One rule, written once as a FlexAttention ``mask_mod``: a query sees a key iff both lie in
the same packed document and the key is earlier in the sequence or both belong to the same
frame. On CUDA it becomes a ``BlockMask``; where FlexAttention has no backward (CPU) the same
``mask_mod`` is evaluated densely and handed to ``scaled_dot_product_attention``.

On CUDA the block mask is built by ``create_block_mask`` compiled, as torchtitan builds its
own (``torchtitan.models.common.attention.create_attention_mask``): eager, it materialises
the [B, L, L] mask before reducing it to blocks and costs 0.15-0.3 s a call at long packed
rows (pytorch#151043). The ids are arguments of the compiled graph, not constants, so new
batches of the same shape reuse it. The trainer builds one mask per microbatch, outside the
model, and every layer reads it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask
from torchtitan.models.common.attention import create_attention_mask as compiled_create_block_mask

AttentionMask = BlockMask | torch.Tensor
MaskBackend = Literal["flex", "sdpa"]


def hybrid_mask_mod(document_ids_BL: torch.Tensor, frame_ids_BL: torch.Tensor):
    """Return the ``mask_mod(b, h, q_idx, kv_idx)`` of the packed batch."""

    def mask_mod(b, h, q_idx, kv_idx):
        same_document = document_ids_BL[b, q_idx] == document_ids_BL[b, kv_idx]
        q_frame = frame_ids_BL[b, q_idx]
        same_frame = (q_frame >= 0) & (q_frame == frame_ids_BL[b, kv_idx])
        return same_document & ((kv_idx <= q_idx) | same_frame)

    return mask_mod


def build_attention_mask(
    document_ids_BL: torch.Tensor,
    frame_ids_BL: torch.Tensor,
    backend: MaskBackend,
    compiled: bool | None = None,
) -> AttentionMask:
    """Build the mask for one batch; call once per batch, outside the model's layer loop.

    ``flex`` gives a ``BlockMask`` (block-sparse, what FlexAttention consumes), built by the
    compiled ``create_block_mask`` when ``compiled`` (None: on CUDA); ``sdpa`` gives a dense
    boolean ``[B, 1, L, L]`` tensor from the same ``mask_mod``.
    """
    B, L = document_ids_BL.shape
    mask_mod = hybrid_mask_mod(document_ids_BL, frame_ids_BL)
    device = document_ids_BL.device
    if backend == "flex":
        use_compiled = device.type == "cuda" if compiled is None else compiled
        build = compiled_create_block_mask if use_compiled else create_block_mask
        return build(mask_mod, B, None, L, L, device=device)
    if backend == "sdpa":
        return create_mask(mask_mod, B, 1, L, L, device=device)
    raise ValueError(f"attention backend must be 'flex' or 'sdpa', got {backend!r}")
