"""Triton grouped GEMM kernels for the expert engine (the device code; launches in launch.py).

Rows are sorted by expert: expert e owns rows offsets[e-1]:offsets[e] of the row operand
(offsets: int32 cumulative row counts, length E, last entry R; experts may be empty).

  _grouped_mm_kernel   c_e = a_e @ b[e]  (+ a2_e @ b2[e] with DUAL)
                       forward y = x @ w[e]; input grad dy @ w[e]^T (b is a transposed view);
                       the fused gate/up input grad dh1 @ w1^T + dh3 @ w3^T (DUAL, one acc)
  _gate_up_kernel      h1 = x @ w1[e], h3 = x @ w3[e], h = silu(h1) * h3 from one read of the
                       token tile (SwiGLU's gate and up projections fused)
  _weight_grad_kernel  dw[e] = a_e^T @ b_e (and dw2[e] = a_e^T @ b2_e with DUAL: one read of
                       the token tile for both), split over the expert's rows (split-K)
  _swiglu_grad_kernel  dh1, dh3 from dh, h1, h3 (elementwise, fp32 math)
  _segment_sum_kernel  out[t] = sum of the rows that read token t (the gather's backward),
                       accumulated in fp32 in registers, in a fixed order (deterministic)

Schedule. Which expert an M-tile belongs to is found on the device, inside each program: every
program loads the E offsets once, counts each expert's tiles (ceil(n_e / BLOCK_M)) and their
running sum, and maps a tile to its expert with a vector compare. So the tile map follows the
autotuned BLOCK_M, and nothing is read back to the host (no `.item()`, no `.tolist()`). The
row-tiled kernels are persistent: a grid of at most PROGRAMS_PER_SM programs per multiprocessor
walks the real tiles (no empty programs for empty experts), in grouped order (GROUP_M M-tiles
share an N column band, so the expert's weight tile and the token tiles stay in L2).

Weight gradient: one program per (output tile, expert), experts launched largest first (a
device-side argsort of the row counts: longest-processing-time-first, so a hot expert under
skewed routing starts at once instead of last). Split-K: SPLIT programs share one output tile
of one expert, each summing a contiguous 1/SPLIT of the expert's rows into an fp32
[SPLIT, E, K, N] buffer that the host sums in a fixed order (deterministic, no atomics).
SPLIT = 1 writes dw in its dtype.

Operands are loaded in their dtype and multiplied with fp32 accumulation (tl.dot); outputs are
rounded once.

CPU. Triton runs CPU tensors only in its interpreter, enabled by TRITON_INTERPRET=1 set before
`triton` is first imported (triton.language builds its own functions at import time; setting the
variable later leaves a half-interpreted, broken state). It is ~3000x slower than torch: for
correctness checks on small shapes. The interpreter (triton 3.9) multiplies bf16 operands of
tl.dot as their raw uint16 storage and truncates fp32 -> bf16; `interpreter_compat.patch_interpreter` makes
it do what the GPU does (exact products, fp32 accumulation, round to nearest even), so the
kernels run their bf16 path unchanged there.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction


@triton.jit
def _expert_table(offsets_ptr, E, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per expert (vectors of BLOCK_E >= E): first row, end row, first tile, end tile."""
    e = tl.arange(0, BLOCK_E)
    ends = tl.load(offsets_ptr + e, mask=e < E, other=0)
    starts = tl.load(offsets_ptr + e - 1, mask=(e > 0) & (e < E), other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    return starts, ends, tile_end - tiles, tile_end


@triton.jit
def _locate(tile, starts, ends, first_tile, tile_end, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first row, end row) of M-tile `tile`: the one expert whose tile range holds it."""
    sel = (tile >= first_tile) & (tile < tile_end)
    expert = tl.sum(tl.where(sel, tl.arange(0, BLOCK_E), 0), 0)
    row_start = tl.sum(tl.where(sel, starts + (tile - first_tile) * BLOCK_M, 0), 0)
    row_end = tl.minimum(row_start + BLOCK_M, tl.sum(tl.where(sel, ends, 0), 0))
    return expert, row_start, row_end


@triton.jit
def _swizzle(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M consecutive M-tiles sweep the N-tiles together (L2 reuse)."""
    width = GROUP_M * num_n
    first_m = (tile // width) * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % width) % size, (tile % width) // size


@triton.jit
def _tile_rows(tile, num_m, num_n, starts, ends, first_tile, tile_end, gather_ptr, HAS_GATHER: tl.constexpr,
               BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Persistent tile `tile` of a row-tiled kernel, in grouped order: (expert, output rows, their
    mask, the rows of the token operand they read, first output column)."""
    pid_m, pid_n = _swizzle(tile, num_m, num_n, GROUP_M)
    expert, row_start, row_end = _locate(pid_m, starts, ends, first_tile, tile_end, BLOCK_E, BLOCK_M)
    rows = row_start + tl.arange(0, BLOCK_M)
    row_mask = rows < row_end
    if HAS_GATHER:
        src_rows = tl.load(gather_ptr + rows, mask=row_mask, other=0)
    else:
        src_rows = rows
    return expert, rows, row_mask, src_rows, pid_n * BLOCK_N


@triton.jit
def _weight_desc(b_ptr, E, K, N, stride_be, stride_bk, stride_bn,
                 K_MAJOR: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """A TMA descriptor over the expert weights b[E, K, N], whose unit-stride axis is N, or K with
    K_MAJOR (the input grad's transposed view of w). The copy engine then brings each weight tile
    into shared memory, bounds-checked and zero-filled by the hardware (no address arithmetic or
    masks in registers). Made once per program: the persistent loop reuses it."""
    if K_MAJOR:
        desc = tl.make_tensor_descriptor(b_ptr, shape=[E, N, K], strides=[stride_be, stride_bn, 1],
                                         block_shape=[1, BLOCK_N, BLOCK_K])
    else:
        desc = tl.make_tensor_descriptor(b_ptr, shape=[E, K, N], strides=[stride_be, stride_bk, 1],
                                         block_shape=[1, BLOCK_K, BLOCK_N])
    return desc


@triton.jit
def _weight_tile(b, expert, k0, n0, K, N, stride_be, stride_bk, stride_bn,
                 WEIGHT_TMA: tl.constexpr, K_MAJOR: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """b[expert, k0:k0+BLOCK_K, n0:n0+BLOCK_N] as a [BLOCK_K, BLOCK_N] tile, zeros outside; b is
    what _weight_operand gave (a descriptor with WEIGHT_TMA, else the pointer)."""
    if WEIGHT_TMA:
        if K_MAJOR:
            tile = tl.trans(b.load([expert, n0, k0]).reshape(BLOCK_N, BLOCK_K))
        else:
            tile = b.load([expert, k0, n0]).reshape(BLOCK_K, BLOCK_N)
    else:
        ks = k0 + tl.arange(0, BLOCK_K)
        cols = n0 + tl.arange(0, BLOCK_N)
        # int64 before the stride multiply: E*K*N passes 2**31 at full scale.
        ptrs = (b + expert.to(tl.int64) * stride_be + ks.to(tl.int64)[:, None] * stride_bk
                + cols.to(tl.int64)[None, :] * stride_bn)
        tile = tl.load(ptrs, mask=(ks < K)[:, None] & (cols < N)[None, :], other=0.0)
    return tile


@triton.jit
def _weight_operand(b_ptr, E, K, N, stride_be, stride_bk, stride_bn,
                    WEIGHT_TMA: tl.constexpr, K_MAJOR: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """What _weight_tile reads from: a TMA descriptor, or the pointer itself."""
    if WEIGHT_TMA:
        b = _weight_desc(b_ptr, E, K, N, stride_be, stride_bk, stride_bn, K_MAJOR, BLOCK_K, BLOCK_N)
    else:
        b = b_ptr
    return b


@triton.jit
def _row_tile_mma(a_ptr, b, src_rows, row_mask, expert, n0, K, N,
                  stride_am, stride_ak, stride_be, stride_bk, stride_bn, acc,
                  WEIGHT_TMA: tl.constexpr, K_MAJOR: tl.constexpr,
                  BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    # int64 before the stride multiply: R*K passes 2**31 at full scale.
    a_rows = a_ptr + src_rows.to(tl.int64)[:, None] * stride_am
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_rows + ks.to(tl.int64)[None, :] * stride_ak,
                    mask=row_mask[:, None] & (ks < K)[None, :], other=0.0)
        b_tile = _weight_tile(b, expert, k0, n0, K, N, stride_be, stride_bk, stride_bn,
                              WEIGHT_TMA, K_MAJOR, BLOCK_K, BLOCK_N)
        acc = tl.dot(a, b_tile, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _grouped_mm_kernel(
    a_ptr, b_ptr, a2_ptr, b2_ptr, c_ptr, gather_ptr, offsets_ptr,
    E, N, K, M_BUCKET,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
    HAS_GATHER: tl.constexpr, DUAL: tl.constexpr, K_MAJOR: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PROGRAMS_PER_SM: tl.constexpr, WEIGHT_TMA: tl.constexpr,
):
    # M_BUCKET (rows rounded up to a power of two) is an autotune key only.
    starts, ends, first_tile, tile_end = _expert_table(offsets_ptr, E, BLOCK_E, BLOCK_M)
    num_m = tl.sum(tile_end - first_tile, 0)
    num_n = tl.cdiv(N, BLOCK_N)
    b = _weight_operand(b_ptr, E, K, N, stride_be, stride_bk, stride_bn, WEIGHT_TMA, K_MAJOR, BLOCK_K, BLOCK_N)
    if DUAL:
        b2 = _weight_operand(b2_ptr, E, K, N, stride_be, stride_bk, stride_bn, WEIGHT_TMA, K_MAJOR, BLOCK_K, BLOCK_N)
    else:
        b2 = b
    for tile in range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
        expert, rows, row_mask, src_rows, n0 = _tile_rows(tile, num_m, num_n, starts, ends, first_tile, tile_end,
                                                          gather_ptr, HAS_GATHER, BLOCK_E, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _row_tile_mma(a_ptr, b, src_rows, row_mask, expert, n0, K, N,
                            stride_am, stride_ak, stride_be, stride_bk, stride_bn, acc,
                            WEIGHT_TMA, K_MAJOR, BLOCK_K, BLOCK_N, PRECISION)
        if DUAL:  # same strides as (a, b): the caller checks
            acc = _row_tile_mma(a2_ptr, b2, src_rows, row_mask, expert, n0, K, N,
                                stride_am, stride_ak, stride_be, stride_bk, stride_bn, acc,
                                WEIGHT_TMA, K_MAJOR, BLOCK_K, BLOCK_N, PRECISION)
        cols = n0 + tl.arange(0, BLOCK_N)
        c = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols.to(tl.int64)[None, :] * stride_cn
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & (cols < N)[None, :])


@triton.jit
def _gate_up_kernel(
    x_ptr, w1_ptr, w3_ptr, h_ptr, h1_ptr, h3_ptr, gather_ptr, offsets_ptr,
    E, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_we, stride_wk, stride_wn, stride_hm, stride_hn,
    HAS_GATHER: tl.constexpr, PRECISION: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr, WEIGHT_TMA: tl.constexpr,
):
    starts, ends, first_tile, tile_end = _expert_table(offsets_ptr, E, BLOCK_E, BLOCK_M)
    num_m = tl.sum(tile_end - first_tile, 0)
    num_n = tl.cdiv(N, BLOCK_N)
    w1 = _weight_operand(w1_ptr, E, K, N, stride_we, stride_wk, stride_wn, WEIGHT_TMA, False, BLOCK_K, BLOCK_N)
    w3 = _weight_operand(w3_ptr, E, K, N, stride_we, stride_wk, stride_wn, WEIGHT_TMA, False, BLOCK_K, BLOCK_N)
    for tile in range(tl.program_id(0), num_m * num_n, tl.num_programs(0)):
        expert, rows, row_mask, src_rows, n0 = _tile_rows(tile, num_m, num_n, starts, ends, first_tile, tile_end,
                                                          gather_ptr, HAS_GATHER, BLOCK_E, BLOCK_M, BLOCK_N, GROUP_M)
        x_rows = x_ptr + src_rows.to(tl.int64)[:, None] * stride_xm
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_rows + ks.to(tl.int64)[None, :] * stride_xk,
                        mask=row_mask[:, None] & (ks < K)[None, :], other=0.0)
            b1 = _weight_tile(w1, expert, k0, n0, K, N, stride_we, stride_wk, stride_wn,
                              WEIGHT_TMA, False, BLOCK_K, BLOCK_N)
            acc1 = tl.dot(a, b1, acc1, input_precision=PRECISION)
            b3 = _weight_tile(w3, expert, k0, n0, K, N, stride_we, stride_wk, stride_wn,
                              WEIGHT_TMA, False, BLOCK_K, BLOCK_N)
            acc3 = tl.dot(a, b3, acc3, input_precision=PRECISION)
        # h from the rounded h1, h3 (what is saved for backward), rounded once.
        h1 = acc1.to(h_ptr.dtype.element_ty)
        h3 = acc3.to(h_ptr.dtype.element_ty)
        g = h1.to(tl.float32)
        h = g * tl.sigmoid(g) * h3.to(tl.float32)
        cols = n0 + tl.arange(0, BLOCK_N)
        offs = rows.to(tl.int64)[:, None] * stride_hm + cols.to(tl.int64)[None, :] * stride_hn
        mask = row_mask[:, None] & (cols < N)[None, :]
        tl.store(h1_ptr + offs, h1, mask=mask)
        tl.store(h3_ptr + offs, h3, mask=mask)
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _weight_grad_kernel(
    a_ptr, b_ptr, b2_ptr, c_ptr, c2_ptr, gather_ptr, offsets_ptr, order_ptr,
    E, N, K, M_BUCKET,
    stride_am, stride_ak, stride_bm, stride_bn, stride_cs, stride_ce, stride_ck, stride_cn,
    HAS_GATHER: tl.constexpr, DUAL: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_k = tl.cdiv(K, BLOCK_K)
    num_n = tl.cdiv(N, BLOCK_N)
    # An expert's shares of one tile are neighbours in the launch order.
    pid_k, pid_n = _swizzle(tl.program_id(0) // SPLIT, num_k, num_n, GROUP_M)
    split = tl.program_id(0) % SPLIT
    # Experts in order of decreasing rows (order_ptr): the longest programs start first and the
    # short ones fill in behind them, so skewed routing leaves no long tail of one hot expert.
    expert = tl.load(order_ptr + tl.program_id(1))
    row_start = tl.load(offsets_ptr + expert - 1, mask=expert > 0, other=0)
    row_end = tl.load(offsets_ptr + expert)
    # This program's share of the expert's rows: a whole number of BLOCK_M rows.
    chunk = tl.cdiv(tl.cdiv(row_end - row_start, SPLIT), BLOCK_M) * BLOCK_M
    lo = row_start + split * chunk
    hi = tl.minimum(row_end, lo + chunk)

    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = ks < K
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < hi
        if HAS_GATHER:
            src_rows = tl.load(gather_ptr + rows, mask=row_mask, other=0)
        else:
            src_rows = rows
        # a_e^T tile [BLOCK_K, BLOCK_M], loaded transposed straight from row-major a.
        a = tl.load(a_ptr + src_rows.to(tl.int64)[None, :] * stride_am + ks.to(tl.int64)[:, None] * stride_ak,
                    mask=k_mask[:, None] & row_mask[None, :], other=0.0)
        b_offs = rows.to(tl.int64)[:, None] * stride_bm + cols.to(tl.int64)[None, :] * stride_bn
        b_mask = row_mask[:, None] & col_mask[None, :]
        acc = tl.dot(a, tl.load(b_ptr + b_offs, mask=b_mask, other=0.0), acc, input_precision=PRECISION)
        if DUAL:
            acc2 = tl.dot(a, tl.load(b2_ptr + b_offs, mask=b_mask, other=0.0), acc2, input_precision=PRECISION)

    # An empty share stores zeros: the buffer is never cleared beforehand.
    offs = (split.to(tl.int64) * stride_cs + expert.to(tl.int64) * stride_ce
            + ks.to(tl.int64)[:, None] * stride_ck + cols.to(tl.int64)[None, :] * stride_cn)
    mask = k_mask[:, None] & col_mask[None, :]
    tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)
    if DUAL:
        tl.store(c2_ptr + offs, acc2.to(c2_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_grad_kernel(dh_ptr, h1_ptr, h3_ptr, dh1_ptr, dh3_ptr, numel, BLOCK: tl.constexpr):
    """h = silu(h1) * h3: dh3 = dh * silu(h1), dh1 = dh * h3 * silu'(h1), in fp32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(h1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(h3_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(dh3_ptr + offs, (dh * g * s).to(dh3_ptr.dtype.element_ty), mask=mask)
    tl.store(dh1_ptr + offs, (dh * u * s * (1.0 + g * (1.0 - s))).to(dh1_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segment_sum_kernel(src_ptr, order_ptr, bounds_ptr, out_ptr, D, stride_src, stride_out,
                        BLOCK_D: tl.constexpr):
    """out[t] = sum over j in bounds[t]:bounds[t+1] of src[order[j]] (fp32 sum, fixed order)."""
    token = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    lo = tl.load(bounds_ptr + token)
    hi = tl.load(bounds_ptr + token + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in range(lo, hi):
        row = tl.load(order_ptr + j).to(tl.int64)
        acc += tl.load(src_ptr + row * stride_src + cols, mask=col_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


# Whether triton.jit handed back interpreter functions (TRITON_INTERPRET=1 at import time).
INTERPRETED = not isinstance(_grouped_mm_kernel, JITFunction)


if INTERPRETED:
    from .interpreter_compat import patch_interpreter

    patch_interpreter()
