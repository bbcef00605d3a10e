"""Expert engine: grouped GEMM over expert-sorted rows, and the SwiGLU expert FFN built on it.

Rows are sorted by expert: expert e owns rows offsets[e-1]:offsets[e] (offsets: int32 cumulative
row counts, length E, offsets[-1] == number of rows; experts may be empty). The same engine runs
the fine-grained MoE FFN and the modality FFN (E=2, routing fixed by modality).

Backends, picked by name:
  "triton"            the kernels in grouped_gemm.py (autotuned, persistent, gather fused into
                      the loads, SwiGLU gate/up fused, split weight gradient): no host sync
                      (CUDA; CPU only under TRITON_INTERPRET=1, for correctness checks)
  "torch_grouped_mm"  torch._grouped_mm (CUDA and CPU)
  "loop"              one matmul per expert (reference.py; the correctness oracle)
  "auto"              triton where this GPU model's measured table says it beats
                      torch._grouped_mm for the shape, else torch_grouped_mm (policy.py)

The triton backend runs as `torch.library.triton_op`s (triton_ops.py: torch.compile traces into
the kernels); the others as torch.library custom ops (`unimm::grouped_mm`,
`unimm::grouped_mm_input_grad`, `unimm::grouped_mm_weight_grad`) with fake impls and registered
autograd: torch.compile(fullgraph=True) traces them by shape, never into a host read. Selective
activation checkpointing saves the forward ops (GROUPED_GEMM_OPS).

`offsets[-1] == rows` is the caller's contract and is not checked: checking it would need a host
sync, which the triton and torch_grouped_mm paths exist to avoid.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from . import policy, triton_ops
from .reference import grouped_mm_loop, grouped_mm_loop_weight_grad

BACKENDS = ("triton", "torch_grouped_mm", "loop")
"""The concrete backends; "auto" resolves to one of the first two."""
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _pad_cols(t: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = -t.shape[-1] % multiple
    return F.pad(t, (0, pad)) if pad else t


# torch._grouped_mm wants every operand stride to be a multiple of 16 bytes. The model's widths
# are, but small test shapes are not: zero-pad K and N (exact), slice the result back.
def _grouped_mm_torch(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    align = 16 // x.element_size()
    n = w.shape[2]
    x = _pad_cols(x, align)
    w = _pad_cols(F.pad(w, (0, 0, 0, x.shape[1] - w.shape[1])), align)
    return torch._grouped_mm(x, w, offs=offsets)[:, :n]


def _grouped_mm_torch_weight_grad(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    # dw[e] = x_e^T @ dy_e: torch._grouped_mm's 2d x 2d form, grouped along the shared T.
    align = 16 // x.element_size()
    k, n = x.shape[1], dy.shape[1]
    x, dy = _pad_cols(x, align), _pad_cols(dy, align)
    return torch._grouped_mm(x.t(), dy, offs=offsets)[:, :k, :n]


def _rows(x: torch.Tensor, gather_idx: torch.Tensor | None) -> torch.Tensor:
    return x if gather_idx is None else x[gather_idx]


# The torch_grouped_mm and loop backends run as torch.library custom ops: one opaque op for the
# forward and one for each gradient. torch.compile(fullgraph=True) traces them through their fake
# (shape-only) impls instead of into the loop backend's host read; selective activation
# checkpointing sees each GEMM as one op it can save (GROUPED_GEMM_OPS).


@torch.library.custom_op("unimm::grouped_mm", mutates_args=())
def _grouped_mm_op(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, gather_idx: torch.Tensor | None, backend: str
) -> torch.Tensor:
    x = _rows(x, gather_idx)  # only the Triton kernel fuses the gather into its loads
    if backend == "torch_grouped_mm":
        return _grouped_mm_torch(x, w, offsets).contiguous()
    return grouped_mm_loop(x, w, offsets)


@_grouped_mm_op.register_fake
def _(x, w, offsets, gather_idx, backend):
    rows = x.shape[0] if gather_idx is None else gather_idx.shape[0]
    return x.new_empty((rows, w.shape[2]))


@torch.library.custom_op("unimm::grouped_mm_input_grad", mutates_args=())
def _input_grad_op(
    dy: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, gather_idx: torch.Tensor | None,
    x_rows: int, backend: str,
) -> torch.Tensor:
    w_t = w.transpose(1, 2)
    if backend == "torch_grouped_mm":
        dx = _grouped_mm_torch(dy, w_t, offsets)
    else:
        dx = grouped_mm_loop(dy, w_t, offsets)
    if gather_idx is None:
        return dx.contiguous()
    # A token read by k rows gets k contributions: sum them in fp32.
    summed = torch.zeros((x_rows, dx.shape[1]), device=dx.device, dtype=torch.float32)
    return summed.index_add_(0, gather_idx, dx.float()).to(dy.dtype)


@_input_grad_op.register_fake
def _(dy, w, offsets, gather_idx, x_rows, backend):
    return dy.new_empty((x_rows, w.shape[1]))


@torch.library.custom_op("unimm::grouped_mm_weight_grad", mutates_args=())
def _weight_grad_op(
    x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, gather_idx: torch.Tensor | None, backend: str
) -> torch.Tensor:
    x = _rows(x, gather_idx)
    if backend == "torch_grouped_mm":
        return _grouped_mm_torch_weight_grad(x, dy, offsets).contiguous()
    return grouped_mm_loop_weight_grad(x, dy, offsets)


@_weight_grad_op.register_fake
def _(x, dy, offsets, gather_idx, backend):
    return x.new_empty((offsets.shape[0], x.shape[1], dy.shape[1]))


def _setup_context(ctx, inputs, output):
    x, w, offsets, gather_idx, backend = inputs
    ctx.save_for_backward(x, w, offsets, gather_idx)
    ctx.backend = backend


def _backward(ctx, dy):
    x, w, offsets, gather_idx = ctx.saved_tensors
    # contiguous: `y.sum().backward()` hands in an expanded (zero-stride) gradient.
    dy = dy.to(x.dtype).contiguous()
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = _input_grad_op(dy, w, offsets, gather_idx, x.shape[0], ctx.backend)
    if ctx.needs_input_grad[1]:
        dw = _weight_grad_op(x, dy, offsets, gather_idx, ctx.backend).to(w.dtype)
    return dx, dw, None, None, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)

GROUPED_GEMM_OPS = (
    torch.ops.unimm.grouped_mm.default,
    torch.ops.unimm.grouped_mm_input_grad.default,
    torch.ops.unimm.grouped_mm_weight_grad.default,
    *triton_ops.TRITON_FORWARD_OPS,
)
"""The engine's GEMM ops. Selective activation checkpointing saves the forward ops' outputs
(``unimm.titan.parallelize``); the gradient ops run in backward only."""


def _check_backend(backend: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown grouped GEMM backend {backend!r}; choose one of {('auto', *BACKENDS)}")


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
    rows = x.shape[0] if gather_idx is None else gather_idx.shape[0]
    if backend == "auto":
        backend = policy.resolve("grouped_mm", x, rows, w.shape[1], w.shape[2], w.shape[0])
    if backend == "triton":
        return triton_ops.grouped_mm(x, w, offsets, gather_idx)
    return _grouped_mm_op(x, w, offsets, gather_idx, backend)


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
    if backend == "auto":
        rows = x.shape[0] if gather_idx is None else gather_idx.shape[0]
        backend = policy.resolve("swiglu", x, rows, d, h, e)
    if backend == "triton":
        return triton_ops.swiglu(x, w_gate, w_up, w_down, offsets, gather_idx, fuse_gate_up=_FUSE_GATE_UP[0])
    if gather_idx is not None:
        # Gather once for both projections instead of once per grouped_mm call.
        x, gather_idx = x[gather_idx], None
    gate = grouped_mm(x, w_gate, offsets, backend, gather_idx)
    up = grouped_mm(x, w_up, offsets, backend, gather_idx)
    return grouped_mm(F.silu(gate) * up, w_down, offsets, backend)


# The triton backend's SwiGLU runs gate and up as one fused kernel; benchmarks switch it off to
# compare (`unfused_gate_up`).
_FUSE_GATE_UP = [True]


class unfused_gate_up:
    """Context manager: the triton backend's SwiGLU runs gate and up as two grouped GEMMs."""

    def __enter__(self):
        self.saved, _FUSE_GATE_UP[0] = _FUSE_GATE_UP[0], False
        return self

    def __exit__(self, *exc):
        _FUSE_GATE_UP[0] = self.saved


