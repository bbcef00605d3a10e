"""Stacked SwiGLU expert weights, the choice of grouped-GEMM backend, and routing fixed by
modality (the modality FFN's and the Mixture of Transformers' "experts" are the modalities)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torchtitan.protocols.module import Module

from unimm.data.batch import TEXT
from unimm.kernels import grouped_mm, swiglu_experts


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
    """``auto``: on CUDA the engine's own ``auto`` (the Triton kernel where this GPU model's
    measured table says it beats ``torch._grouped_mm`` for the layer's shape, else
    ``torch._grouped_mm``: ``unimm.kernels.policy``), ``torch._grouped_mm`` elsewhere."""
    if name != "auto":
        return name
    return "auto" if x.is_cuda else "torch_grouped_mm"


def local_tensor(w: torch.Tensor) -> torch.Tensor:
    return w.to_local() if isinstance(w, DTensor) else w


@dataclass(frozen=True)
class ModalityRouting:
    """The tokens of a batch grouped by modality (text rows first), for grouped GEMMs whose
    expert is the token's modality (0 text, 1 vision). Built on the device with no host sync
    (no bincount, no boolean indexing): the text count stays a tensor."""

    order_T: torch.Tensor
    """Row i of the grouped layout is token ``order_T[i]`` of the flattened batch."""
    inverse_T: torch.Tensor
    """Token j sits at row ``inverse_T[j]`` of the grouped layout."""
    offsets: torch.Tensor
    """int32 [2]: the end of the text rows and the end of all rows (the engine's offsets)."""

    @classmethod
    def of(cls, modality_BL: torch.Tensor) -> ModalityRouting:
        modality_T = modality_BL.reshape(-1)
        order_T = torch.argsort(modality_T, stable=True)
        rows_T = torch.arange(len(order_T), device=order_T.device)
        inverse_T = torch.empty_like(order_T).scatter_(0, order_T, rows_T)
        n_text = (modality_T == TEXT).sum()
        offsets = torch.stack([n_text, torch.full_like(n_text, len(order_T))]).to(torch.int32)
        return cls(order_T, inverse_T, offsets)

    def linear(self, x_TD: torch.Tensor, w_MKN: torch.Tensor, backend: str) -> torch.Tensor:
        """``x @ w[m]`` for every token, m its modality; rows in the token order. w: [2, K, N]."""
        y_TN = grouped_mm(x_TD, local_tensor(w_MKN), self.offsets, expert_backend(backend, x_TD), self.order_T)
        return y_TN[self.inverse_T]

    def swiglu(self, experts: ExpertWeights, x_TD: torch.Tensor, backend: str) -> torch.Tensor:
        """Each token through its modality's SwiGLU expert; rows in the token order."""
        backend = expert_backend(backend, x_TD)
        y_TD = swiglu_experts(x_TD, *experts.local(), self.offsets, backend=backend, gather_idx=self.order_T)
        return y_TD[self.inverse_T]
