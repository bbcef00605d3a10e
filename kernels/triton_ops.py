"""The Triton backend as `torch.library.triton_op`s, with autograd.

A triton_op is a custom op whose body torch.compile traces: Inductor sees the Triton kernels
themselves (launched through `wrap_triton`) and the few torch ops around them, instead of one
opaque call. Eager, each op is one dispatcher call, which selective activation checkpointing can
save (the forward ops are in `TRITON_FORWARD_OPS`; the backward ops run in backward only).

  unimm::triton_grouped_mm           y = x[gather] @ w[e]
  unimm::triton_swiglu_gate_up       (h, h1, h3): the SwiGLU's gate and up projections in one
                                     kernel, h = silu(h1) * h3 (h1, h3 are kept for backward)
  and their gradients (unimm::triton_grouped_mm_input_grad, ..._weight_grad,
  unimm::triton_swiglu_gate_up_backward).

Input gradients of a gathered operand are produced per row in the input dtype, then summed onto
the tokens by a deterministic fp32-accumulating segment sum: no fp32 [rows, D] tensor exists.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op

from . import launch
from .grouped_gemm import INTERPRETED


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "grouped GEMM backend 'triton' got CPU tensors, but Triton runs on CPU only through "
            "its interpreter. Use backend='torch_grouped_mm' or backend='loop', or set "
            "TRITON_INTERPRET=1 before triton is first imported (correctness checks only: ~3000x "
            "slower than torch)."
        )


def _rows(x: torch.Tensor, gather_idx: Optional[torch.Tensor]) -> int:
    return x.shape[0] if gather_idx is None else gather_idx.shape[0]


@triton_op("unimm::triton_grouped_mm", mutates_args=())
def triton_grouped_mm(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, gather_idx: Optional[torch.Tensor]
) -> torch.Tensor:
    return launch.grouped_mm(x, w, offsets, gather_idx, _rows(x, gather_idx), name="fwd")


@triton_op("unimm::triton_grouped_mm_input_grad", mutates_args=())
def triton_grouped_mm_input_grad(
    dy: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, gather_idx: Optional[torch.Tensor], x_rows: int
) -> torch.Tensor:
    dx = launch.grouped_mm(dy, w.transpose(1, 2), offsets, None, dy.shape[0], name="dx")
    return dx if gather_idx is None else launch.segment_sum(dx, gather_idx, x_rows)


@triton_op("unimm::triton_grouped_mm_weight_grad", mutates_args=())
def triton_grouped_mm_weight_grad(
    x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, gather_idx: Optional[torch.Tensor], split: int
) -> torch.Tensor:
    """split 0: chosen from the shapes (launch.choose_split)."""
    return launch.weight_grad(x, dy, offsets, gather_idx, split=split or None)


@triton_op("unimm::triton_swiglu_gate_up", mutates_args=())
def triton_swiglu_gate_up(
    x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, offsets: torch.Tensor, gather_idx: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return launch.gate_up(x, w1, w3, offsets, gather_idx, _rows(x, gather_idx))


@triton_op("unimm::triton_swiglu_gate_up_backward", mutates_args=())
def triton_swiglu_gate_up_backward(
    dh: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, h1: torch.Tensor, h3: torch.Tensor,
    offsets: torch.Tensor, gather_idx: Optional[torch.Tensor], split: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw1, dw3): dx = dh1 @ w1^T + dh3 @ w3^T in one kernel (one accumulator), summed onto
    the tokens through gather_idx; dw1, dw3 from one read of the token tile."""
    dh1, dh3 = launch.swiglu_grad(dh, h1, h3)
    if w3.stride() != w1.stride():
        w1, w3 = w1.contiguous(), w3.contiguous()
    dx = launch.grouped_mm(dh1, w1.transpose(1, 2), offsets, None, dh.shape[0], a2=dh3, b2=w3.transpose(1, 2),
                           name="dx")
    if gather_idx is not None:
        dx = launch.segment_sum(dx, gather_idx, x.shape[0])
    dw1, dw3 = launch.weight_grad(x, dh1, offsets, gather_idx, b2=dh3, split=split or None)
    return dx, dw1, dw3


# ----------------------------------------------------------------------------- autograd

# Weight-gradient split used by the backward ops: 0 lets launch.choose_split decide. Set through
# `weight_grad_split` (benchmarks compare splits); read when the backward op is called.
_SPLIT = [0]


class weight_grad_split:
    """Context manager: run the Triton weight gradients with this many row splits (0: auto)."""

    def __init__(self, split: int):
        if split < 0:
            raise ValueError(f"weight_grad_split must be >= 0 (0 = automatic), got {split}")
        self.split, self.saved = split, None

    def __enter__(self):
        self.saved, _SPLIT[0] = _SPLIT[0], self.split
        return self

    def __exit__(self, *exc):
        _SPLIT[0] = self.saved


def _mm_setup(ctx, inputs, output):
    x, w, offsets, gather_idx = inputs
    ctx.save_for_backward(x, w, offsets, gather_idx)


def _mm_backward(ctx, dy):
    x, w, offsets, gather_idx = ctx.saved_tensors
    # contiguous: `y.sum().backward()` hands in an expanded (zero-stride) gradient.
    dy = dy.to(x.dtype).contiguous()
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = triton_grouped_mm_input_grad(dy, w, offsets, gather_idx, x.shape[0])
    if ctx.needs_input_grad[1]:
        dw = triton_grouped_mm_weight_grad(x, dy, offsets, gather_idx, _SPLIT[0]).to(w.dtype)
    return dx, dw, None, None


triton_grouped_mm.register_autograd(_mm_backward, setup_context=_mm_setup)


def _gate_up_setup(ctx, inputs, output):
    x, w1, w3, offsets, gather_idx = inputs
    _, h1, h3 = output
    ctx.save_for_backward(x, w1, w3, h1, h3, offsets, gather_idx)
    ctx.mark_non_differentiable(h1, h3)


def _gate_up_backward(ctx, dh, _dh1, _dh3):
    x, w1, w3, h1, h3, offsets, gather_idx = ctx.saved_tensors
    dh = dh.to(x.dtype).contiguous()
    dx, dw1, dw3 = triton_swiglu_gate_up_backward(dh, x, w1, w3, h1, h3, offsets, gather_idx, _SPLIT[0])
    return dx, dw1.to(w1.dtype), dw3.to(w3.dtype), None, None


triton_swiglu_gate_up.register_autograd(_gate_up_backward, setup_context=_gate_up_setup)

TRITON_FORWARD_OPS = (
    torch.ops.unimm.triton_grouped_mm.default,
    torch.ops.unimm.triton_swiglu_gate_up.default,
)


def grouped_mm(x, w, offsets, gather_idx=None) -> torch.Tensor:
    _check_device(x)
    return triton_grouped_mm(x, w, offsets, gather_idx)


def swiglu(x, w1, w3, w2, offsets, gather_idx=None, fuse_gate_up: bool = True) -> torch.Tensor:
    """down(silu(x @ w1) * (x @ w3)) per expert; rows sorted by expert (un-permuting is the
    caller's). fuse_gate_up=False runs the two projections as separate grouped GEMMs (the
    benchmarks' comparison)."""
    _check_device(x)
    if fuse_gate_up:
        h, _, _ = triton_swiglu_gate_up(x, w1, w3, offsets, gather_idx)
    else:
        gate = triton_grouped_mm(x, w1, offsets, gather_idx)
        up = triton_grouped_mm(x, w3, offsets, gather_idx)
        h = torch.nn.functional.silu(gate) * up
    return triton_grouped_mm(h, w2, offsets, None)
