"""Parameter counts of a model config, computed on the meta device (no weights).

Counts follow the paper's convention (Table 5): the transformer, its token embedding and LM
head, and any routers. The visual adapters (latent projection, timestep MLP, flow head)
depend on the frozen encoder's width and are reported separately as ``adapter``.
``active`` is what one token runs through: for a modality FFN, one of its two FFNs.
Training FLOPs per token are in ``unimm.flops``.
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
