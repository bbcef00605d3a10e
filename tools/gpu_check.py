"""One prepared GPU validation run: kernel parity and timing, FlexAttention with the hybrid mask,
and short training runs through the real trainer. Writes OUT/gpu_check.json and OUT/gpu_check.md.

    bash tools/gpu_check.sh OUT_DIR            # on one GPU (H200: under 8 minutes)
    bash tools/gpu_check.sh OUT_DIR --dry-run  # on CPU: tiny shapes, every code path

Every section runs in its own Python process under its own time budget (and never past the
global --timeout): a section that fails, crashes or runs out of time has its error recorded in
the JSON and the next section runs. Sections:

  kernel_parity   Triton grouped GEMM vs torch._grouped_mm in bf16 (unimm.kernels.swiglu_experts,
                  the custom ops the model runs): output and every gradient (x, w_gate, w_up,
                  w_down); error = max |triton - torch| / max |torch| per tensor, pass at
                  PARITY_TOL. Shapes: fine-grained G=16 (E 256, top-16, d_expert 512, d_model 2048,
                  16K tokens), E=1008, the modality FFN (E 2, d_expert 8192, routed by modality),
                  skewed routing with empty experts.
                  Each case runs the Triton variants: the default (gate/up fused in one kernel,
                  automatic weight-gradient split), gate/up as two GEMMs, and the weight gradient
                  split in 2 (deterministic fp32 partial sums), all against torch._grouped_mm.
  kernel_compile  torch.compile(fullgraph=True) of the Triton SwiGLU layer (triton_ops traced into
                  by Inductor) vs eager: gradients, and the first call's time.
  kernel_timing   forward+backward of the SwiGLU expert layer at every parity shape (uniform and
                  skewed routing): torch_grouped_mm, each Triton variant (and the weight gradient
                  unsplit), a dense SwiGLU of equal FLOPs (tools/bench_moe.py's); CUDA events,
                  warmup, median of N. Writes OUT/backend_table.json, the `auto` policy's table
                  (copy it to kernels/tables/<gpu-slug>.json to commit it), and OUT/tables/ for
                  the training sections below, whose `auto` then follows this GPU's measurement.
  attention       FlexAttention (compiled as torchtitan compiles it) with the packed hybrid mask
                  (unimm.masks, document/frame ids laid out as the packer lays them) vs pure
                  causal, and vs SDPA with the same mask as a dense boolean tensor; fwd+bwd.
  train_*         steps of dense_1b5, modality_ffn_2b3 (`unimm train`) and moe_e256 at a stated
                  shorter depth (unimm's worker entry point, tools/gpu_check_recipes.py), with
                  compile and the recipe's activation checkpointing; tokens/s, MFU, peak memory,
                  data wait and any perf/* keys from metrics.jsonl.

--dry-run (CPU): tiny shapes, TRITON_INTERPRET=1 for the Triton kernel, flex forward only (no
flex backward on CPU; the backward runs through SDPA), debug recipes for 2 steps with
`--compile.backend aot_eager`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"

PARITY_TOL = 2e-2
"""bf16 parity bound: max |triton - torch._grouped_mm| / max |torch._grouped_mm|, per tensor.
Both accumulate in fp32 and round to bf16 (unit roundoff 2^-8 = 3.9e-3); the SwiGLU's bf16
intermediate can differ by one rounding between the two, which the next GEMM propagates, so a
few roundings of the largest value are allowed, and nothing a wrong row or expert would give."""

SECTIONS = ("kernel_parity", "kernel_compile", "kernel_timing", "attention", "train_dense", "train_modality", "train_moe")
BUDGET_S = {  # per-section wall-clock budgets on the GPU (seconds); the global timeout caps them
    # kernel_parity autotunes every Triton kernel at each shape on first use (compiles included;
    # TRITON_CACHE_AUTOTUNING=1 lets the later sections reuse the choices)
    # (Inductor autotunes the compiled layer's Triton kernels again: kernel_compile gets a minute)
    # (weight TMA doubles the configs of three kernels and adds two variants: parity and timing
    # got 35 s more, taken from the others)
    "kernel_parity": 130, "kernel_compile": 55, "kernel_timing": 75, "attention": 40,
    "train_dense": 60, "train_modality": 60, "train_moe": 60,
}
DRY_BUDGET_S = {name: 300 for name in SECTIONS}
"""Dry run (CPU): a guard against hangs only; a busy 2-core machine needs minutes a section."""
CARRIED_DISTRIBUTIONS = ("torchtitan", "torchdata", "webdataset", "tyro", "datasets", "spmd_types", "torch_checkpointing")
"""Distributions the GPU image lacks (docs/benchmarks.md: carried as wheels); the report lists
their versions, or "missing"."""
MOE_SHORT_LAYERS = 4
"""moe_e256 at full depth (16 layers, ~13B expert parameters, with AdamW state) does not fit on
one GPU: the check trains it at this depth."""


# ----------------------------------------------------------------------------- helpers


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(step, iters: int, warmup: int, device) -> float:
    """Median of `iters` timed calls after `warmup` untimed ones; CUDA events on GPU."""
    import torch

    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_mib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _bench_moe():
    sys.path.insert(0, str(TOOLS))
    import bench_moe

    return bench_moe


# ----------------------------------------------------------------------------- kernels


def parity_shapes(dry: bool) -> list[dict]:
    """(name, tokens, d_model, d_expert, experts, top_k, routing) of each parity/timing case."""
    if dry:
        return [
            dict(name="fine_g16", tokens=32, d_model=32, d_expert=16, experts=8, top_k=2, routing="uniform"),
            dict(name="e1008", tokens=16, d_model=32, d_expert=16, experts=31, top_k=2, routing="uniform"),
            dict(name="modality_e2", tokens=32, d_model=32, d_expert=32, experts=2, top_k=1, routing="modality"),
            dict(name="skewed_empty", tokens=32, d_model=32, d_expert=16, experts=16, top_k=2, routing="skewed"),
        ]
    return [
        dict(name="fine_g16", tokens=16384, d_model=2048, d_expert=512, experts=256, top_k=16, routing="uniform"),
        dict(name="e1008", tokens=16384, d_model=2048, d_expert=512, experts=1008, top_k=16, routing="uniform"),
        dict(name="modality_e2", tokens=16384, d_model=2048, d_expert=8192, experts=2, top_k=1, routing="modality"),
        dict(name="skewed_empty", tokens=16384, d_model=2048, d_expert=512, experts=256, top_k=16, routing="skewed"),
    ]


def make_routing(shape: dict, device, gen):
    """(gather_idx, offsets int32 [E], empty experts) for expert-sorted rows.

    uniform: top-k of uniform scores; modality: each token to one of 2 experts by a modality
    flag (~half text); skewed: Zipf-like scores (expert e weighted 1/(e+1)^1.2) with the last
    eighth of the experts never chosen, so there are empty experts and hot ones."""
    import torch

    t, e, k = shape["tokens"], shape["experts"], shape["top_k"]
    if shape["routing"] == "modality":
        choice = (torch.rand(t, device=device, generator=gen) < 0.5).long()
    else:
        scores = torch.rand(t, e, device=device, generator=gen)
        if shape["routing"] == "skewed":
            weight = 1.0 / torch.arange(1, e + 1, device=device, dtype=torch.float32) ** 1.2
            weight[e - max(1, e // 8):] = 0.0  # empty experts
            scores = scores.log() / weight.clamp_min(1e-12)  # Gumbel-top-k style: larger weight wins more
            scores[:, weight == 0] = -float("inf")
        choice = scores.topk(k, dim=1).indices.flatten()
    order = torch.argsort(choice, stable=True)
    counts = torch.bincount(choice, minlength=e)
    return order // k, counts.cumsum(0).to(torch.int32), int((counts == 0).sum())


def _expert_tensors(shape: dict, device, dtype, gen):
    import torch

    e, d, h = shape["experts"], shape["d_model"], shape["d_expert"]
    specs = [((shape["tokens"], d), 1), ((e, d, h), d), ((e, d, h), d), ((e, h, d), h)]
    return [(torch.randn(s, device=device, generator=gen) / f**0.5).to(dtype) for s, f in specs]


def _rel(a, b) -> tuple[float, float]:
    diff = (a.float() - b.float()).abs().max().item()
    scale = b.float().abs().max().item()
    return diff, diff / scale if scale > 0 else diff


def _variant(name: str):
    """Context of one Triton variant: fused gate/up with the automatic weight-grad split and the
    autotuner choosing weight TMA or not (the default), weight TMA always / never, gate/up as two
    GEMMs, or the weight gradient split in 2 / not split."""
    import contextlib

    from unimm.kernels import launch, unfused_gate_up, weight_grad_split

    return {"triton": contextlib.nullcontext(), "triton_unfused_gate_up": unfused_gate_up(),
            "triton_tma": launch.weight_tma("on"), "triton_no_tma": launch.weight_tma("off"),
            "triton_split2": weight_grad_split(2), "triton_split1": weight_grad_split(1)}[name]


def _variants(shape: dict, dry: bool) -> list[str]:
    """The Triton variants run at `shape`. Dry run (the interpreter costs seconds a launch): every
    variant at the modality shape only. split2 on E=1008 would hold 2 x 2 fp32 [1008, 2048, 512]
    partial buffers (17 GB): left out."""
    if dry and shape["routing"] != "modality":
        return ["triton"]
    return (["triton", "triton_tma", "triton_no_tma", "triton_unfused_gate_up"]
            + (["triton_split2"] if shape["experts"] <= 256 else []))


E32_SHAPE = dict(name="e32", tokens=16384, d_model=2048, d_expert=512, experts=32, top_k=16, routing="uniform")
"""The sparsity sweep's densest point (moe_e32): against e1008 at equal active compute, the cost
of 31x more experts (target: E=1008 <= 1.2x E=32)."""


def timing_shapes(dry: bool) -> list[dict]:
    """Every parity shape and E=32 on the GPU; the dry run times the modality shape (the same
    code path, every variant, at the interpreter's cheapest shape)."""
    shapes = parity_shapes(dry)
    return [s for s in shapes if s["name"] == "modality_e2"] if dry else shapes + [E32_SHAPE]


def _swiglu_run(shape: dict, backend: str, base, offsets, gather_idx, dy):
    from unimm.kernels import swiglu_experts

    params = [p.detach().clone().requires_grad_() for p in base]
    with _variant(backend) if backend.startswith("triton") else _variant("triton"):
        y = swiglu_experts(*params, offsets, backend="triton" if backend.startswith("triton") else backend,
                           gather_idx=gather_idx)
        y.backward(dy)
    return [y.detach()] + [p.grad for p in params]


def section_kernel_parity(ctx: dict) -> dict:
    import torch

    device, dtype = ctx["device"], torch.bfloat16
    cases = []
    for shape in parity_shapes(ctx["dry"]):
        gen = torch.Generator(device=device).manual_seed(0)
        gather_idx, offsets, empty = make_routing(shape, device, gen)
        base = _expert_tensors(shape, device, dtype, gen)
        dy = torch.randn(gather_idx.shape[0], shape["d_model"], device=device, generator=gen).to(dtype)
        ref = _swiglu_run(shape, "torch_grouped_mm", base, offsets, gather_idx, dy)
        for variant in _variants(shape, ctx["dry"]):
            out = _swiglu_run(shape, variant, base, offsets, gather_idx, dy)
            errors = {}
            for name, a, b in zip(("y", "dx", "dw_gate", "dw_up", "dw_down"), out, ref):
                finite = bool(torch.isfinite(a).all())
                abs_err, rel_err = _rel(a, b)
                errors[name] = dict(max_abs=abs_err, max_rel=rel_err, finite=finite, passed=finite and rel_err <= PARITY_TOL)
            cases.append(dict(shape, variant=variant, rows=int(gather_idx.shape[0]), empty_experts=empty, errors=errors,
                              passed=all(v["passed"] for v in errors.values())))
            del out
        del ref
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return dict(dtype="bf16", tolerance=PARITY_TOL, tolerance_rule="max|triton-torch|/max|torch| per tensor",
                cases=cases, passed=all(c["passed"] for c in cases))


def section_kernel_compile(ctx: dict) -> dict:
    """torch.compile(fullgraph=True) of the Triton SwiGLU layer (its triton_ops traced into by
    Inductor) against the same layer eager: output and gradients. The dry run compiles with
    aot_eager and the torch_grouped_mm backend (interpreted kernels are not traceable)."""
    import torch

    from unimm.kernels import swiglu_experts

    device, dtype, dry = ctx["device"], torch.bfloat16, ctx["dry"]
    backend = "torch_grouped_mm" if dry else "triton"
    shape = parity_shapes(dry)[0]
    gen = torch.Generator(device=device).manual_seed(0)
    gather_idx, offsets, _ = make_routing(shape, device, gen)
    base = _expert_tensors(shape, device, dtype, gen)
    dy = torch.randn(gather_idx.shape[0], shape["d_model"], device=device, generator=gen).to(dtype)

    def layer(x, w1, w3, w2):
        return swiglu_experts(x, w1, w3, w2, offsets, backend=backend, gather_idx=gather_idx)

    compiled = torch.compile(layer, fullgraph=True, **({"backend": "aot_eager"} if dry else {}))
    results = []
    t0 = time.perf_counter()
    for fn in (layer, compiled):
        params = [p.detach().clone().requires_grad_() for p in base]
        fn(*params).backward(dy)
        results.append([p.grad for p in params])
        if fn is compiled:
            _sync(device)
            compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
    errors = {name: _rel(a, b)[1] for name, a, b in zip(("dx", "dw_gate", "dw_up", "dw_down"), *results)}
    # steady-state fwd+bwd, eager vs compiled: a compiled layer that copies its weights (a kernel
    # argument wrongly taken as mutated) shows here
    params = [p.detach().clone().requires_grad_() for p in base]
    times = {}
    for name, fn in (("eager_ms", layer), ("compiled_ms", compiled)):
        def step(fn=fn):
            fn(*params).backward(dy)
            for p in params:
                p.grad = None
        times[name] = median_ms(step, 1 if dry else 5, 0 if dry else 1, device)
    return dict(case=shape["name"], backend=backend, compiler="aot_eager (dry run)" if dry else "inductor",
                fullgraph=True, first_call_s=compile_s, max_rel=errors, passed=max(errors.values()) <= PARITY_TOL, **times)


def _timed_step(shape: dict, backend: str, dtype, device, gen):
    """fwd+bwd of the SwiGLU expert layer at `shape` with its routing (uniform or skewed)."""
    import torch

    from unimm.kernels import swiglu_experts

    gather_idx, offsets, _ = make_routing(shape, device, gen)
    params = [p.requires_grad_() for p in _expert_tensors(shape, device, dtype, gen)]
    dy = torch.randn(gather_idx.shape[0], shape["d_model"], device=device, generator=gen).to(dtype)
    concrete = "triton" if backend.startswith("triton") else backend

    def step():
        with _variant(backend) if backend.startswith("triton") else _variant("triton"):
            swiglu_experts(*params, offsets, backend=concrete, gather_idx=gather_idx).backward(dy)
        for p in params:
            p.grad = None

    return step


def backend_table(rows: list[dict], shapes: list[dict], env: dict) -> dict:
    """The `auto` policy's table (unimm.kernels.policy) from the timing rows: per shape key the
    default triton variant vs torch_grouped_mm; where two cases share a key (uniform and skewed
    routing) the one less favourable to Triton is kept."""
    from unimm.kernels.policy import ShapeKey

    entries = {}
    for shape in shapes:
        times = {r["backend"]: r["ms"] for r in rows if r["layer"] == shape["name"]}
        if "triton" not in times or "torch_grouped_mm" not in times:
            continue
        key = ShapeKey("swiglu", shape["tokens"] * shape["top_k"], shape["d_model"], shape["d_expert"],
                       shape["experts"], "bfloat16").id()
        entry = dict(key=key, triton_ms=times["triton"], torch_grouped_mm_ms=times["torch_grouped_mm"], case=shape["name"])
        old = entries.get(key)
        if old is None or entry["triton_ms"] / entry["torch_grouped_mm_ms"] > old["triton_ms"] / old["torch_grouped_mm_ms"]:
            entries[key] = entry
    return dict(device=env.get("device"), torch=env.get("torch"), triton=env.get("triton"), date=env.get("date"),
                command=env.get("command"), entries=list(entries.values()))


def section_kernel_timing(ctx: dict) -> dict:
    import torch

    from unimm.kernels.policy import gpu_slug

    bench = _bench_moe()
    device, dtype = ctx["device"], torch.bfloat16
    iters, warmup = (1, 0) if ctx["dry"] else (10, 3)
    rows = []
    shapes = timing_shapes(ctx["dry"])
    for shape in shapes:
        layer = bench.Layer(shape["name"], tokens=shape["tokens"], d_model=shape["d_model"],
                            d_expert=shape["d_expert"], experts=shape["experts"], top_k=shape["top_k"])
        gen = torch.Generator(device=device).manual_seed(0)
        steps = {"dense matmul": bench.dense_step(layer, dtype, device, gen)}
        for backend in ("torch_grouped_mm", *_variants(shape, ctx["dry"]), "triton_split1"):
            steps[backend] = _timed_step(shape, backend, dtype, device, gen)
        times = {}
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ms = median_ms(step, iters, warmup, device)
            times[name] = ms
            rows.append(dict(layer=layer.name, routing=shape["routing"], backend=name, ms=ms,
                             tflops=layer.flops / (ms * 1e-3) / 1e12, peak_mib=_peak_mib(device)))
        for row in rows:
            if row["layer"] == layer.name:
                row["vs_dense"] = times["dense matmul"] / row["ms"]
                row["vs_torch_grouped_mm"] = times["torch_grouped_mm"] / row["ms"]
        if shape["name"] == PROFILED_LAYER[ctx["dry"]]:
            profiles = {name: top_kernels(steps[name], device) for name in ("triton", "torch_grouped_mm")}
        del steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    env = json.loads((Path(ctx["out"]) / "environment.json").read_text())
    table = backend_table(rows, shapes, env)
    (Path(ctx["out"]) / "backend_table.json").write_text(json.dumps(table, indent=2))
    # where the training sections' `auto` reads it (UNIMM_KERNEL_TABLES)
    tables = Path(ctx["out"]) / "tables"
    tables.mkdir(exist_ok=True)
    (tables / f"{gpu_slug(str(env.get('device')))}.json").write_text(json.dumps(table, indent=2))
    from unimm.kernels import launch

    return dict(dtype="bf16", iters=iters, warmup=warmup, timer="cuda events" if device.type == "cuda" else "perf_counter",
                rows=rows, backend_table=table["entries"], tuned_configs=launch.tuned_configs(),
                profiled_layer=PROFILED_LAYER[ctx["dry"]], profiles=profiles)


PROFILED_LAYER = {False: "fine_g16", True: "modality_e2"}
"""The layer whose fwd+bwd is profiled (the fine-grained target's; the dry run's only timed one)."""


def top_kernels(step, device, top: int = 8) -> list[dict]:
    """One profiled call of `step`: the ops with the most self time on the device (CPU in a dry
    run), with their share of that time: what a missed kernel target is spent on."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()  # warm: autotuning and compiles stay out of the profile
    _sync(device)
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, attr) for e in events) or 1.0
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return [dict(name=e.key[:90], ms=getattr(e, attr) / 1e3, calls=e.count, share=getattr(e, attr) / total)
            for e in events[:top]]


# ----------------------------------------------------------------------------- attention


def packed_ids(batch: int, seq: int, frame_tokens: int, gen):
    """document_ids / frame_ids [B, L] as unimm.data.packer lays them out: documents packed
    back to back (id = index within the row; trailing padding gets id = number of documents),
    visual positions carry a frame index unique within the row, text -1. Documents: text
    (64..1024 positions), image-text (text + 1 frame), video (text + 2..8 frames)."""
    import torch

    doc = torch.empty(batch, seq, dtype=torch.long)
    frame = torch.full((batch, seq), -1, dtype=torch.long)
    for b in range(batch):
        pos, d, f = 0, 0, 0
        while pos < seq:
            kind = int(torch.randint(0, 3, (1,), generator=gen))
            text = int(torch.randint(16, 128 if kind else 1024, (1,), generator=gen))
            frames = 0 if kind == 0 else 1 if kind == 1 else int(torch.randint(2, 9, (1,), generator=gen))
            length = text + frames * frame_tokens
            if pos + length > seq:
                break
            doc[b, pos:pos + length] = d
            for i in range(frames):
                start = pos + text + i * frame_tokens
                frame[b, start:start + frame_tokens] = f
                f += 1
            pos += length
            d += 1
        doc[b, pos:] = d  # padding
    return doc, frame


def section_attention(ctx: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from unimm.masks import build_attention_mask

    device, dry = ctx["device"], ctx["dry"]
    batch, seq, heads, head_dim, frame_tokens = (1, 256, 2, 16, 16) if dry else (4, 4096, 16, 128, 256)
    iters, warmup = (2, 1) if dry else (10, 3)
    dtype = torch.float32 if dry else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    doc, frame = (t.to(device) for t in packed_ids(batch, seq, frame_tokens, gen))

    t0 = time.perf_counter()
    hybrid = build_attention_mask(doc, frame, "flex")
    _sync(device)
    mask_build_ms = (time.perf_counter() - t0) * 1e3
    causal = create_block_mask(lambda b, h, q, kv: kv <= q, None, None, seq, seq, device=device)
    dense = build_attention_mask(doc, frame, "sdpa")  # [B, 1, L, L] bool, same mask_mod

    # as torchtitan's FlexAttention compiles it (models/common/attention.py)
    # (dry run: the aot_eager backend, the same torch.compile path without inductor's CPU codegen)
    compiled_flex = torch.compile(flex_attention, **({"backend": "aot_eager"} if dry else {}))
    q, k, v = (torch.randn(batch, heads, seq, head_dim, device=device, dtype=dtype, generator=None).requires_grad_()
               for _ in range(3))
    do = torch.randn_like(q)
    flex_backward = device.type == "cuda"  # FlexAttention has no backward on CPU

    def flex_step(mask):
        def step():
            if flex_backward:
                out = compiled_flex(q, k, v, block_mask=mask)
                out.backward(do)
                q.grad = k.grad = v.grad = None
            else:
                compiled_flex(q.detach(), k.detach(), v.detach(), block_mask=mask)
        return step

    def sdpa_step():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        out.backward(do)
        q.grad = k.grad = v.grad = None

    timings = {}
    for name, step in (("flex_hybrid", flex_step(hybrid)), ("flex_causal", flex_step(causal)), ("sdpa_dense_hybrid", sdpa_step)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timings[name] = dict(ms=median_ms(step, iters, warmup, device), peak_mib=_peak_mib(device),
                             passes="fwd+bwd" if (name.startswith("sdpa") or flex_backward) else "fwd only (CPU)")

    with torch.no_grad():  # parity: flex with the block mask vs SDPA with the dense mask
        flex_out = compiled_flex(q.detach(), k.detach(), v.detach(), block_mask=hybrid)
        sdpa_out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    abs_err, rel_err = _rel(flex_out, sdpa_out)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    kept = dense.float().mean().item()
    return dict(
        batch=batch, seq=seq, heads=heads, head_dim=head_dim, dtype=str(dtype).replace("torch.", ""),
        frame_tokens=frame_tokens, documents_per_row=[int(doc[b].max()) for b in range(batch)],
        visual_fraction=float((frame >= 0).float().mean()), mask_density=kept,
        hybrid_block_sparsity=float(hybrid.sparsity()), causal_block_sparsity=float(causal.sparsity()),
        mask_build_ms=mask_build_ms, timings=timings,
        hybrid_vs_causal=timings["flex_causal"]["ms"] / timings["flex_hybrid"]["ms"],
        flex_vs_sdpa=timings["sdpa_dense_hybrid"]["ms"] / timings["flex_hybrid"]["ms"],
        parity=dict(max_abs=abs_err, max_rel=rel_err, tolerance=tol, passed=rel_err <= tol),
    )


# ----------------------------------------------------------------------------- training

METRIC_KEYS = ("tokens_per_s", "tokens_per_s_per_device", "mfu_pct", "tflops_per_device", "memory_gib",
               "step_time_s", "loss")


def summarize_metrics(path: Path) -> dict:
    """Last row and median over the logged steps after the first (compile) of every known key,
    every key naming memory, data wait or MFU, and every perf/* key; missing keys are skipped."""
    sys.path.insert(0, str(REPO))
    from unimm.titan.metrics_jsonl import read_metrics

    rows = read_metrics(path)
    if not rows:
        raise RuntimeError(f"no metrics rows in {path}")
    keys = set()
    for row in rows:
        for key, value in row.items():
            if key == "mfu_pct" or key.startswith("perf/"):
                keys.add(key)  # reported even when null (no peak FLOPs known on CPU)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            low = key.lower()
            if key in METRIC_KEYS or key.startswith(("perf/", "time_metrics/", "memory/max")) or any(
                w in low for w in ("mfu", "data_wait", "data_loading", "tokens_per_s", "throughput")
            ):
                keys.add(key)
    steady = rows[1:] or rows
    out = {"steps_logged": len(rows), "last_step": rows[-1]["step"]}
    for key in sorted(keys):
        values = [r[key] for r in steady if isinstance(r.get(key), (int, float))]
        out[key] = dict(last=rows[-1].get(key), median_after_first=None)
        if values:
            out[key] = dict(last=rows[-1].get(key), median_after_first=statistics.median(values))
    return out


def _procedural_shards(ctx: dict) -> Path:
    """Paper-width (SigLIP 2 So400m, 1152) procedural shards, once per check (GPU runs)."""
    sys.path.insert(0, str(TOOLS))
    import bench_loader
    from unimm.data_pipelines.write_shards import write_procedural
    from unimm.tokenizer import Tokenizer

    folder = Path(ctx["out"]) / "data" / "paper"
    if not (folder / "manifest.json").is_file():
        write_procedural(folder, {"text": 2048, "image_text": 256, "video": 32, "action": 64},
                         encoder=bench_loader._siglip_shaped_encoder(Path(ctx["out"]) / "data" / "siglip_shaped"),
                         tokenizer=Tokenizer.Config(), video_frames=8, samples_per_shard=64)
    return folder


def train_plan(section: str, ctx: dict) -> dict:
    """The command of one training section and what it runs (stated in the report)."""
    dry, out = ctx["dry"], Path(ctx["out"])
    run = out / "runs" / section
    steps = 2 if dry else 20
    if dry:
        data = ["--training.local_batch_size", "2",
                "--dataloader.num_images", "64", "--dataloader.num_videos", "16",
                "--dataloader.num_texts", "64", "--dataloader.num_actions", "16",
                "--dataloader.samples_per_shard", "32", "--dataloader.cache_dir", str(out / "data" / "procedural")]
        compile_args = ["--compile.enable", "--compile.backend", "aot_eager"]
    else:
        data = ["--dataloader.shards", "@SHARDS@"]
        compile_args = ["--compile.enable"]
    common = [*compile_args, *data, "--metrics.log_freq", "1", "--checkpoint.no-enable"]
    if section in ("train_dense", "train_modality"):
        recipe = {("train_dense", True): "debug_cpu", ("train_modality", True): "debug_cpu_modality",
                  ("train_dense", False): "dense_1b5", ("train_modality", False): "modality_ffn_2b3"}[section, dry]
        cmd = [sys.executable, "-m", "unimm.cli", "train", "--recipe", recipe, "--out", str(run),
               "--steps", str(steps), *common]
        depth = "recipe's full depth"
    else:
        recipe = "debug_cpu_moe_sized" if dry else "moe_e256_sized"
        layers = 2 if dry else MOE_SHORT_LAYERS
        # torchrun, one process, as `unimm train` starts it (unimm.titan.launch.torchrun_command)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
               "-m", "unimm.titan.train", "--module", "gpu_check_recipes", "--config", recipe,
               "--dump_folder", str(run), "--training.steps", str(steps), "--model_size.n_layers", str(layers),
               *common]
        depth = f"{layers} layers (shortened)"
    return dict(recipe=recipe, steps=steps, depth=depth, run=str(run), cmd=cmd,
                compile="aot_eager (dry run)" if dry else "inductor, per block",
                activation_checkpoint="recipe's (none)" if dry else "recipe's (selective)")


def section_train(section: str, ctx: dict) -> dict:
    plan = train_plan(section, ctx)
    cmd = plan["cmd"]
    if "@SHARDS@" in cmd:
        cmd = [str(_procedural_shards(ctx)) if a == "@SHARDS@" else a for a in cmd]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TOOLS), str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    tables = Path(ctx["out"]) / "tables"
    compiled = Path(ctx["out"]) / "sections" / "kernel_compile.json"
    compile_ok = compiled.is_file() and json.loads(compiled.read_text()).get("result", {}).get("passed", False)
    # `auto` follows the table kernel_timing measured on this GPU, once the compiled Triton layer
    # is known to work (the training steps are compiled); else auto stays on torch._grouped_mm
    if tables.is_dir() and compile_ok:
        env["UNIMM_KERNEL_TABLES"] = str(tables)
    plan["kernel_tables"] = str(tables) if "UNIMM_KERNEL_TABLES" in env else "none (auto = torch_grouped_mm)"
    log = Path(plan["run"] + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    result = dict({k: v for k, v in plan.items() if k != "cmd"}, command=shlex.join(cmd), rc=rc, wall_s=wall, log=str(log))
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"trainer exited {rc}; log tail:\n{tail}")
    result["metrics"] = summarize_metrics(Path(plan["run"]) / "metrics.jsonl")
    return result


# ----------------------------------------------------------------------------- runner

RUNNERS = {
    "kernel_parity": section_kernel_parity,
    "kernel_compile": section_kernel_compile,
    "kernel_timing": section_kernel_timing,
    "attention": section_attention,
    "train_dense": lambda ctx: section_train("train_dense", ctx),
    "train_modality": lambda ctx: section_train("train_modality", ctx),
    "train_moe": lambda ctx: section_train("train_moe", ctx),
}


def run_section_here(name: str, out: str, dry: bool, result_path: str, fail: bool) -> int:
    """Child process: run one section, write {status, result | error} to result_path."""
    t0 = time.perf_counter()
    try:
        import torch

        device = torch.device("cpu" if dry else "cuda")
        if not dry and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device (use --dry-run on CPU)")
        if fail:
            raise RuntimeError(f"injected failure in {name} (--fail-section)")
        result = RUNNERS[name](dict(device=device, dry=dry, out=out))
        record = dict(status="ok", result=result)
    except BaseException as err:  # noqa: BLE001  (record everything, the parent goes on)
        record = dict(status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-4000:])
    record["seconds"] = time.perf_counter() - t0
    Path(result_path).write_text(json.dumps(record, indent=2, default=str))
    return 0


def run_section(name: str, args, budget: float) -> dict:
    """Parent: the section in its own process, killed at its budget."""
    part = Path(args.out) / "sections" / f"{name}.json"
    part.parent.mkdir(parents=True, exist_ok=True)
    part.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"  # before triton is imported in the child
    cmd = [sys.executable, str(Path(__file__).resolve()), str(args.out), "--section", name, "--result", str(part)]
    cmd += ["--dry-run"] if args.dry_run else []
    cmd += ["--fail-section", name] if name in args.fail_section else []
    t0 = time.perf_counter()
    log = part.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the section's whole process group (trainer children too)
            proc.wait()
            return dict(status="timeout", error=f"ran past its budget of {budget:.0f} s", seconds=time.perf_counter() - t0,
                        budget_s=budget, log=str(log))
    if not part.is_file():
        tail = log.read_text(errors="replace")[-3000:]
        return dict(status="error", error=f"section process exited {proc.returncode} without a result; log tail:\n{tail}",
                    seconds=time.perf_counter() - t0, budget_s=budget, log=str(log))
    record = json.loads(part.read_text())
    record.update(budget_s=budget, log=str(log))
    return record


def environment(args, command: str) -> dict:
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=command, mode="dry-run (CPU)" if args.dry_run else "GPU", python=platform.python_version(),
                host=platform.node(), machine=platform.machine())
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        info["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception as err:  # noqa: BLE001
        info["torch"] = f"unavailable: {err}"
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as err:  # noqa: BLE001
        info["triton"] = f"unavailable: {err}"
    # what the training sections need beyond the GPU image (carried as wheels in .whl/)
    from importlib import metadata

    deps = {}
    for name in CARRIED_DISTRIBUTIONS:
        try:
            deps[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            deps[name] = "missing"
    info["carried"] = deps
    return info


def _ok_section(sections: dict, name: str) -> dict | None:
    section = sections.get(name, {})
    return section.get("result") if section.get("status") == "ok" else None


def _layer_ms(timing: dict, layer: str, backend: str) -> float | None:
    return next((r["ms"] for r in timing["rows"] if r["layer"] == layer and r["backend"] == backend), None)


def _median_mfu(train: dict | None) -> float | None:
    return ((train or {}).get("metrics", {}).get("perf/mfu") or {}).get("median_after_first")


def targets(sections: dict) -> list[dict]:
    """The issue's targets against this run's figures: measured, goal, whether met and by how
    much (margin: measured over goal, or goal over measured for an upper bound, minus 1; below 0
    is a miss by that fraction). A target whose section did not run is listed unmeasured."""
    timing = _ok_section(sections, "kernel_timing")
    attention = _ok_section(sections, "attention")
    fine = "fine_g16"

    def ratio(a, b):
        return a / b if a is not None and b else None

    def best(layer):  # what `auto` would run at this layer: the faster backend
        times = [_layer_ms(timing, layer, b) for b in ("triton", "torch_grouped_mm")] if timing else []
        times = [t for t in times if t is not None]
        return min(times) if times else None

    rows = [
        ("Triton fwd+bwd over torch._grouped_mm, fine-grained layer (speed-up)", ">=", 1.3,
         ratio(_layer_ms(timing, fine, "torch_grouped_mm"), _layer_ms(timing, fine, "triton")) if timing else None),
        ("Triton fwd+bwd vs a dense matmul of equal FLOPs, fine-grained layer (fraction of its speed)", ">=", 0.6,
         ratio(_layer_ms(timing, fine, "dense matmul"), _layer_ms(timing, fine, "triton")) if timing else None),
        ("Hybrid-mask FlexAttention time over pure causal (fwd+bwd)", "<=", 1.3,
         ratio(attention["timings"]["flex_hybrid"]["ms"], attention["timings"]["flex_causal"]["ms"]) if attention else None),
        ("Dense-mask SDPA time over hybrid-mask FlexAttention (speed-up)", ">=", 2.0,
         attention["flex_vs_sdpa"] if attention else None),
        ("MFU, dense_1b5", ">=", 0.45, _median_mfu(_ok_section(sections, "train_dense"))),
        ("MFU, modality_ffn_2b3", ">=", 0.45, _median_mfu(_ok_section(sections, "train_modality"))),
        ("MFU, moe_e256 (shortened depth)", ">=", 0.30, _median_mfu(_ok_section(sections, "train_moe"))),
        ("MoE layer time at E=1008 over E=32, equal active compute (faster backend each)", "<=", 1.2,
         ratio(best("e1008"), best("e32")) if timing else None),
    ]
    out = []
    for what, op, goal, measured in rows:
        if measured is None:
            out.append(dict(target=what, goal=f"{op} {goal}", measured=None, met=None, margin=None))
            continue
        margin = measured / goal - 1 if op == ">=" else goal / measured - 1
        out.append(dict(target=what, goal=f"{op} {goal}", measured=measured, met=margin >= 0, margin=margin))
    return out


def targets_table(sections: dict) -> list[str]:
    lines = ["", "## Targets (margin: how far past the goal, negative = missed by that much; where one is missed,",
             "the kernel profile below shows where the time goes)", "",
             "| target | goal | measured | met | margin |", "| --- | --- | --- | --- | --- |"]
    for t in targets(sections):
        margin = "not measured" if t["margin"] is None else f"{t['margin']:+.0%}"
        met = "-" if t["met"] is None else "yes" if t["met"] else "no"
        lines.append(f"| {t['target']} | {t['goal']} | {_fmt(t['measured'])} | {met} | {margin} |")
    return lines


def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["# GPU check", "", "| field | value |", "| --- | --- |"]
    for key in ("device", "torch", "triton", "cuda", "python", "carried", "date", "mode", "command", "total_s"):
        value = report.get(key, env.get(key))
        lines.append(f"| {key} | `{value}` |" if key == "command" else f"| {key} | {_fmt(value)} |")
    lines += ["", "## Sections", "", "| section | status | seconds | budget s | note |", "| --- | --- | --- | --- | --- |"]
    for name, rec in report["sections"].items():
        note = (rec.get("error") or "").splitlines()[0][:120] if rec.get("error") else ""
        lines.append(f"| {name} | {rec['status']} | {_fmt(rec.get('seconds'), '.1f')} | {_fmt(rec.get('budget_s'), '.0f')} | {note} |")
    sec = report["sections"]
    lines += targets_table(sec)
    if sec.get("kernel_parity", {}).get("status") == "ok":
        r = sec["kernel_parity"]["result"]
        lines += ["", f"## Kernel parity (bf16, triton vs torch._grouped_mm; pass: max rel <= {r['tolerance']})", "",
                  "| case | variant | tokens | d_model | d_expert | E | top-k | empty E | tensor | max abs | max rel | pass |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in r["cases"]:
            for t, e in c["errors"].items():
                lines.append(f"| {c['name']} | {c['variant']} | {c['tokens']} | {c['d_model']} | {c['d_expert']} | {c['experts']} "
                             f"| {c['top_k']} | {c['empty_experts']} | {t} | {_fmt(e['max_abs'])} | {_fmt(e['max_rel'])} | {e['passed']} |")
    if sec.get("kernel_compile", {}).get("status") == "ok":
        r = sec["kernel_compile"]["result"]
        errs = ", ".join(f"{k} {_fmt(v)}" for k, v in r["max_rel"].items())
        lines += ["", f"## Compiled SwiGLU layer ({r['backend']}, {r['compiler']}, fullgraph, {r['case']}): "
                  f"first call {_fmt(r['first_call_s'])} s; fwd+bwd eager {_fmt(r['eager_ms'])} ms, compiled "
                  f"{_fmt(r['compiled_ms'])} ms; max rel vs eager: {errs}; pass {r['passed']}"]
    if sec.get("kernel_timing", {}).get("status") == "ok":
        r = sec["kernel_timing"]["result"]
        lines += ["", f"## Kernel timing (fwd+bwd, median of {r['iters']}, {r['timer']})", "",
                  "| layer | routing | backend | ms | TFLOP/s | vs dense | vs torch_grouped_mm | peak MiB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in r["rows"]:
            lines.append(f"| {row['layer']} | {row['routing']} | {row['backend']} | {_fmt(row['ms'])} | {_fmt(row['tflops'])} "
                         f"| {_fmt(row.get('vs_dense'))} | {_fmt(row.get('vs_torch_grouped_mm'))} | {_fmt(row.get('peak_mib'), '.0f')} |")
        by_case = {(row["layer"], row["backend"]): row["ms"] for row in r["rows"]}
        ratios = [f"{b}: {_fmt(by_case[('e1008', b)] / by_case[('e32', b)])}x" for b in ("torch_grouped_mm", "triton")
                  if ("e1008", b) in by_case and ("e32", b) in by_case]
        if ratios:
            lines += ["", f"E=1008 over E=32 at equal active compute (target <= 1.2x): {', '.join(ratios)}"]
        lines += ["", "## Backend table (backend_table.json: `auto` picks triton where triton ms < torch ms)", "",
                  "| key | case | triton ms | torch_grouped_mm ms | auto |", "| --- | --- | --- | --- | --- |"]
        for e in r["backend_table"]:
            pick = "triton" if e["triton_ms"] < e["torch_grouped_mm_ms"] else "torch_grouped_mm"
            lines.append(f"| {e['key']} | {e['case']} | {_fmt(e['triton_ms'])} | {_fmt(e['torch_grouped_mm_ms'])} | {pick} |")
        lines += ["", "## Autotuned configs (kernel / weight-TMA setting: autotune key -> config)", "",
                  "| kernel | key | config |", "| --- | --- | --- |"]
        for kernel, chosen in r.get("tuned_configs", {}).items():
            for key, config in chosen.items():
                lines.append(f"| {kernel} | `{key}` | `{config}` |")
        for backend, kernels in r.get("profiles", {}).items():
            lines += ["", f"## Profile: {r['profiled_layer']} fwd+bwd, {backend} (ops by self time on the device)", "",
                      "| op | ms | calls | share |", "| --- | --- | --- | --- |"]
            for k in kernels:
                lines.append(f"| `{k['name']}` | {_fmt(k['ms'])} | {k['calls']} | {k['share']:.0%} |")
    if sec.get("attention", {}).get("status") == "ok":
        r = sec["attention"]["result"]
        lines += ["", f"## Attention (B {r['batch']}, seq {r['seq']}, {r['heads']} heads x {r['head_dim']}, {r['dtype']}; "
                  f"hybrid block sparsity {_fmt(r['hybrid_block_sparsity'])}%, mask build {_fmt(r['mask_build_ms'])} ms; "
                  f"flex vs SDPA max rel {_fmt(r['parity']['max_rel'])})", "",
                  "| kernel | ms | passes | peak MiB |", "| --- | --- | --- | --- |"]
        for name, t in r["timings"].items():
            lines.append(f"| {name} | {_fmt(t['ms'])} | {t['passes']} | {_fmt(t.get('peak_mib'), '.0f')} |")
    train = [(n, s) for n, s in sec.items() if n.startswith("train_") and s.get("status") == "ok"]
    if train:
        lines += ["", "## Training (metrics.jsonl: last / median after the first logged step)", "",
                  "| section | recipe | depth | steps | compile | AC | metric | last | median |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, s in train:
            r = s["result"]
            for key, v in r["metrics"].items():
                if isinstance(v, dict):
                    lines.append(f"| {name} | {r['recipe']} | {r['depth']} | {r['steps']} | {r['compile']} | {r['activation_checkpoint']} "
                                 f"| {key} | {_fmt(v['last'])} | {_fmt(v['median_after_first'])} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder: gpu_check.json, gpu_check.md, sections/, runs/, data/")
    p.add_argument("--dry-run", action="store_true", help="CPU: tiny shapes, TRITON_INTERPRET=1, debug recipes")
    p.add_argument("--timeout", type=float, help="global wall-clock limit in seconds (default 480; dry run 2400)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--fail-section", default="", help="test hook: make these sections (comma-separated) raise")
    p.add_argument("--section", help=argparse.SUPPRESS)  # child mode
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.timeout is None:
        args.timeout = 2400.0 if args.dry_run else 480.0
    args.fail_section = [s for s in args.fail_section.split(",") if s]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.section:
        return run_section_here(args.section, args.out, args.dry_run, args.result, args.section in args.fail_section)
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out.resolve())
    names = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        sys.exit(f"unknown sections {unknown}; choose from {SECTIONS}")
    command = os.environ.get("GPU_CHECK_COMMAND") or shlex.join([sys.executable, *sys.argv])
    report = dict(environment=environment(args, command), sections={})
    (out / "environment.json").write_text(json.dumps(report["environment"], indent=2))
    budgets = DRY_BUDGET_S if args.dry_run else BUDGET_S
    for name in names:
        left = args.timeout - (time.perf_counter() - start)
        if left < 5:
            report["sections"][name] = dict(status="skipped", error=f"global timeout of {args.timeout:.0f} s reached")
        else:
            print(f"gpu_check: {name} (budget {min(budgets[name], left):.0f} s) ...", flush=True)
            report["sections"][name] = run_section(name, args, min(budgets[name], left))
            print(f"gpu_check: {name}: {report['sections'][name]['status']} in "
                  f"{report['sections'][name].get('seconds', 0):.1f} s", flush=True)
        report["total_s"] = time.perf_counter() - start
        report["targets"] = targets(report["sections"])
        # written after every section: a run killed from outside still leaves what it measured
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
        (out / "gpu_check.md").write_text(markdown(report))
    ok = all(s["status"] == "ok" for s in report["sections"].values())
    print(f"gpu_check: {'all sections ok' if ok else 'some sections failed'}; {out / 'gpu_check.md'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
