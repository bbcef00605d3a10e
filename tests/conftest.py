from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from unimm.titan import compat
from unimm.titan.metrics_jsonl import read_metrics

needs_expert_parallel_torch = pytest.mark.skipif(
    not compat.TORCH_FSDP_PER_PARAM_MESH,
    reason="expert parallelism needs torch >= 2.12 (unimm.titan.compat; refusing it is tested in test_torch_211.py)",
)

if TYPE_CHECKING:
    import torch

    from unimm.model.transformer import UnimmModel


@pytest.fixture(scope="session")
def sentencepiece_model(tmp_path_factory) -> Path:
    """A small BPE vocabulary trained by the project's own tokenizer job on generated text."""
    from unimm.data_pipelines import procedural
    from unimm.data_pipelines.train_tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(procedural.text_sample(i, seed=0)["text"] for i in range(300)))
    # one .txt file is one document: a JSONL file gives the trainer 300 of them
    lines = folder / "corpus.jsonl"
    lines.write_text("\n".join(json.dumps({"text": t}) for t in corpus.read_text().splitlines()))
    out = folder / "tok.model"
    train_tokenizer(out, [lines], vocab_size=400)
    return out


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One small procedural dataset for every training test of the session."""
    return tmp_path_factory.mktemp("procedural")


def small_run_options(cache: Path) -> list[str]:
    """debug_cpu shrunk to seconds per run: small batches, a small procedural dataset."""
    return [
        "--training.local_batch_size", "4",
        "--dataloader.num_images", "256",
        "--dataloader.num_videos", "64",
        "--dataloader.num_texts", "256",
        "--dataloader.num_actions", "64",
        "--dataloader.samples_per_shard", "64",
        "--dataloader.cache_dir", str(cache),
        "--metrics.log_freq", "1",
    ]


def run_module(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout)


def run_unimm(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_module("unimm.cli", *args, timeout=timeout)


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    return {row["step"]: row[key] for row in read_metrics(run_dir / "metrics.jsonl")}


def train_recipe(recipe: str, out: Path, cache: Path, *extra: str, steps: int, nproc: int = 1):
    """`unimm train` of a small run; fails the test with the run's output tail if it fails."""
    result = run_unimm(
        "train", "--recipe", recipe, "--out", str(out), "--steps", str(steps), "--nproc", str(nproc),
        *small_run_options(cache), *extra,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def starting_weights(config: UnimmModel.Config) -> dict[str, torch.Tensor]:
    """Initialised weights, with the zero-initialised flow head and router biases drawn at
    random so that outputs depend on them."""
    import torch

    torch.manual_seed(0)
    model = config.build()
    model.init_weights()
    state = model.state_dict()
    for name, tensor in state.items():
        if name.startswith("flow_head") or name.endswith("expert_bias"):
            tensor.normal_(std=0.1)
    return state


@dataclass
class Start:
    """Known weights as a DCP checkpoint and as a Hugging Face export of it."""

    flavor: str
    weights: dict[str, torch.Tensor]
    dcp: Path
    hf: Path


def make_start(root: Path, flavor: str, weights: dict[str, torch.Tensor] | None = None) -> Start:
    """Weights of a model flavor (default: its starting_weights) saved as a DCP checkpoint and
    exported by `unimm convert to-hf`."""
    from unimm.cli import main
    from unimm.convert.dcp_io import save_model_checkpoint
    from unimm.titan.model_spec import FLAVORS

    weights = starting_weights(FLAVORS[flavor]()) if weights is None else weights
    save_model_checkpoint(weights, root / "start")
    assert main(["convert", "to-hf", "--ckpt", str(root / "start"), "--out", str(root / "start_hf")]) == 0
    return Start(flavor, weights, root / "start", root / "start_hf")
