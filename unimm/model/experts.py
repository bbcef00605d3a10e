"""Stacked SwiGLU expert weights and the choice of grouped-GEMM backend."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torchtitan.protocols.module import Module


class ExpertWeights(Module):
    """w1, w3: [E, D, H] (gate, up); w2: [E, H, D] (down), laid out for ``x @ w[e]``."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, out_std: float):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        normal = partial(nn.init.trunc_normal_, mean=0.0, a=-0.06, b=0.06)
        self._param_init = {
            "w1": partial(normal, std=0.02),
            "w3": partial(normal, std=0.02),
            "w2": partial(nn.init.trunc_normal_, mean=0.0, std=out_std, a=-3 * out_std, b=3 * out_std),
        }

    def params_per_expert(self) -> int:
        return sum(p[0].numel() for p in (self.w1, self.w2, self.w3))

    def local(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, w3, w2) as plain tensors: this rank's experts when they are sharded."""
        return tuple(w.to_local() if isinstance(w, DTensor) else w for w in (self.w1, self.w3, self.w2))


def expert_backend(name: str, x: torch.Tensor) -> str:
    """``auto``: the Triton kernel on CUDA, ``torch._grouped_mm`` elsewhere."""
    if name != "auto":
        return name
    return "triton" if x.is_cuda else "torch_grouped_mm"
