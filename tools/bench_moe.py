"""Benchmark the expert engine: forward + backward of one SwiGLU expert layer, per backend.

The layer is `unimm.kernels.swiglu_experts` on tokens routed uniformly at random to top-k experts
and read through the routing permutation (`gather_idx`: the Triton backend fuses that gather, the
others materialise it, so its cost is part of what is compared). Un-permuting the output and
weighting by router scores is the same for every backend and is left out.

Two layers are run, with equal active FLOPs:
  fine-grained  the paper's MoE layer (granularity G = 4 * d_model / d_expert = 16 at the defaults):
                d_model 2048, d_expert 512, E 256, top-16, 16384 tokens;
  coarse        top-1 with d_expert = top_k * d_expert_fine (8192 = 4 * d_model at the defaults:
                G = 1) and E = E_fine / top_k (16), so total expert parameters match as well.
The shape flags set the fine-grained layer; the coarse one follows from it (--no-coarse drops it).

Times are medians over the timed steps. FLOPs: 3 GEMMs forward and 6 backward (input and weight
gradient of each), 2 * T * k * D * H each (T tokens, D d_model, H d_expert).
"vs dense" divides a dense matmul layer's time by the backend's time: the same SwiGLU (three
[T*k, D] x [D, H]-sized matmuls, forward and backward) with one weight set and plain torch.matmul,
timed in the same process. Peak memory is what one step allocates above what is allocated before
it: torch.cuda.max_memory_allocated on GPU; on CPU, torch's allocations as torch.profiler records
them, in a separate untimed step.

On CPU the defaults shrink (d_model 256, d_expert 64, E 64, top-16, 1024 tokens, fp32) and the
backends are torch_grouped_mm and loop, so a run takes well under a minute.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from unimm.kernels import BACKENDS, swiglu_experts

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Layer:
    name: str
    tokens: int
    d_model: int
    d_expert: int
    experts: int
    top_k: int

    @property
    def rows(self) -> int:
        return self.tokens * self.top_k

    @property
    def flops(self) -> float:
        """Forward + backward: 9 GEMMs of 2 * rows * d_model * d_expert FLOPs each."""
        return 9 * 2.0 * self.rows * self.d_model * self.d_expert


GPU_DEFAULT = Layer("fine-grained", tokens=16384, d_model=2048, d_expert=512, experts=256, top_k=16)
CPU_DEFAULT = Layer("fine-grained", tokens=1024, d_model=256, d_expert=64, experts=64, top_k=16)


def coarse_of(fine: Layer) -> Layer:
    """G = 1 layer with the same active FLOPs (and, when E divides, the same total parameters)."""
    return replace(
        fine, name="coarse", d_expert=fine.d_expert * fine.top_k, top_k=1,
        experts=max(1, fine.experts // fine.top_k),
    )


def route(layer: Layer, device: torch.device, gen: torch.Generator):
    """Uniform top-k routing: (gather_idx [rows], offsets [E] int32) for expert-sorted rows."""
    scores = torch.rand(layer.tokens, layer.experts, device=device, generator=gen)
    choice = scores.topk(layer.top_k, dim=1).indices.flatten()
    order = torch.argsort(choice, stable=True)
    counts = torch.bincount(choice, minlength=layer.experts)
    return order // layer.top_k, counts.cumsum(0).to(torch.int32)


def _params(shapes, fan_ins, device, dtype, gen):
    return [
        (torch.randn(s, device=device, generator=gen) / f**0.5).to(dtype).requires_grad_()
        for s, f in zip(shapes, fan_ins)
    ]


def expert_step(layer: Layer, backend: str, dtype, device, gen) -> Callable[[], None]:
    gather_idx, offsets = route(layer, device, gen)
    e, d, h = layer.experts, layer.d_model, layer.d_expert
    x, w_gate, w_up, w_down = _params(
        [(layer.tokens, d), (e, d, h), (e, d, h), (e, h, d)], [1, d, d, h], device, dtype, gen
    )
    dy = torch.randn(layer.rows, d, device=device, generator=gen).to(dtype)

    def step():
        y = swiglu_experts(x, w_gate, w_up, w_down, offsets, backend=backend, gather_idx=gather_idx)
        y.backward(dy)
        for p in (x, w_gate, w_up, w_down):
            p.grad = None  # so every step, and the memory probe, starts from the same state

    return step


def dense_step(layer: Layer, dtype, device, gen) -> Callable[[], None]:
    d, h = layer.d_model, layer.d_expert
    x, w_gate, w_up, w_down = _params(
        [(layer.rows, d), (d, h), (d, h), (h, d)], [1, d, d, h], device, dtype, gen
    )
    dy = torch.randn(layer.rows, d, device=device, generator=gen).to(dtype)

    def step():
        y = (F.silu(x @ w_gate) * (x @ w_up)) @ w_down
        y.backward(dy)
        for p in (x, w_gate, w_up, w_down):
            p.grad = None

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(step: Callable[[], None], iters: int, warmup: int, device: torch.device) -> float:
    """Median step time: robust to the odd step slowed by something else on the machine."""
    for _ in range(warmup):  # also compiles the Triton kernels
        step()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _cpu_peak_bytes(step: Callable[[], None]) -> int:
    """Peak of torch's CPU allocations during one step, from torch.profiler's memory events.

    torch keeps no CPU allocator statistics, and resident set size hides reuse inside malloc, so
    the net allocation of each op is accumulated in time order (workspace freed inside an op is
    not seen).
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def peak_mib(step: Callable[[], None], device: torch.device) -> float:
    """Memory one step allocates above what is allocated before it, in MiB."""
    gc.collect()
    if device.type != "cuda":
        return _cpu_peak_bytes(step) / 2**20
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def measure(name: str, layer: Layer, step: Callable[[], None], args, device) -> dict:
    ms = time_ms(step, args.iters, args.warmup, device)
    return dict(
        layer=layer.name, backend=name, ms=ms, tflops=layer.flops / (ms * 1e-3) / 1e12,
        peak_mib=peak_mib(step, device),
    )


