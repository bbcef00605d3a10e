"""Plain-torch grouped matmul: the correctness oracle for the other backends.

One ordinary matmul per expert over its slice of the expert-sorted rows. It syncs with the host
(`offsets.tolist()`) and launches E matmuls, so it is slow for large E, but every step is an op
whose forward and backward torch already gets right: gradients come from autograd, including the
zero weight gradient of an empty expert.
"""

from __future__ import annotations

import torch


def grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """y[rows of expert e] = x[rows of expert e] @ w[e].

    x: [T, K] rows sorted by expert; w: [E, K, N]; offsets: [E] int32 cumulative row counts
    (expert e owns rows offsets[e-1]:offsets[e], offsets[-1] == T). Returns [T, N].
    """
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    # unbind, not w[g]: the backward of E separate w[g] would write E full-size [E, K, N] zero
    # gradients (quadratic in E, seconds at E = 1008); unbind's backward is one stack.
    return torch.cat([x[s:e] @ w_e for w_e, s, e in zip(w.unbind(0), starts, ends)])


def grouped_mm_loop_weight_grad(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """dw[e] = x[rows of e]^T @ dy[rows of e] (zero for an empty expert): [E, K, N]."""
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    return torch.stack([x[s:e].T @ dy[s:e] for s, e in zip(starts, ends)])
