"""Step time of the transformer blocks, eager vs torch.compile, on the debug recipes (CPU).

What is timed: forward + backward of every block of a recipe's model over one microbatch of
the recipe's shape (``training.local_batch_size`` rows of ``training.seq_len``), the part of a
training step that torch.compile changes: torchtitan compiles each TransformerBlock with
``fullgraph=True`` (``torchtitan.distributed.compile.apply_compile``, called here as the
trainer calls it); the embeddings, heads, losses and optimizer stay eager either way.

The rows are packed like the loader's: documents of text and 16-token image frames (the debug
recipes' 32 px images in 8x8 patches) with padding at the end, the recipe's attention mask
(document-causal, bidirectional inside a frame; ``unimm.masks``), built once. Both variants get
the same weights and inputs; their outputs are compared (max relative difference).

Eager and compiled steps alternate (eager, compiled, eager, ...) so that load from other
processes on a shared machine falls on both alike. Each step is timed twice: wall clock, and
the CPU time of this process (``time.process_time``), which other processes' load barely moves;
the speedup is the ratio of the two CPU-time medians (the wall-clock ratio is reported beside
it). torch runs on ``--threads`` threads (default 1: OpenMP threads that spin while waiting for
a core would count their spinning as CPU time). Compile time (the first compiled step) is
reported apart and left out of the medians.

Usage: python tools/bench_compile.py [--recipes debug_cpu debug_cpu_modality debug_cpu_moe]
       [--steps 10] [--backend inductor] [--out DIR]   (DIR gets bench_compile.json and .png)
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from unimm.data.batch import NO_FRAME, TEXT, VISION
from unimm.masks import build_attention_mask

RECIPES = ("debug_cpu", "debug_cpu_modality", "debug_cpu_moe")
FRAME_TOKENS = 16


def packed_rows(batch: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Modality, document, frame and position ids of ``batch`` packed rows: documents of text
    runs and image frames, the row's tail padding (a text position of its own document)."""
    g = torch.Generator().manual_seed(seed)
    rows = {name: torch.empty(batch, seq_len, dtype=torch.long) for name in ("modality", "documents", "frames", "positions")}
    valid = torch.ones(batch, seq_len, dtype=torch.bool)
    for b in range(batch):
        pos, doc, frame = 0, 0, 0
        while pos < seq_len:
            doc_len = min(int(torch.randint(40, 120, (1,), generator=g)), seq_len - pos)
            start = pos
            while pos < start + doc_len:
                if int(torch.randint(0, 3, (1,), generator=g)) == 0 and pos + FRAME_TOKENS <= start + doc_len:
                    span, modality, frame_id = FRAME_TOKENS, VISION, frame
                    frame += 1
                else:
                    span, modality, frame_id = min(int(torch.randint(4, 24, (1,), generator=g)), start + doc_len - pos), TEXT, NO_FRAME
                rows["modality"][b, pos : pos + span] = modality
                rows["frames"][b, pos : pos + span] = frame_id
                pos += span
            rows["documents"][b, start:pos] = doc
            rows["positions"][b, start:pos] = torch.arange(pos - start)
            doc += 1
        valid[b, seq_len - seq_len // 16 :] = False  # the packer's tail padding
    rows["valid"] = valid
    return rows


def block_step(model, x_BLD: torch.Tensor, rows: dict, mask) -> torch.Tensor:
    """Forward and backward of every block; returns the last block's output."""
    x = x_BLD.clone().requires_grad_()
    h, balance = x, 0.0
    for block in model.layers.values():
        h, layer_balance = block(h, rows["modality"], model.rope, rows["positions"], mask, None, rows["valid"])
        balance = balance + layer_balance
    (h.square().mean() + balance).backward()
    model.zero_grad(set_to_none=True)
    return h.detach()


def bench_recipe(recipe: str, steps: int, backend: str) -> dict:
    from torchtitan.config import CompileConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.compile import apply_compile

    from unimm.titan.launch import load_recipe

    config = load_recipe(recipe)
    model_config = config.model_spec.model
    batch, seq_len = config.training.local_batch_size, config.training.seq_len
    torch.manual_seed(0)
    eager = model_config.build()
    eager.init_weights()
    compiled = copy.deepcopy(eager)
    dims = ParallelDims(dp_replicate=1, dp_shard=1, cp=1, tp=1, pp=1, ep=1, world_size=1, spmd_backend="partial_dtensor")
    apply_compile(compiled, compile_config=CompileConfig(enable=True, backend=backend), parallel_dims=dims)

    rows = packed_rows(batch, seq_len)
    mask = build_attention_mask(rows["documents"], rows["frames"], model_config.mask_backend(torch.device("cpu")))
    x_BLD = torch.randn(batch, seq_len, model_config.dim, generator=torch.Generator().manual_seed(1))

    start = time.perf_counter()
    out_compiled = block_step(compiled, x_BLD, rows, mask)  # compiles the blocks
    compile_s = time.perf_counter() - start
    out_eager = block_step(eager, x_BLD, rows, mask)  # warm-up
    rel_diff = float((out_compiled - out_eager).abs().max() / out_eager.abs().max())
    wall = {"eager": [], "compiled": []}
    cpu = {"eager": [], "compiled": []}
    for _ in range(steps):
        for name, model in (("eager", eager), ("compiled", compiled)):
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            block_step(model, x_BLD, rows, mask)
            wall[name].append(1000 * (time.perf_counter() - start_wall))
            cpu[name].append(1000 * (time.process_time() - start_cpu))
    median = {f"{name}_{kind}_ms": round(statistics.median(values[name]), 1)
              for kind, values in (("cpu", cpu), ("wall", wall)) for name in values}
    return {
        "recipe": recipe,
        "ffn": model_config.ffn.kind,
        "tokens": batch * seq_len,
        "layers": model_config.n_layers,
        **median,
        "speedup": round(median["eager_cpu_ms"] / median["compiled_cpu_ms"], 3),
        "wall_speedup": round(median["eager_wall_ms"] / median["compiled_wall_ms"], 3),
        "compile_s": round(compile_s, 1),
        "max_rel_diff": rel_diff,
        "cpu_ms_all": {name: [round(t, 1) for t in values] for name, values in cpu.items()},
        "wall_ms_all": {name: [round(t, 1) for t in values] for name, values in wall.items()},
    }


def plot(results: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r["recipe"] for r in results]
    ax.bar(names, [r["speedup"] for r in results], color="tab:blue")
    ax.axhline(1.0, color="grey", lw=1, ls="--")
    ax.set_ylabel("eager / compiled CPU time per step")
    ax.set_title("Blocks forward + backward, CPU (labels: eager / compiled ms)")
    for i, r in enumerate(results):
        ax.text(i, r["speedup"], f"{r['eager_cpu_ms']:.0f} / {r['compiled_cpu_ms']:.0f} ms", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each variant (alternating)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1; see the module docs)")
    parser.add_argument("--out", type=Path, default=None, help="folder for bench_compile.json and bench_compile.png")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: expected at least 1")
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: expected at least 1")
    torch.set_num_threads(args.threads)

    results = [bench_recipe(r, args.steps, args.backend) for r in tqdm(args.recipes, desc="recipes", file=sys.stderr)]
    meta = {
        "command": " ".join(["python tools/bench_compile.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "backend": args.backend,
    }
    print(f"{'recipe':<20} {'ffn':<9} {'eager CPU ms':>13} {'compiled CPU ms':>16} {'speedup':>8} "
          f"{'wall speedup':>13} {'compile s':>10} {'max rel diff':>13}")
    for r in results:
        print(f"{r['recipe']:<20} {r['ffn']:<9} {r['eager_cpu_ms']:>13.1f} {r['compiled_cpu_ms']:>16.1f} "
              f"{r['speedup']:>8.2f} {r['wall_speedup']:>13.2f} {r['compile_s']:>10.1f} {r['max_rel_diff']:>13.1e}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_compile.json").write_text(json.dumps({**meta, "results": results}, indent=2))
        plot(results, args.out / "bench_compile.png")
        print(f"wrote {args.out / 'bench_compile.json'} and {args.out / 'bench_compile.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
