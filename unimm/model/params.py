"""Parameter and FLOP counts of a model config, computed on the meta device (no weights).

Counts follow the paper's convention (Table 5): the transformer, its token embedding and LM
head, and any routers. The visual adapters (latent projection, timestep MLP, flow head)
depend on the frozen encoder's width and are reported separately as ``adapter``.
``active`` is what one token runs through: for a modality FFN, one of its two FFNs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

ADAPTER_MODULES = ("latent_proj", "time_embedding", "flow_head")


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int
    adapter: int


def count_params(model: nn.Module) -> ParamCount:
    adapter = sum(p.numel() for name in ADAPTER_MODULES for p in getattr(model, name).parameters())
    total = sum(p.numel() for p in model.parameters()) - adapter
    inactive = sum(layer.feed_forward.inactive_params() for layer in model.layers.values())
    return ParamCount(total=total, active=total - inactive, adapter=adapter)


def meta_model(config) -> nn.Module:
    with torch.device("meta"):
        return config.build()


def training_flops_per_token(config, model: nn.Module, seq_len: int) -> int:
    """6 x (active matmul parameters) + attention scores, the planning rule torchtitan uses.

    The token embedding is a lookup, not a matmul, so it is left out; the attention term
    counts a full (non-causal) L x L score matrix per layer.
    """
    counts = count_params(model)
    matmul_params = counts.active + counts.adapter - model.tok_embeddings.weight.numel()
    attention = 12 * config.n_layers * config.dim * seq_len
    return 6 * matmul_params + attention
