"""The two-part objective L = lambda_LM * L_LM + lambda_flow * L_flow (paper eq. 3).

Both parts are sums divided by global counts (text targets; noised latent elements) taken
over the whole global batch, so that gradients summed over data-parallel ranks (torchtitan
disables FSDP's own averaging) are exactly the global means.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torchtitan.components.loss import BaseLoss
from torchtitan.config import CompileConfig

from unimm.flow import FlowMatchingConfig, flow_loss_sum


class TransfusionLoss(BaseLoss):
    @dataclass(kw_only=True, slots=True)
    class Config(BaseLoss.Config):
        lambda_lm: float = 1.0
        lambda_flow: float = 3.0
        flow: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)

    def __init__(self, config: Config, *, compile_config: CompileConfig | None = None):
        self.config = config

    def __call__(
        self,
        logits_NV: torch.Tensor,
        text_labels_N: torch.Tensor,
        flow_pred_MC: torch.Tensor,
        z0_MC: torch.Tensor,
        eps_MC: torch.Tensor,
        t_M1: torch.Tensor,
        global_counts: torch.Tensor,
        router_loss: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``global_counts`` = [text targets, noised latent elements] in the global batch;
        ``router_loss``: the MoE load-balancing term, already weighted and scaled to this
        rank's share of the batch (zero without routed FFNs)."""
        loss_lm = F.cross_entropy(logits_NV.float(), text_labels_N, reduction="sum") / global_counts[0]
        loss_flow = flow_loss_sum(flow_pred_MC, z0_MC, eps_MC, t_M1, self.config.flow) / global_counts[1]
        loss = self.config.lambda_lm * loss_lm + self.config.lambda_flow * loss_flow + router_loss
        return loss, {"loss_lm": loss_lm.detach(), "loss_flow": loss_flow.detach()}
