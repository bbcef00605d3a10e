"""Greedy text answers with the sampler's KV cache, for questions with or without an image.

Unlike ``MixedModalSampler.continue_text``, an answer stops at ``<boi>`` as well as ``<eos>``:
a question is answered in text, and an untrained model that opens an image would otherwise
spend a whole Euler integration on it.
"""

from __future__ import annotations

import numpy as np
import torch


def greedy_answer(sampler, prompt_ids: list[int], image_latents: np.ndarray | None, max_new_tokens: int,
                  dual_encoder: bool = False) -> str:
    """``[bos] ([boi] image [eoi]) prompt`` then greedy tokens until ``<eos>``/``<boi>``."""
    tk = sampler.tokenizer
    ctx = sampler.new_context()
    if image_latents is None:
        logits = sampler.feed_text(ctx, [tk.bos_id, *prompt_ids])
    else:
        sampler.feed_text(ctx, [tk.bos_id, tk.boi_id])
        sampler.feed_frame(ctx, torch.from_numpy(np.asarray(image_latents, dtype=np.float32)), dual_encoder)
        logits = sampler.feed_text(ctx, [tk.eoi_id, *prompt_ids])
    ids: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits.argmax())
        if token in (tk.eos_id, tk.boi_id):
            break
        ids.append(token)
        logits = sampler.feed_text(ctx, [token])
    return tk.decode(ids)
