"""Parameter counts of a model config, computed on the meta device (no weights).

Counts follow the paper's convention (Table 5): the transformer, its token embedding and LM
head, and any routers. The visual adapters (latent projection, timestep MLP, flow head, and a
dual encoder's understanding projection) depend on the frozen encoders' widths and are
reported separately as ``adapter``.
``active`` is what one token runs through: for a modality FFN, one of its two FFNs; for a
Mixture of Transformers, one of the two copies of every block and of the final norm (its
active count is the dense model's).
Training FLOPs per token are in ``unimm.flops``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

ADAPTER_MODULES = ("latent_proj", "time_embedding", "flow_head", "understanding_proj")
"""Top-level modules counted as ``adapter``; ``understanding_proj`` exists only in dual-encoder models."""


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int
    adapter: int


def count_params(model: nn.Module) -> ParamCount:
    modules = [getattr(model, name) for name in ADAPTER_MODULES if getattr(model, name, None) is not None]
    adapter = sum(p.numel() for module in modules for p in module.parameters())
    total = sum(p.numel() for p in model.parameters()) - adapter
    return ParamCount(total=total, active=total - inactive_params(model), adapter=adapter)


def inactive_params(module: nn.Module) -> int:
    """Parameters of ``module`` a token does not run through: the sum of ``inactive_params()``
    over the submodules that define it (FFN variants; MoT's per-modality projections and norms),
    each of which counts its own parameters only."""
    return sum(m.inactive_params() for m in module.modules() if callable(getattr(m, "inactive_params", None)))


def meta_model(config) -> nn.Module:
    with torch.device("meta"):
        return config.build()
