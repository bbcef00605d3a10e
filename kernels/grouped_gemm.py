"""Triton grouped GEMM for the expert engine, forward and backward.

Rows are sorted by expert: expert e owns rows offsets[e-1]:offsets[e] of x (offsets is the int32
cumulative row count, length E, last entry T; experts may be empty). Per expert:

    forward        y_e   = x_e @ w[e]            (_grouped_mm_kernel)
    input grad     dx_e  = dy_e @ w[e]^T         (_grouped_mm_kernel on a transposed view of w)
    weight grad    dw[e] = x_e^T @ dy_e          (_weight_grad_kernel)

Schedule. The row-tiled kernel runs one program per (M-tile of one expert, N-tile). Which expert an
M-tile belongs to is computed on the device (`_tile_table`), and the grid is a static upper bound
on the number of M-tiles (each non-empty expert leaves at most one partial tile), so neither the
forward nor the backward reads anything back to the host: no `.item()`, no `.tolist()`. Surplus
programs find an empty row range and return at once. The weight-gradient kernel runs one program
per (expert, K-tile, N-tile) and loops over that expert's rows; an empty expert stores zeros.
Operands are loaded in their dtype and accumulated in fp32.

Autograd. These are plain functions; `unimm.kernels` registers the forward and both gradients
as `torch.library` custom ops (one opaque op each for torch.compile and for selective activation
checkpointing) and wires their autograd.

Fusion. With `gather_idx`, row i of the GEMM reads x[gather_idx[i]]: the router's token
permutation is folded into the loads of the forward and of the weight gradient, so the [T, K]
permuted copy of the activations (top-k times the layer input: 16x for the fine-grained layers) is
never materialised nor kept for backward. The input gradient of that GEMM is produced in sorted
order and summed back onto the tokens with one `index_add_` (in fp32, since a token receives k
contributions). The opposite permutation (scattering the down-projection back to tokens and
weighting by router scores) is left to the caller: fusing it needs atomic adds of k rows per token
into the output, which are non-deterministic, and the combine is a cheap elementwise op next to the
GEMMs.

CPU. Triton runs CPU tensors only in its interpreter, enabled by TRITON_INTERPRET=1 set before
`triton` is first imported (triton.language builds its own functions at import time; setting the
variable later leaves a half-interpreted, broken state). It is ~3000x slower than torch: for
correctness checks on tiny shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction


@triton.jit
def _grouped_mm_kernel(
    x_ptr, w_ptr, y_ptr, gather_ptr, tiles_ptr,
    num_tiles, N, K,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_ym, stride_yn,
    HAS_GATHER: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Tile table rows: expert, first row, end row (see _tile_table).
    expert = tl.load(tiles_ptr + pid_m)
    row_start = tl.load(tiles_ptr + num_tiles + pid_m)
    row_end = tl.load(tiles_ptr + 2 * num_tiles + pid_m)
    if row_start >= row_end:
        return

    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    if HAS_GATHER:
        src_rows = tl.load(gather_ptr + rows, mask=row_mask, other=0)
    else:
        src_rows = rows
    # int64 before the stride multiply: T*K and E*K*N can pass 2**31 at full scale.
    x_rows = x_ptr + src_rows.to(tl.int64)[:, None] * stride_xm
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w_cols = w_ptr + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        a = tl.load(x_rows + ks[None, :].to(tl.int64) * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_cols + ks[:, None].to(tl.int64) * stride_wk,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    y = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :].to(tl.int64) * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _weight_grad_kernel(
    x_ptr, dy_ptr, dw_ptr, gather_ptr, offsets_ptr,
    N, K,
    stride_xm, stride_xk, stride_dym, stride_dyn, stride_we, stride_wk, stride_wn,
    HAS_GATHER: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_kn = tl.program_id(0)
    expert = tl.program_id(1)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    pid_k = pid_kn // num_n_tiles
    pid_n = pid_kn % num_n_tiles
    row_start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
    row_end = tl.load(offsets_ptr + expert)

    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = ks < K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        if HAS_GATHER:
            src_rows = tl.load(gather_ptr + rows, mask=row_mask, other=0)
        else:
            src_rows = rows
        # x_e^T tile [BLOCK_K, BLOCK_M], loaded transposed straight from row-major x.
        a = tl.load(x_ptr + src_rows.to(tl.int64)[None, :] * stride_xm
                    + ks[:, None].to(tl.int64) * stride_xk,
                    mask=k_mask[:, None] & row_mask[None, :], other=0.0)
        b = tl.load(dy_ptr + rows.to(tl.int64)[:, None] * stride_dym
                    + cols[None, :].to(tl.int64) * stride_dyn,
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    dw = (dw_ptr + expert.to(tl.int64) * stride_we + ks[:, None].to(tl.int64) * stride_wk
          + cols[None, :].to(tl.int64) * stride_wn)
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=k_mask[:, None] & col_mask[None, :])


# Whether triton.jit handed back interpreter functions (TRITON_INTERPRET=1 at import time).
INTERPRETED = not isinstance(_grouped_mm_kernel, JITFunction)


@dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _config(dtype: torch.dtype) -> _Config:
    if INTERPRETED:
        # The interpreter's cost is per block operation: few, small blocks (tl.dot needs >= 16).
        return _Config(block_m=16, block_n=32, block_k=32, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        # fp32 tiles are twice the bytes: halve K to keep three pipeline stages in shared memory.
        return _Config(block_m=64, block_n=128, block_k=32, num_warps=4, num_stages=3)
    return _Config(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3)


def _kernel_flags(dtype: torch.dtype) -> dict:
    # fp32 follows torch's own TF32 switch so the kernel matches torch.matmul on the same machine.
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    # The interpreter multiplies bf16 operands as their raw uint16 storage (triton 3.9); upcasting
    # first is exact (bf16 and fp16 widen losslessly to fp32) and costs nothing on the GPU path.
    return dict(UPCAST=INTERPRETED, PRECISION="tf32" if tf32 else "ieee")


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "grouped GEMM backend 'triton' got CPU tensors, but Triton runs on CPU only through "
            "its interpreter. Use backend='torch_grouped_mm' or backend='loop', or set "
            "TRITON_INTERPRET=1 before triton is first imported (correctness checks only: ~3000x "
            "slower than torch)."
        )


def _tile_table(offsets: torch.Tensor, num_rows: int, block_m: int) -> torch.Tensor:
    """Map each M-tile program to (expert, first row, end row), on the device.

    Returns int32 [3, max_tiles]. max_tiles is a host-side bound from shapes alone: expert e needs
    ceil(n_e / block_m) tiles, which sums to at most (T + G * (block_m - 1)) // block_m over the
    G <= min(E, T) non-empty experts. Tiles past the real count get an empty row range.
    """
    num_experts = offsets.shape[0]
    max_tiles = (num_rows + min(num_experts, num_rows) * (block_m - 1)) // block_m
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0, dtype=torch.int32)
    tile_ids = torch.arange(max_tiles, device=offsets.device, dtype=torch.int32)
    expert = torch.searchsorted(tile_end, tile_ids, right=True).clamp_(max=num_experts - 1)
    local_tile = tile_ids - (tile_end[expert] - tiles[expert])
    row_start = offsets[expert] - counts[expert] + local_tile * block_m
    row_end = torch.minimum(row_start + block_m, offsets[expert])
    row_end = torch.where(tile_ids < tile_end[-1], row_end, row_start)
    return torch.stack([expert.to(torch.int32), row_start, row_end])


def _row_tiled_mm(
    x: torch.Tensor, w: torch.Tensor, tiles: torch.Tensor, gather_idx: torch.Tensor | None,
    num_rows: int,
) -> torch.Tensor:
    """y[i] = x[gather_idx[i] if gather_idx is given else i] @ w[expert of row i]."""
    n, k = w.shape[2], w.shape[1]
    y = torch.empty((num_rows, n), device=x.device, dtype=x.dtype)
    num_tiles = tiles.shape[1]
    if num_tiles == 0 or n == 0:
        return y
    cfg = _config(x.dtype)
    grid = (num_tiles, triton.cdiv(n, cfg.block_n))
    _grouped_mm_kernel[grid](
        x, w, y, gather_idx if gather_idx is not None else tiles, tiles,
        num_tiles, n, k,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2), y.stride(0), y.stride(1),
        HAS_GATHER=gather_idx is not None, **_kernel_flags(x.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


def _weight_grad(
    x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, gather_idx: torch.Tensor | None,
    w_dtype: torch.dtype,
) -> torch.Tensor:
    """dw[e] = rows(x, e)^T @ dy[rows of e], zero for an empty expert."""
    num_experts, k, n = offsets.shape[0], x.shape[1], dy.shape[1]
    dw = torch.empty((num_experts, k, n), device=x.device, dtype=w_dtype)
    if dw.numel() == 0:
        return dw
    cfg = _config(x.dtype)
    grid = (triton.cdiv(k, cfg.block_k) * triton.cdiv(n, cfg.block_n), num_experts)
    _weight_grad_kernel[grid](
        x, dy, dw, gather_idx if gather_idx is not None else offsets, offsets,
        n, k,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2),
        HAS_GATHER=gather_idx is not None, **_kernel_flags(x.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dw


def triton_forward(
    x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, gather_idx: torch.Tensor | None
) -> torch.Tensor:
    """y[i] = rows(x)[i] @ w[expert of row i]. Arguments as in `unimm.kernels.grouped_mm`."""
    _check_device(x)
    num_rows = gather_idx.shape[0] if gather_idx is not None else x.shape[0]
    tiles = _tile_table(offsets, num_rows, _config(x.dtype).block_m)
    return _row_tiled_mm(x, w, tiles, gather_idx, num_rows)


def triton_input_grad(
    dy: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, gather_idx: torch.Tensor | None,
    x_rows: int,
) -> torch.Tensor:
    """dx of `triton_forward`: dy_e @ w[e]^T, summed back onto x's rows through gather_idx."""
    _check_device(dy)
    # Same rows and experts as the forward: the tile table is rebuilt on the device (E-sized
    # ops), so the forward keeps nothing but its inputs for backward.
    tiles = _tile_table(offsets, dy.shape[0], _config(dy.dtype).block_m)
    dx = _row_tiled_mm(dy, w.transpose(1, 2), tiles, None, dy.shape[0])
    if gather_idx is not None:
        summed = torch.zeros((x_rows, dx.shape[1]), device=dx.device, dtype=torch.float32)
        dx = summed.index_add_(0, gather_idx, dx.float()).to(dy.dtype)
    return dx


def triton_weight_grad(
    x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, gather_idx: torch.Tensor | None
) -> torch.Tensor:
    """dw of `triton_forward`: rows(x, e)^T @ dy_e per expert, zero for an empty expert."""
    _check_device(x)
    return _weight_grad(x, dy, offsets, gather_idx, x.dtype)
