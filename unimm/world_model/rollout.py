"""Autoregressive rollouts of a world model (paper §5.3, Fig. 14; NWM's layout, App. F.1).

Given context frames, frames are predicted one at a time: each from the latest
``num_context`` frames (4, as the navigation samples are trained: `unimm.data.sequences`'s
action layout) and its own action, written as the data jobs write actions
(`unimm.world_model.actions.format_action`):

    <bos> <boi> f(k-3) <eoi> <boi> f(k-2) <eoi> <boi> f(k-1) <eoi> <boi> f(k) <eoi> ACTION <boi> f(k+1) <eoi>

The predicted frame joins the window and the oldest frame leaves it, so every step is in the
exact training format (4 context frames, one action, one target), guided against the same
frames without the action. Actions are numeric moves, WASD keys (`wasd_actions`) or
free-form text (paper §5.3: "get out of the shadow!"), kept verbatim. All rows of a batch
(e.g. a planner's candidate action sequences) are predicted together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from unimm.world_model.actions import Action, format_action

ActionLike = Action | str | Sequence[float]


@dataclass(frozen=True)
class RolloutConfig:
    num_context: int = 4
    """Frames each prediction reads: the navigation samples' 4 context frames."""
    num_frames: int = 8
    """Frames predicted after the context (the paper's rollouts and planning horizon: 8)."""

    def __post_init__(self) -> None:
        if self.num_context < 1 or self.num_frames < 1:
            raise ValueError(f"a rollout needs num_context >= 1 and num_frames >= 1, got {self}")


def action_texts(actions: torch.Tensor | Sequence[Sequence[ActionLike]]) -> list[list[str]]:
    """The text of every action, per row and step: [B, H, 3] numbers or B lists of H actions."""
    if isinstance(actions, torch.Tensor):
        if actions.dim() != 3 or actions.shape[-1] != 3:
            raise ValueError(f"numeric actions must be [B, H, 3] (dx, dy, dyaw), got shape {tuple(actions.shape)}")
        return [[format_action(step) for step in row] for row in actions.tolist()]
    rows = [[format_action(a) for a in row] for row in actions]
    if len({len(r) for r in rows}) > 1:
        raise ValueError(f"every row needs the same number of actions, got {[len(r) for r in rows]}")
    return rows


def rollout(sampler, context: torch.Tensor, actions, num_context: int = RolloutConfig.num_context) -> torch.Tensor:
    """Predicted frames [B, H, N, C] after ``context`` [B, K, N, C] (or [K, N, C], shared by
    every row) under ``actions`` (B rows of H actions, or [B, H, 3] numbers), one step at a
    time through ``sampler`` (`unimm.sampling.MixedModalSampler.predict_next`)."""
    texts = action_texts(actions)
    if not texts or not texts[0]:
        raise ValueError("a rollout needs at least one row of at least one action")
    B, H = len(texts), len(texts[0])
    if context.dim() == 3:
        context = context.expand(B, *context.shape)
    if context.dim() != 4 or context.shape[0] != B or context.shape[1] < 1:
        raise ValueError(f"context must be [B={B}, K, N, C] or [K, N, C] frames, got shape {tuple(context.shape)}")
    window = context[:, -num_context:]
    frames = []
    for step in range(H):
        frame = sampler.predict_next(window, [row[step] for row in texts])
        frames.append(frame)
        window = torch.cat([window, frame[:, None]], dim=1)[:, -num_context:]
    return torch.stack(frames, dim=1)
