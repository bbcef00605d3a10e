"""The expert engine's three grouped GEMM backends agree, in outputs and in every gradient.

Every backend is checked against the reference loop run in float64 on the same inputs. The Triton
backend runs CPU tensors only in Triton's interpreter, which must be switched on
(TRITON_INTERPRET=1) before triton is first imported; in a whole-suite pytest process other test
files import triton (torchtitan does) without it. So the triton cases run in
`test_triton_backend_in_interpreter`: a child pytest process on this file with the variable set.
The interpreter is ~3000x slower than torch: shapes stay tiny.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from unimm.kernels import BACKENDS, grouped_gemm, grouped_mm, launch, policy, swiglu_experts, unfused_gate_up
from unimm.kernels import weight_grad_split
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


# ----------------------------------------------------------------------------- production tiles
# The Triton kernels at the sm90 tile configs they are autotuned over (launch.CONFIGS), bf16
# operands as the GPU gets them (no upcasting; the interpreter's tl.dot widens bf16 exactly, as the
# tensor cores do). Shapes are multiples of the tiles' small sides so that each kernel runs several
# M-, N- and K-tiles per expert, with ragged and empty experts and the routing gather. The
# bf16 bound: 2e-2 of the largest value (a few roundings).
BF16_KERNEL_TOL = 2e-2
# 262 rows: 130 (two 128-row tiles, one partial), 0, 4 (a tile of 4 rows), 0, 128 (exactly one).
KERNEL_COUNTS = [130, 0, 4, 0, 128]


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1.0)).item()


def _routed_inputs(gen, num_tokens, d_in, shapes):
    rows = sum(KERNEL_COUNTS)
    gather_idx = torch.randint(0, num_tokens, (rows,), generator=gen)
    x = torch.randn(num_tokens, d_in, generator=gen)
    params = [torch.randn(s, generator=gen) / s[1] ** 0.5 for s in shapes]
    return _offsets(KERNEL_COUNTS), gather_idx, x, params


@pytest.mark.skipif(not INTERPRETED, reason="runs in the interpreter child process")
@pytest.mark.parametrize("index", range(len(launch.CONFIGS["mm"])))
def test_triton_grouped_mm_production_configs(index):
    mm, dw = launch.CONFIGS["mm"][index], launch.CONFIGS["dw"][index % len(launch.CONFIGS["dw"])]
    gen = torch.Generator().manual_seed(index)
    k, n = 128, 256
    offsets, gather_idx, x0, (w0,) = _routed_inputs(gen, 100, k, [(5, k, n)])
    dy = torch.randn(gather_idx.shape[0], n, generator=gen).bfloat16()
    x, w = _leaves(x0, w0, dtype=torch.bfloat16)
    with launch.force_configs(fwd=mm, dx=mm, dw=dw), weight_grad_split(1 + index % 2):
        y = grouped_mm(x, w, offsets, "triton", gather_idx)
        y.backward(dy)
    xr, wr = _leaves(x, w, dtype=torch.float64)
    yr = _oracle(xr, wr, offsets, gather_idx)
    yr.backward(dy.double())
    for name, a, b in (("y", y, yr), ("dx", x.grad, xr.grad), ("dw", w.grad, wr.grad)):
        assert a.dtype == torch.bfloat16
        assert _rel_err(a, b) <= BF16_KERNEL_TOL, (name, mm, _rel_err(a, b))
    assert (w.grad[[1, 3]] == 0).all(), "an empty expert's weight gradient is zero"


@pytest.mark.skipif(not INTERPRETED, reason="runs in the interpreter child process")
@pytest.mark.parametrize("index", range(len(launch.CONFIGS["gate_up"])))
def test_triton_fused_swiglu_production_configs(index):
    """The fused gate/up kernel and its backward (dual-input dX, dual-output dW, split or not)."""
    gate_up, mm = launch.CONFIGS["gate_up"][index], launch.CONFIGS["mm"][index]
    dual = launch.DUAL_DW_CONFIGS[index % len(launch.DUAL_DW_CONFIGS)]
    gen = torch.Generator().manual_seed(10 + index)
    d, h = 128, 128
    offsets, gather_idx, x0, params = _routed_inputs(gen, 100, d, [(5, d, h), (5, d, h), (5, h, d)])
    dy = torch.randn(gather_idx.shape[0], d, generator=gen).bfloat16()
    inputs = _leaves(x0, *params, dtype=torch.bfloat16)
    with launch.force_configs(gate_up=gate_up, fwd=mm, dx=mm, dw=dual, dw_dual=dual), weight_grad_split(2 ** index):
        y = swiglu_experts(*inputs, offsets, backend="triton", gather_idx=gather_idx)
        y.backward(dy)
    ref = _leaves(*inputs, dtype=torch.float64)
    xr, gate, up, down = ref
    hidden = torch.nn.functional.silu(_oracle(xr, gate, offsets, gather_idx)) * _oracle(xr, up, offsets, gather_idx)
    yr = _oracle(hidden, down, offsets, None)
    yr.backward(dy.double())
    assert _rel_err(y, yr) <= BF16_KERNEL_TOL
    for name, t, r in zip(("x", "w_gate", "w_up", "w_down"), inputs, ref):
        assert _rel_err(t.grad, r.grad) <= BF16_KERNEL_TOL, (name, gate_up, _rel_err(t.grad, r.grad))


@pytest.mark.skipif(not INTERPRETED, reason="runs in the interpreter child process")
def test_triton_fused_and_unfused_gate_up_agree_in_fp32():
    gen = torch.Generator().manual_seed(3)
    offsets, gather_idx = _offsets([9, 0, 20]), torch.randint(0, 12, (29,), generator=gen)
    x0 = torch.randn(12, 16, generator=gen)
    params = [torch.randn(3, 16, 16, generator=gen) / 4 for _ in range(3)]
    grads = []
    for fused in (True, False):
        inputs = _leaves(x0, *params, dtype=torch.float32)
        with unfused_gate_up() if not fused else weight_grad_split(0):
            swiglu_experts(*inputs, offsets, backend="triton", gather_idx=gather_idx).square().sum().backward()
        grads.append([t.grad for t in inputs])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not INTERPRETED, reason="runs in the interpreter child process")
def test_triton_weight_tma_reads_weights_through_descriptors():
    """With weight TMA the forward, the dual input grad (a K-major transposed view) and the fused
    gate/up read every weight tile through a tensor descriptor, and give bit for bit what the
    pointer loads give (same products, same order); without it no descriptor is made."""
    from triton.runtime import interpreter

    gen = torch.Generator().manual_seed(21)
    d, h = 128, 128
    offsets, gather_idx, x0, params = _routed_inputs(gen, 100, d, [(5, d, h), (5, d, h), (5, h, d)])
    dy = torch.randn(gather_idx.shape[0], d, generator=gen).bfloat16()
    builder = interpreter.InterpreterBuilder
    loads = []
    original = builder.create_descriptor_load

    def counting_load(self, desc, indices, *args):
        loads.append(tuple(desc.block_shape))
        return original(self, desc, indices, *args)

    results = {}
    for tma in (False, True):
        gate_up, mm = (c if not tma else launch.with_weight_tma((c,))[0]
                       for c in (launch.CONFIGS["gate_up"][2], launch.CONFIGS["mm"][2]))
        inputs = _leaves(x0, *params, dtype=torch.bfloat16)
        loads.clear()
        builder.create_descriptor_load = counting_load
        try:
            with launch.weight_tma("on"), launch.force_configs(gate_up=gate_up, fwd=mm, dx=mm):
                y = swiglu_experts(*inputs, offsets, backend="triton", gather_idx=gather_idx)
                y.backward(dy)
        finally:
            builder.create_descriptor_load = original
        results[tma] = [y.detach()] + [t.grad for t in inputs]
        # gate/up and forward: [1, BLOCK_K, BLOCK_N] tiles; the input grad's K-major view: [1, BLOCK_N, BLOCK_K]
        shapes = set(loads)
        assert shapes == ({(1, 64, 128), (1, 128, 64)} if tma else set()), shapes
    for name, a, b in zip(("y", "x", "w_gate", "w_up", "w_down"), results[True], results[False]):
        assert torch.equal(a, b), name


def test_weight_tma_layout_rule():
    """TMA needs a unit-stride axis among K and N and 16-byte aligned offset and outer strides."""
    w = torch.zeros(4, 64, 32, dtype=torch.bfloat16)
    assert launch.weight_layout(w) == (False, True)
    assert launch.weight_layout(w.transpose(1, 2)) == (True, True)  # the input grad's view
    assert launch.weight_layout(torch.zeros(4, 64, 4, dtype=torch.bfloat16)) == (False, False)  # rows of 8 bytes
    assert launch.weight_layout(torch.zeros(4 * 64 * 32 + 3, dtype=torch.bfloat16)[3:].view(4, 64, 32))[1] is False
    assert launch.weight_layout(w[1:3]) == (False, True)  # an expert-parallel slice stays aligned
    assert launch.weight_layout(w[:, :, ::2])[1] is False  # no unit stride
    with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
        with launch.weight_tma("always"):
            pass


def test_weight_grad_split_rule():
    # Plenty of (expert, tile) programs: no split. Few programs and many rows: split, a power of two,
    # within the fp32 buffer cap.
    assert launch.choose_split(262144, 256, 2048, 512, sms=132) == 1
    split = launch.choose_split(16384, 2, 512, 512, sms=132)
    assert split > 1 and split & (split - 1) == 0 and split <= 8
    assert launch.choose_split(64, 2, 512, 512, sms=132) == 1  # too few rows to share
    huge = launch.choose_split(1 << 20, 1, 8192, 16384, sms=132)
    assert huge * 4 * 8192 * 16384 <= launch.SPLIT_BUFFER_BYTES


# ----------------------------------------------------------------------------- auto policy


def _fake_table(folder, device="Fake GPU 9000", entries=()):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{policy.gpu_slug(device)}.json"
    path.write_text(json.dumps({"device": device, "entries": list(entries)}))
    return path


@pytest.fixture
def table_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(policy, "TABLE_DIR", tmp_path / "tables")
    monkeypatch.delenv(policy.BENCHMARK_ENV, raising=False)
    policy.clear_cache()
    yield tmp_path / "tables"
    policy.clear_cache()


def test_auto_policy_follows_the_measured_table(table_dir, caplog):
    fast = policy.ShapeKey("swiglu", 262144, 2048, 512, 256, "bfloat16")
    slow = policy.ShapeKey("swiglu", 16384, 2048, 8192, 2, "bfloat16")
    _fake_table(table_dir, entries=[
        {"key": fast.id(), "triton_ms": 9.0, "torch_grouped_mm_ms": 11.0},
        {"key": slow.id(), "triton_ms": 12.0, "torch_grouped_mm_ms": 11.0},
    ])
    assert policy.gpu_slug("NVIDIA H200") == "nvidia-h200"
    with caplog.at_level("INFO", logger="unimm.kernels"):
        assert policy.decide(fast, "Fake GPU 9000") == "triton"
        # rows in the same power-of-two bucket share the entry; the decision is logged once
        assert policy.decide(policy.ShapeKey("swiglu", 200000, 2048, 512, 256, "bfloat16"), "Fake GPU 9000") == "triton"
        assert policy.decide(slow, "Fake GPU 9000") == "torch_grouped_mm"
        # unmeasured shape, other dtype, or a GPU without a table: never Triton
        assert policy.decide(policy.ShapeKey("swiglu", 262144, 2048, 512, 128, "bfloat16"), "Fake GPU 9000") == "torch_grouped_mm"
        assert policy.decide(policy.ShapeKey("swiglu", 262144, 2048, 512, 256, "float32"), "Fake GPU 9000") == "torch_grouped_mm"
        assert policy.decide(fast, "Other GPU") == "torch_grouped_mm"
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 5 and sum(fast.id() in m and "Fake GPU 9000" in m for m in logged) == 1
    assert "-> triton" in logged[0] and "table" in logged[0]


def test_auto_policy_benchmark_at_first_use_is_opt_in_and_cached(table_dir, monkeypatch):
    key = policy.ShapeKey("grouped_mm", 4096, 256, 256, 8, "bfloat16")
    calls = []

    def fake_measure(k):
        calls.append(k.id())
        return {"triton_ms": 1.0, "torch_grouped_mm_ms": 2.0}

    monkeypatch.setattr(policy, "_measure", [fake_measure])
    assert policy.decide(key, "Fake GPU 9000") == "torch_grouped_mm"  # not opted in
    policy.clear_cache()
    monkeypatch.setenv(policy.BENCHMARK_ENV, "1")
    assert policy.decide(key, "Fake GPU 9000") == "triton"
    assert policy.decide(key, "Fake GPU 9000") == "triton"
    assert calls == [key.id()]


def test_auto_policy_rejects_a_malformed_table(table_dir):
    path = _fake_table(table_dir, entries=[{"key": "swiglu/m1/k1/n1/e1/bfloat16", "triton_ms": 1.0}])
    with pytest.raises(ValueError, match=f"{path.name}.*torch_grouped_mm_ms"):
        policy.decide(policy.ShapeKey("swiglu", 1, 1, 1, 1, "bfloat16"), "Fake GPU 9000")


def test_auto_backend_off_cuda_is_torch_grouped_mm():
    x, w, offsets = torch.randn(4, 8), torch.randn(2, 8, 6), _offsets([1, 3])
    assert policy.resolve("grouped_mm", x, 4, 8, 6, 2) == "torch_grouped_mm"
    torch.testing.assert_close(grouped_mm(x, w, offsets, "auto"), grouped_mm(x, w, offsets, "torch_grouped_mm"))


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