def measure_backends(key: policy.ShapeKey, iters: int = 5, warmup: int = 2) -> dict:
    """fwd+bwd median ms of triton and torch_grouped_mm at `key`'s shape on the current GPU,
    on synthetic balanced routing (rows = the key's bucket): policy's opt-in first-use benchmark."""
    device, dtype = torch.device("cuda"), getattr(torch, key.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    rows, e = key.bucket, key.experts
    offsets = (torch.arange(1, e + 1, device=device) * rows // e).to(torch.int32)

    def param(*shape, fan_in=1):
        return (torch.randn(shape, device=device, generator=gen) / fan_in**0.5).to(dtype).requires_grad_()

    x = param(rows, key.k)
    if key.op == "swiglu":
        tensors = [x, param(e, key.k, key.n, fan_in=key.k), param(e, key.k, key.n, fan_in=key.k),
                   param(e, key.n, key.k, fan_in=key.n)]
    else:
        tensors = [x, param(e, key.k, key.n, fan_in=key.k)]
    result = {}
    for backend in ("triton", "torch_grouped_mm"):
        def step():
            if key.op == "swiglu":
                y = swiglu_experts(*tensors, offsets, backend=backend)
            else:
                y = grouped_mm(*tensors, offsets, backend)
            y.backward(torch.ones_like(y))
            for t in tensors:
                t.grad = None

        times = []
        for i in range(warmup + iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
        result[f"{backend}_ms"] = statistics.median(times)
    return result


policy.set_benchmark(measure_backends)
