"""Expert engine: grouped GEMM over expert-sorted rows, and the SwiGLU expert FFN built on it.

Rows are sorted by expert: expert e owns rows offsets[e-1]:offsets[e] (offsets: int32 cumulative
row counts, length E, offsets[-1] == number of rows; experts may be empty). The same engine runs
the fine-grained MoE FFN and the modality FFN (E=2, routing fixed by modality).

Backends, picked by name:
  "triton"            the kernel in grouped_gemm.py: no host sync, fuses the token gather
                      (CUDA; CPU only under TRITON_INTERPRET=1, for correctness checks)
  "torch_grouped_mm"  torch._grouped_mm (CUDA and CPU)
  "loop"              one matmul per expert (reference.py; the correctness oracle)

`offsets[-1] == rows` is the caller's contract and is not checked: checking it would need a host
sync, which the triton and torch_grouped_mm paths exist to avoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .grouped_gemm import grouped_mm_triton
from .reference import grouped_mm_loop

BACKENDS = ("triton", "torch_grouped_mm", "loop")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

__all__ = ["BACKENDS", "grouped_mm", "swiglu_experts"]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    torch._grouped_mm's backward rejects gradients with zero strides, such as the expanded ones
    that `y.sum().backward()` produces.
    """

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        return dy.contiguous()


def _grouped_mm_torch(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    # torch._grouped_mm wants every operand stride to be a multiple of 16 bytes. The model's
    # widths are, but small test shapes are not: zero-pad K and N (exact, and differentiable).
    align = 16 // x.element_size()
    k, n = w.shape[1], w.shape[2]
    pad_k, pad_n = -k % align, -n % align
    if pad_k or pad_n:
        x = F.pad(x, (0, pad_k))
        w = F.pad(w, (0, pad_n, 0, pad_k))
    y = _ContiguousGrad.apply(torch._grouped_mm(x, w, offs=offsets))
    return y[:, :n] if pad_n else y


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown grouped GEMM backend {backend!r}; choose one of {BACKENDS}")


def _check_grouped_mm_args(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, gather_idx: torch.Tensor | None
) -> None:
    if w.dim() != 3:
        raise ValueError(f"w must be [E, K, N], got shape {tuple(w.shape)}")
    num_experts, k, _ = w.shape
    if num_experts == 0:
        raise ValueError("w must hold at least one expert, got E = 0")
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [T, K] with K = {k} (from w), got shape {tuple(x.shape)}")
    if x.dtype != w.dtype or x.dtype not in _DTYPES:
        raise TypeError(
            f"x and w must share one dtype among {_DTYPES}, got x {x.dtype} and w {w.dtype}"
        )
    if offsets.shape != (num_experts,) or offsets.dtype != torch.int32:
        raise ValueError(
            f"offsets must be int32 [E] with E = {num_experts} (from w), "
            f"got {offsets.dtype} {tuple(offsets.shape)}"
        )
    if gather_idx is not None and (
        gather_idx.dim() != 1 or gather_idx.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(
            f"gather_idx must be a 1-D int32/int64 tensor of row indices into x, "
            f"got {gather_idx.dtype} {tuple(gather_idx.shape)}"
        )
    for name, t in (("w", w), ("offsets", offsets), ("gather_idx", gather_idx)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def grouped_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    backend: str = "triton",
    gather_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-expert matmul over expert-sorted rows, differentiable in x and w.

    x: [T, K] rows sorted by expert, or, with gather_idx, any [N_tok, K] from which row i of the
    product reads x[gather_idx[i]] (gather_idx: [T] int32/int64). w: [E, K, N]. offsets: [E]
    int32 cumulative row counts. Returns [T, N] in x's dtype (fp32 accumulation).
    """
    _check_backend(backend)
    _check_grouped_mm_args(x, w, offsets, gather_idx)
    if backend == "triton":
        return grouped_mm_triton(x, w, offsets, gather_idx)
    if gather_idx is not None:
        x = x[gather_idx]  # only the Triton kernel fuses the gather into its loads
    if backend == "torch_grouped_mm":
        return _grouped_mm_torch(x, w, offsets)
    return grouped_mm_loop(x, w, offsets)


def swiglu_experts(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    offsets: torch.Tensor,
    backend: str = "triton",
    gather_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """SwiGLU expert FFN: down(silu(x @ gate) * (x @ up)) with each row's own expert.

    x: [T, D] rows sorted by expert (or [N_tok, D] read through gather_idx, as in `grouped_mm`);
    w_gate, w_up: [E, D, H]; w_down: [E, H, D]; offsets: [E] int32. Returns [T, D], sorted by
    expert: un-permuting and weighting by router scores is the caller's.
    """
    _check_backend(backend)
    _check_grouped_mm_args(x, w_gate, offsets, gather_idx)
    e, d, h = w_gate.shape
    if w_up.shape != w_gate.shape:
        raise ValueError(
            f"w_up must be [E, D, H] = {(e, d, h)} (from w_gate), got {tuple(w_up.shape)}"
        )
    if w_down.shape != (e, h, d):
        raise ValueError(
            f"w_down must be [E, H, D] = {(e, h, d)} (from w_gate), got {tuple(w_down.shape)}"
        )
    if gather_idx is not None and backend != "triton":
        # Gather once for both projections instead of once per grouped_mm call.
        x, gather_idx = x[gather_idx], None
    gate = grouped_mm(x, w_gate, offsets, backend, gather_idx)
    up = grouped_mm(x, w_up, offsets, backend, gather_idx)
    return grouped_mm(F.silu(gate) * up, w_down, offsets, backend)
