"""Loader throughput: packed positions per second from shards, in one process, against what
the model consumes per step.

    python tools/bench_loader.py                  # both shapes below, shards in a temp folder
    python tools/bench_loader.py --work /tmp/bench --batches 40

Shapes measured (the loader runs in the training process, so one process is one "worker"):

- debug_cpu: procedural raw-pixel shards (32 px, 8 x 8 patches: 16 tokens of 192), batch 8 x 256.
- paper: SigLIP 2 So400m's latent shape (256 tokens of 1152 at 224 px) written by the same jobs
  through a randomly initialised one-layer SiglipVisionModel of that width (the loader's cost
  depends on the shape, not the weights), video clips of 8 frames, NWM-style action samples,
  batch 4 x 4096 per GPU, the paper's token shares.

The paper's demand per GPU: 6 * N * D FLOPs a step with N = 1.5e9 active parameters and
D = 4 x 4096 tokens, at an assumed 400 TFLOP/s of effective bf16 throughput on an H100.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from unimm.data.loader import DEFAULT_SOURCE_WEIGHTS, PackedMultimodalDataset
from unimm.data.shards import load_manifest
from unimm.data_pipelines.encoders import EncoderSpec
from unimm.data_pipelines.write_shards import ensure_procedural_shards, write_procedural
from unimm.tokenizer import Tokenizer

PAPER_ACTIVE_PARAMS = 1.5e9
PAPER_ROWS, PAPER_SEQ = 4, 4096
H100_EFFECTIVE_FLOPS = 400e12
SIGLIP_WIDTH = 1152


def paper_tokens_per_s() -> tuple[float, float]:
    tokens = PAPER_ROWS * PAPER_SEQ
    step_s = 6 * PAPER_ACTIVE_PARAMS * tokens / H100_EFFECTIVE_FLOPS
    return step_s, tokens / step_s


def _siglip_shaped_encoder(folder: Path) -> EncoderSpec:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    if not (folder / "config.json").is_file():
        config = SiglipVisionConfig(
            hidden_size=SIGLIP_WIDTH, intermediate_size=64, num_hidden_layers=1, num_attention_heads=16,
            image_size=224, patch_size=14,
        )
        SiglipVisionModel(config).save_pretrained(folder)
    return EncoderSpec("siglip2", str(folder), image_size=224)


def measure(folder: Path, latent_dim: int, rows: int, seq_len: int, batches: int) -> dict[str, float]:
    dataset = PackedMultimodalDataset(
        manifest=load_manifest(folder, latent_dim), tokenizer=Tokenizer(), seq_len=seq_len, local_batch_size=rows,
        source_weights=DEFAULT_SOURCE_WEIGHTS,
    )
    for _ in range(3):  # open every source's first shard
        dataset.next_batch()
    start = time.perf_counter()
    for _ in range(batches):
        dataset.next_batch()
    elapsed = time.perf_counter() - start
    stats = dataset.stats()
    used = sum(stats[f"positions/{s}"] for s in DEFAULT_SOURCE_WEIGHTS)
    return {
        "batch_ms": 1000 * elapsed / batches,
        "tokens_per_s": batches * rows * seq_len / elapsed,
        "padding": stats["padding_positions"] / (stats["rows"] * seq_len),
        **{f"share/{s}": stats[f"positions/{s}"] / used for s in DEFAULT_SOURCE_WEIGHTS},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="folder for the shards (kept; re-runs reuse them)")
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    # One thread: the figure is per loading process, not spread over the machine's cores.
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_loader-"))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, "
        f"torch {torch.__version__}, python {platform.python_version()}; shards in {work}"
    )

    debug = ensure_procedural_shards(work / "debug", num_images=4096, num_videos=1024, num_texts=4096, num_actions=512, samples_per_shard=256)
    paper = work / "paper"
    write_procedural(
        paper,
        {"text": 4096, "image_text": 256, "video": 32, "action": 64},
        encoder=_siglip_shaped_encoder(work / "siglip_shaped"),
        tokenizer=Tokenizer.Config(),
        video_frames=8,
        samples_per_shard=64,
    )
    step_s, needed = paper_tokens_per_s()
    for name, folder, dim, rows, seq in (("debug_cpu", debug, 192, 8, 256), ("paper", paper, SIGLIP_WIDTH, PAPER_ROWS, PAPER_SEQ)):
        result = measure(folder, dim, rows, seq, args.batches)
        shares = ", ".join(f"{k[6:]} {v:.3f}" for k, v in result.items() if k.startswith("share/"))
        print(
            f"{name}: batch {rows} x {seq}: {result['batch_ms']:.1f} ms/batch, "
            f"{result['tokens_per_s']:,.0f} tokens/s per process, padding {result['padding']:.1%}; shares {shares}"
        )
    print(
        f"paper demand per GPU: 6 * {PAPER_ACTIVE_PARAMS:.2g} * {PAPER_ROWS * PAPER_SEQ} / {H100_EFFECTIVE_FLOPS:.0e} "
        f"= {step_s:.3f} s/step -> {needed:,.0f} tokens/s"
    )


if __name__ == "__main__":
    main()