def bench_layer(layer: Layer, args, device) -> list[dict]:
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device=device).manual_seed(0)
    dense = measure("dense matmul", layer, dense_step(layer, dtype, device, gen), args, device)
    rows = [dense]
    for backend in args.backends:
        step = expert_step(layer, backend, dtype, device, gen)
        rows.append(measure(backend, layer, step, args, device))
    for row in rows:
        row["vs_dense"] = dense["ms"] / row["ms"]
    return rows


def print_table(layers: list[Layer], rows: list[dict]) -> None:
    for layer in layers:
        print(f"{layer.name}: tokens {layer.tokens}, d_model {layer.d_model}, d_expert "
              f"{layer.d_expert}, E {layer.experts}, top-{layer.top_k}, "
              f"{layer.flops / 1e9:.1f} GFLOP per step")
    header = f"{'layer':<13} {'backend':<17} {'ms/step':>10} {'TFLOP/s':>9} {'vs dense':>9} " \
             f"{'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['layer']:<13} {r['backend']:<17} {r['ms']:>10.2f} {r['tflops']:>9.3f} "
              f"{r['vs_dense']:>9.2f} {r['peak_mib']:>9.0f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", nargs="+", choices=BACKENDS,
                   help="default: all three on GPU; torch_grouped_mm and loop on CPU")
    p.add_argument("--tokens", type=int, help="tokens before routing (GPU 16384, CPU 1024)")
    p.add_argument("--d-model", type=int, help="GPU 2048, CPU 256")
    p.add_argument("--d-expert", type=int, help="expert hidden width (GPU 512, CPU 64)")
    p.add_argument("--experts", type=int, help="total experts E (GPU 256, CPU 64)")
    p.add_argument("--top-k", type=int, help="experts per token (16)")
    p.add_argument("--no-coarse", action="store_true", help="skip the derived G=1 layer")
    p.add_argument("--dtype", choices=DTYPES, help="GPU bf16, CPU fp32")
    p.add_argument("--iters", type=int, help="timed steps (GPU 20, CPU 5)")
    # CPU timings settle only after a few steps: malloc hands fresh pages back and forth at first.
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        sys.exit("--device cuda given but torch sees no CUDA device")
    args.backends = args.backends or (list(BACKENDS) if on_gpu else ["torch_grouped_mm", "loop"])
    args.dtype = args.dtype or ("bf16" if on_gpu else "fp32")
    args.iters = args.iters or (20 if on_gpu else 5)
    fine = replace(
        GPU_DEFAULT if on_gpu else CPU_DEFAULT,
        **{field: value for field, value in (
            ("tokens", args.tokens), ("d_model", args.d_model), ("d_expert", args.d_expert),
            ("experts", args.experts), ("top_k", args.top_k)) if value is not None},
    )
    layers = [fine] if args.no_coarse else [fine, coarse_of(fine)]

    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print(f"device {name}, torch {torch.__version__}, {args.dtype}, {args.iters} timed steps")
    rows = [row for layer in layers for row in bench_layer(layer, args, device)]
    print_table(layers, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=name, torch=torch.__version__, dtype=args.dtype,
                           layers=[asdict(l) for l in layers], rows=rows), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
