"""Feed-forward variants. Every variant maps ``(x_BLD, modality_BL, valid_BL) -> (y_BLD, balance)``,
``balance`` being the router's load-balancing loss (zero where nothing is routed) and
``valid_BL`` (optional) False at padding, which the MoE leaves out of its balance statistics.

- ``shared``: one SwiGLU FFN for every token (the dense baseline).
- ``modality``: one SwiGLU FFN for text and one for vision; each token runs through its own
  only (paper §2.2, App. C). It is the expert engine with two experts and routing fixed by
  modality, so it shares the MoE's grouped GEMM.
- ``moe``: fine-grained mixture of experts (``unimm.model.moe``).
- ``mot``: Mixture of Transformers (``unimm.model.mot``): the modality FFN, and per-modality
  attention projections and norms too; the whole block is built there, not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torchtitan.protocols.module import Module

from unimm.model.experts import ExpertWeights, ModalityRouting
from unimm.model.init import linear_init
from unimm.model.moe import MoE, MoEConfig


@dataclass(kw_only=True, slots=True)
class FFNConfig:
    kind: Literal["shared", "modality", "moe", "mot"] = "shared"
    hidden_dim: int = 8192
    """Width of the dense and modality FFNs (MoE experts use ``moe.expert_hidden_dim``)."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    backend: Literal["auto", "triton", "torch_grouped_mm", "loop"] = "auto"
    """Grouped-GEMM backend of the modality FFN and the MoT projections (the MoE has its own,
    ``moe.backend``)."""


class SwiGLU(Module):
    def __init__(self, dim: int, hidden_dim: int, out_std: float):
        super().__init__()
        self.w1 = linear_init(dim, hidden_dim, std=0.02)
        self.w3 = linear_init(dim, hidden_dim, std=0.02)
        self.w2 = linear_init(hidden_dim, dim, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SharedFFN(Module):
    def __init__(self, dim: int, config: FFNConfig, out_std: float):
        super().__init__()
        self.ffn = SwiGLU(dim, config.hidden_dim, out_std)

    def forward(self, x_BLD: torch.Tensor, modality_BL: torch.Tensor, valid_BL=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ffn(x_BLD), x_BLD.new_zeros(())

    def inactive_params(self) -> int:
        return 0


class ModalityFFN(Module):
    """Expert 0 is the text FFN, expert 1 the vision FFN (modality ids TEXT=0, VISION=1)."""

    def __init__(self, dim: int, config: FFNConfig, out_std: float):
        super().__init__()
        self.backend = config.backend
        self.experts = ExpertWeights(2, dim, config.hidden_dim, out_std)

    def forward(self, x_BLD: torch.Tensor, modality_BL: torch.Tensor, valid_BL=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.run(x_BLD, ModalityRouting.of(modality_BL)), x_BLD.new_zeros(())

    def run(self, x_BLD: torch.Tensor, routing: ModalityRouting) -> torch.Tensor:
        """The FFN with the tokens already grouped by modality (a MoT block groups them once)."""
        B, L, D = x_BLD.shape
        return routing.swiglu(self.experts, x_BLD.reshape(B * L, D), self.backend).reshape(B, L, D)

    def inactive_params(self) -> int:
        return self.experts.params_per_expert()

    @property
    def routed_experts(self) -> SimpleNamespace:
        # torchtitan's FSDP helper shards stacked experts along their width (Shard(1)) when
        # there are fewer experts than ranks: with two experts, Shard(0) would mostly pad.
        return SimpleNamespace(inner_experts=self.experts)


def _moe(dim: int, config: FFNConfig, out_std: float) -> MoE:
    return MoE(dim, config.moe, out_std)


FFN_BUILDERS: dict[str, Callable[[int, FFNConfig, float], Module]] = {
    "shared": SharedFFN,
    "modality": ModalityFFN,
    "moe": _moe,
}


def build_ffn(dim: int, config: FFNConfig, out_std: float) -> Module:
    if config.kind not in FFN_BUILDERS:
        raise ValueError(f"ffn.kind must be one of {sorted(FFN_BUILDERS)}, got {config.kind!r}")
    return FFN_BUILDERS[config.kind](dim, config, out_std)
