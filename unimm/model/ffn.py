"""Feed-forward variants. Every variant maps ``(x_BLD, modality_BL) -> y_BLD``.

- ``shared``: one SwiGLU FFN for every token (the dense baseline).
- ``modality``: one SwiGLU FFN for text and one for vision; each token runs through its
  own only, so the active parameters equal the dense model's (paper §2.2, App. C).

New variants (mixtures of experts) register a builder in ``FFN_BUILDERS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torchtitan.protocols.module import Module

from unimm.data.batch import VISION
from unimm.model.init import linear_init


@dataclass(kw_only=True, slots=True)
class FFNConfig:
    kind: Literal["shared", "modality"] = "shared"
    hidden_dim: int = 8192


class SwiGLU(Module):
    def __init__(self, dim: int, hidden_dim: int, out_std: float):
        super().__init__()
        self.w1 = linear_init(dim, hidden_dim, std=0.02)
        self.w3 = linear_init(dim, hidden_dim, std=0.02)
        self.w2 = linear_init(hidden_dim, dim, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


class SharedFFN(Module):
    def __init__(self, dim: int, config: FFNConfig, out_std: float):
        super().__init__()
        self.ffn = SwiGLU(dim, config.hidden_dim, out_std)

    def forward(self, x_BLD: torch.Tensor, modality_BL: torch.Tensor) -> torch.Tensor:
        return self.ffn(x_BLD)

    def inactive_params(self) -> int:
        return 0


class ModalityFFN(Module):
    def __init__(self, dim: int, config: FFNConfig, out_std: float):
        super().__init__()
        self.text = SwiGLU(dim, config.hidden_dim, out_std)
        self.vision = SwiGLU(dim, config.hidden_dim, out_std)

    def forward(self, x_BLD: torch.Tensor, modality_BL: torch.Tensor) -> torch.Tensor:
        is_vision_BL = modality_BL == VISION
        out_BLD = torch.empty_like(x_BLD)
        out_BLD[~is_vision_BL] = self.text(x_BLD[~is_vision_BL])
        out_BLD[is_vision_BL] = self.vision(x_BLD[is_vision_BL])
        return out_BLD

    def inactive_params(self) -> int:
        # Each token runs exactly one of the two FFNs.
        return self.vision.num_params()


FFN_BUILDERS: dict[str, Callable[[int, FFNConfig, float], Module]] = {
    "shared": SharedFFN,
    "modality": ModalityFFN,
}


def build_ffn(dim: int, config: FFNConfig, out_std: float) -> Module:
    if config.kind not in FFN_BUILDERS:
        raise ValueError(f"ffn.kind must be one of {sorted(FFN_BUILDERS)}, got {config.kind!r}")
    return FFN_BUILDERS[config.kind](dim, config, out_std)
