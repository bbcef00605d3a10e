"""The two-part objective L = lambda_LM * L_LM + lambda_flow * L_flow (paper eq. 3).

Both parts are sums divided by global counts (text targets; noised latent elements) taken
over the whole global batch, so that gradients summed over data-parallel ranks (torchtitan
disables FSDP's own averaging) are exactly the global means.

Optional loss centering (paper App. D.2, ``loss_centering``) replaces the fixed lambdas
with per-step weights; see ``LossCentering``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torchtitan.components.loss import BaseLoss
from torchtitan.config import CompileConfig

from unimm.data.batch import IGNORE_INDEX
from unimm.errors import ConfigError
from unimm.flow import FlowMatchingConfig, flow_loss_sum


def chunked_cross_entropy_sum(
    h_ND: torch.Tensor, weight_VD: torch.Tensor, labels_N: torch.Tensor, chunk_rows: int,
    bias_V: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over rows of the cross-entropy of the logits ``h_ND @ weight_VD.T (+ bias_V)``
    against ``labels_N`` (rows labelled ``IGNORE_INDEX`` add nothing), in float32,
    ``chunk_rows`` rows at a time.

    Each chunk's logits, their float32 copy and softmax exist only while that chunk is
    computed: the chunk is checkpointed, so backward keeps just its hidden rows and recomputes
    the logits. Plain cross-entropy over [N, V] logits keeps the float32 log-softmax [N, V]
    alive from forward to backward (4 GiB at 8192 targets and a 128k vocabulary). Chunk
    boundaries depend only on N, so fixed-capacity rows (unimm.data.wire) give a fixed graph.
    """
    if chunk_rows <= 0:
        raise ValueError(f"loss.lm_chunk_rows={chunk_rows}: expected a positive number of rows")

    def chunk_sum(h_chunk, weight, bias, labels_chunk) -> torch.Tensor:
        logits = F.linear(h_chunk, weight, bias).float()
        return F.cross_entropy(logits, labels_chunk, reduction="sum", ignore_index=IGNORE_INDEX)

    total = h_ND.new_zeros((), dtype=torch.float32)
    for start in range(0, h_ND.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        total = total + checkpoint(chunk_sum, h_ND[rows], weight_VD, bias_V, labels_N[rows], use_reentrant=False)
    return total


def masked_flow_loss_sum(
    pred_MC: torch.Tensor, z0_MC: torch.Tensor, eps_MC: torch.Tensor, t_M1: torch.Tensor,
    valid_M: torch.Tensor, config: FlowMatchingConfig,
) -> torch.Tensor:
    """``flow_loss_sum`` over the rows where ``valid_M`` is True (padding of a fixed-capacity
    index list adds exactly 0: its prediction and targets are zeroed, the error is 0 / floor)."""
    keep_M1 = valid_M[:, None]
    zero = torch.zeros((), dtype=z0_MC.dtype, device=z0_MC.device)
    return flow_loss_sum(
        torch.where(keep_M1, pred_MC, zero.to(pred_MC.dtype)), torch.where(keep_M1, z0_MC, zero),
        torch.where(keep_M1, eps_MC, zero), t_M1, config,
    )


class LossCentering:
    """Adaptive loss weights from an EMA of the loss magnitudes (paper App. D.2, eqs. 5-6).

    Each step: c_current = alpha * L_flow + (1 - alpha) * L_LM; the running center
    c_target <- mu * c_target + (1 - mu) * c_current; the weights are
    w_flow = c_target / L_flow and w_LM = c_target / L_LM (constants: no gradient flows
    through them), so each loss is scaled to the shared center. The first step starts the
    EMA at its own c_current (the paper leaves the initial value open).

    Gradient accumulation: the EMA advances once per optimiser step with the step's losses
    (``update``). A microbatch is weighted before the step's losses are known: it uses its
    own losses (``weights``: the center advanced by its c_current, and divided by its
    losses), which is exactly the rule above when a step has one microbatch.

    A step without text targets (or without noised latents) leaves the center as it was;
    the missing part's weight is 0 (its loss is 0 as well).

    Its state (the center and the steps it has seen) is checkpointed (torchtitan Stateful),
    so a resumed run continues with the same weights.
    """

    def __init__(self, alpha: float, momentum: float):
        if not 0.0 <= alpha <= 1.0 or not 0.0 <= momentum < 1.0:
            raise ConfigError(
                f"loss centering needs 0 <= center_alpha <= 1 and 0 <= center_momentum < 1, got {alpha}, {momentum}"
            )
        self.alpha, self.momentum = alpha, momentum
        self.center = 0.0
        self.steps = 0
        self.last: dict[str, float] = {}

    def _advanced(self, loss_lm: float, loss_flow: float) -> float | None:
        """The center after one EMA update with these losses; None when a part is missing."""
        if loss_lm <= 0.0 or loss_flow <= 0.0:
            return None
        current = self.alpha * loss_flow + (1.0 - self.alpha) * loss_lm
        if self.steps == 0:
            return current
        return self.momentum * self.center + (1.0 - self.momentum) * current

    def _weights(self, center: float, loss_lm: float, loss_flow: float) -> tuple[float, float]:
        return (center / loss_lm if loss_lm > 0 else 0.0, center / loss_flow if loss_flow > 0 else 0.0)

    def weights(self, loss_lm: float, loss_flow: float) -> tuple[float, float] | None:
        """(w_LM, w_flow) for a (micro)batch with these mean losses, without advancing the
        EMA; None before the center exists and without both losses (use the lambdas)."""
        center = self._advanced(loss_lm, loss_flow)
        if center is None:
            if self.steps == 0:
                return None
            center = self.center
        return self._weights(center, loss_lm, loss_flow)

    def update(self, loss_lm: float, loss_flow: float) -> None:
        """Advance the EMA with the step's mean losses (once per optimiser step)."""
        center = self._advanced(loss_lm, loss_flow)
        if center is not None:
            self.center, self.steps = center, self.steps + 1
        if self.steps:
            w_lm, w_flow = self._weights(self.center, loss_lm, loss_flow)
            self.last = {"loss/center_c": self.center, "loss/weight_lm": w_lm, "loss/weight_flow": w_flow}

    def metrics(self) -> dict[str, float]:
        """The center after the last step and the weights c_target / L of that step's losses."""
        return dict(self.last)

    def state_dict(self) -> dict[str, Any]:
        return {"center": self.center, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.center, self.steps = float(state["center"]), int(state["steps"])


class TransfusionLoss(BaseLoss):
    @dataclass(kw_only=True, slots=True)
    class Config(BaseLoss.Config):
        lambda_lm: float = 1.0
        lambda_flow: float = 3.0
        flow: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
        loss_centering: bool = False
        """Replace lambda_lm / lambda_flow by the adaptive weights of paper App. D.2."""
        center_alpha: float = 0.5
        """Emphasis of the center c = alpha * L_flow + (1 - alpha) * L_LM: toward 1 favours
        vision, toward 0 text."""
        center_momentum: float = 0.99
        """EMA momentum mu of the running center."""
        lm_chunk_rows: int = 1024
        """Rows per chunk of the LM head and cross-entropy in training
        (``chunked_cross_entropy_sum``): the float32 logits alive at a time are
        lm_chunk_rows x vocab_size."""

    def __init__(self, config: Config, *, compile_config: CompileConfig | None = None):
        self.config = config
        self.centering = (
            LossCentering(config.center_alpha, config.center_momentum) if config.loss_centering else None
        )

    def parts(
        self,
        logits_NV: torch.Tensor,
        text_labels_N: torch.Tensor,
        flow_pred_MC: torch.Tensor,
        z0_MC: torch.Tensor,
        eps_MC: torch.Tensor,
        t_M1: torch.Tensor,
        global_counts: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_LM, L_flow): this microbatch's sums over the global counts."""
        loss_lm = F.cross_entropy(logits_NV.float(), text_labels_N, reduction="sum") / global_counts[0]
        loss_flow = flow_loss_sum(flow_pred_MC, z0_MC, eps_MC, t_M1, self.config.flow) / global_counts[1]
        return loss_lm, loss_flow

    def lm_loss(self, labels_N: torch.Tensor) -> Callable[..., torch.Tensor]:
        """The model's ``lm_loss`` argument for these targets: the chunked cross-entropy sum of
        the LM head over the target rows (``UnimmModel.forward``, ``LMHead``)."""

        def lm_loss(h_ND: torch.Tensor, weight_VD: torch.Tensor, bias_V: torch.Tensor | None) -> torch.Tensor:
            return chunked_cross_entropy_sum(h_ND, weight_VD, labels_N, self.config.lm_chunk_rows, bias_V)

        return lm_loss

    def step_parts(
        self,
        lm_sum: torch.Tensor,
        flow_pred_MC: torch.Tensor,
        z0_MC: torch.Tensor,
        eps_MC: torch.Tensor,
        t_M1: torch.Tensor,
        flow_valid_M: torch.Tensor,
        global_counts: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_LM, L_flow) of a training microbatch: its LM cross-entropy sum (from ``lm_loss``)
        and its flow loss over the valid rows of fixed-capacity index lists, over the global
        counts. Same values as ``parts``, over static shapes and without boolean indexing."""
        loss_lm = lm_sum / global_counts[0]
        loss_flow = masked_flow_loss_sum(flow_pred_MC, z0_MC, eps_MC, t_M1, flow_valid_M, self.config.flow)
        return loss_lm, loss_flow / global_counts[1]

    def combine(
        self,
        loss_lm: torch.Tensor,
        loss_flow: torch.Tensor,
        router_loss: torch.Tensor,
        weights: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """w_LM * L_LM + w_flow * L_flow + router term; ``weights`` None: the lambdas."""
        w_lm, w_flow = weights if weights is not None else (self.config.lambda_lm, self.config.lambda_flow)
        return w_lm * loss_lm + w_flow * loss_flow + router_loss

    # torchtitan Stateful: the trainer registers the loss in its checkpoint when centering is on.
    def state_dict(self) -> dict[str, Any]:
        return self.centering.state_dict() if self.centering is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.centering is not None:
            self.centering.load_state_dict(state)

    def metrics(self) -> dict[str, float]:
        """``loss/center_c``, ``loss/weight_lm``, ``loss/weight_flow`` of the last step
        (empty without centering)."""
        return self.centering.metrics() if self.centering is not None else {}
