"""The expert engine's three grouped GEMM backends agree, in outputs and in every gradient.

Every backend is checked against the reference loop run in float64 on the same inputs. The Triton
backend runs CPU tensors only in Triton's interpreter, which must be switched on
(TRITON_INTERPRET=1) before triton is first imported; in a whole-suite pytest process other test
files import triton (torchtitan does) without it. So the triton cases run in
`test_triton_backend_in_interpreter`: a child pytest process on this file with the variable set.
The interpreter is ~3000x slower than torch: shapes stay tiny.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from unimm.kernels import BACKENDS, grouped_gemm, grouped_mm, swiglu_experts
from unimm.kernels.reference import grouped_mm_loop

INTERPRETED = grouped_gemm.INTERPRETED

# Triton cases exist only where its kernels are interpreted (the child process); their ids name the
# backend, so the child selects them with -k triton.
IN_PROCESS_BACKENDS = BACKENDS if INTERPRETED else tuple(b for b in BACKENDS if b != "triton")
backends = pytest.mark.parametrize("backend", IN_PROCESS_BACKENDS)
dtypes = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])

# Max error relative to the reference's largest magnitude (at least 1).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _offsets(counts: list[int]) -> torch.Tensor:
    return torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    if expected.numel() == 0:
        return
    err = (actual.double() - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1.0)
    assert err <= TOLERANCE[dtype] * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def _oracle(x, w, offsets, gather_idx):
    return grouped_mm_loop(x if gather_idx is None else x[gather_idx], w, offsets)


def _leaves(*tensors: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    return [t.to(dtype).detach().requires_grad_() for t in tensors]


def _check_grouped_mm(backend, dtype, counts, k, n, num_tokens=None, w_as_nk=False, seed=0):
    """grouped_mm(backend, dtype) vs the float64 loop: y, dx and dw.

    With num_tokens, x holds num_tokens rows and the GEMM reads them through a random gather_idx
    (tokens repeat, as under top-k routing); otherwise x is already sorted by expert. With
    w_as_nk, the weight is stored [E, N, K] and passed as its transposed view (torchtitan's layout).
    """
    gen = torch.Generator().manual_seed(seed)
    offsets = _offsets(counts)
    rows = sum(counts)
    gather_idx = None
    if num_tokens is not None:
        gather_idx = torch.randint(0, num_tokens, (rows,), generator=gen)
    x0 = torch.randn(num_tokens if num_tokens is not None else rows, k, generator=gen)
    w_shape = (len(counts), n, k) if w_as_nk else (len(counts), k, n)
    w0 = torch.randn(w_shape, generator=gen) / k**0.5
    dy = torch.randn(rows, n, generator=gen).to(dtype)

    def as_kn(w):
        return w.transpose(1, 2) if w_as_nk else w

    x, w = _leaves(x0, w0, dtype=dtype)
    y = grouped_mm(x, as_kn(w), offsets, backend, gather_idx)
    y.backward(dy)

    # The oracle starts from the same (possibly bf16-rounded) inputs, in float64.
    xr, wr = _leaves(x, w, dtype=torch.float64)
    yr = _oracle(xr, as_kn(wr), offsets, gather_idx)
    yr.backward(dy.double())

    _assert_close(y.detach(), yr.detach(), dtype, "y")
    _assert_close(x.grad, xr.grad, dtype, "dx")
    _assert_close(w.grad, wr.grad, dtype, "dw")


@backends
@dtypes
def test_ragged_with_empty_experts(backend, dtype):
    # 37 rows, 24 -> 40: none of them a multiple of the blocks; experts 1 and 3 are empty.
    _check_grouped_mm(backend, dtype, [5, 0, 20, 0, 12], k=24, n=40)


@backends
def test_single_token(backend):
    _check_grouped_mm(backend, torch.float32, [0, 1, 0], k=20, n=36)


@backends
def test_all_tokens_on_one_expert(backend):
    _check_grouped_mm(backend, torch.float32, [0, 0, 45, 0], k=48, n=33)


@backends
def test_no_tokens(backend):
    _check_grouped_mm(backend, torch.float32, [0, 0, 0], k=16, n=16)


@backends
def test_1008_experts_few_tokens(backend):
    counts = [0] * 1008
    for expert, count in ((3, 2), (500, 1), (1007, 3)):
        counts[expert] = count
    _check_grouped_mm(backend, torch.float32, counts, k=16, n=16)


@backends
@dtypes
def test_gather_fused(backend, dtype):
    # 37 routed rows read from 20 tokens, some tokens twice, some never.
    _check_grouped_mm(backend, dtype, [7, 0, 18, 12], k=24, n=40, num_tokens=20)


@backends
def test_transposed_weight_view(backend):
    _check_grouped_mm(backend, torch.float32, [9, 4, 0, 11], k=24, n=40, w_as_nk=True)


@backends
def test_hand_computed(backend):
    # Expert 0 owns row 0, expert 1 owns rows 1-2.
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], requires_grad=True)
    w = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]],
                      [[1.0, 1.0, 0.0], [0.0, 2.0, -1.0]]], requires_grad=True)
    y = grouped_mm(x, w, _offsets([1, 2]), backend)
    y.backward(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]))
    # y0 = [1, 2] @ w0; y1 = [3, 4] @ w1; y2 = [5, 6] @ w1
    assert y.tolist() == [[1.0, 2.0, 2.0], [3.0, 11.0, -4.0], [5.0, 17.0, -6.0]]
    # dx_i = dy_i @ w_e^T
    assert x.grad.tolist() == [[1.0, 0.0], [1.0, 2.0], [1.0, -1.0]]
    # dw0 = x0^T dy0; dw1 = [x1; x2]^T [dy1; dy2]
    assert w.grad.tolist() == [[[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]],
                               [[5.0, 3.0, 5.0], [6.0, 4.0, 6.0]]]


@backends
@dtypes
@pytest.mark.parametrize("gather", [False, True], ids=["sorted", "gather"])
def test_swiglu_experts(backend, dtype, gather):
    gen = torch.Generator().manual_seed(1)
    counts, d, h = [6, 0, 17, 7], 24, 40
    offsets = _offsets(counts)
    rows = sum(counts)
    gather_idx = torch.randint(0, 16, (rows,), generator=gen) if gather else None
    x0 = torch.randn(16 if gather else rows, d, generator=gen)
    gate0 = torch.randn(4, d, h, generator=gen) / d**0.5
    up0 = torch.randn(4, d, h, generator=gen) / d**0.5
    down0 = torch.randn(4, h, d, generator=gen) / h**0.5
    dy = torch.randn(rows, d, generator=gen).to(dtype)

    inputs = _leaves(x0, gate0, up0, down0, dtype=dtype)
    swiglu_experts(*inputs, offsets, backend=backend, gather_idx=gather_idx).backward(dy)
    ref_inputs = _leaves(*inputs, dtype=torch.float64)
    xr, gate, up, down = ref_inputs
    hidden = torch.nn.functional.silu(_oracle(xr, gate, offsets, gather_idx))
    hidden = hidden * _oracle(xr, up, offsets, gather_idx)
    _oracle(hidden, down, offsets, None).backward(dy.double())

    # The hidden activation is rounded to bf16 between the GEMMs, hence the tolerance in bf16.
    for name, t, r in zip(("x", "w_gate", "w_up", "w_down"), inputs, ref_inputs):
        _assert_close(t.grad, r.grad, dtype, f"d{name}")


# The loop oracle reads offsets on the host by design.
@pytest.mark.parametrize("backend", [b for b in IN_PROCESS_BACKENDS if b != "loop"])
def test_no_host_sync(backend, monkeypatch):
    def host_read(*args, **kwargs):
        raise AssertionError("grouped GEMM read a tensor back to the host")

    x = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(3, 16, 16, requires_grad=True)
    offsets = _offsets([3, 0, 7])
    for name in ("item", "tolist", "__bool__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    grouped_mm(x, w, offsets, backend).sum().backward()


def test_argument_errors():
    x, w, offsets = torch.randn(4, 8), torch.randn(2, 8, 6), _offsets([1, 3])
    with pytest.raises(ValueError, match="unknown grouped GEMM backend 'cutlass'"):
        grouped_mm(x, w, offsets, "cutlass")
    with pytest.raises(ValueError, match=r"x must be \[T, K\] with K = 8"):
        grouped_mm(torch.randn(4, 7), w, offsets, "loop")
    with pytest.raises(ValueError, match=r"w must be \[E, K, N\]"):
        grouped_mm(x, w[0], offsets, "loop")
    with pytest.raises(ValueError, match=r"offsets must be int32 \[E\] with E = 2"):
        grouped_mm(x, w, offsets.long(), "loop")
    with pytest.raises(TypeError, match="share one dtype"):
        grouped_mm(x, w.bfloat16(), offsets, "loop")
    with pytest.raises(ValueError, match=r"w_down must be \[E, H, D\] = \(2, 6, 8\)"):
        swiglu_experts(x, w, w, w, offsets, backend="loop")


@pytest.mark.skipif(INTERPRETED, reason="the interpreter runs CPU tensors")
def test_triton_on_cpu_without_interpreter_says_what_to_do():
    x, w, offsets = torch.randn(4, 8), torch.randn(2, 8, 6), _offsets([1, 3])
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        grouped_mm(x, w, offsets, "triton")


@pytest.mark.skipif(INTERPRETED, reason="already in the interpreter process")
def test_triton_backend_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # Only the parametrised triton cases: the two tests named *interpreter* are about this split.
    select = "triton and not interpreter"
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-k", select, "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
