"""Data overlapped with compute: the loader's settings per device, worker processes and pinned
memory that change no batch and resume exactly, and wire batches that decode to the dense ones."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unimm.data import wire
from unimm.data.batch import PROVENANCE_KEY
from unimm.data.loader import OVERLAP_PREFETCH, MultimodalDataLoader
from unimm.data_pipelines.write_shards import ensure_procedural_shards
from unimm.tokenizer import Tokenizer

TK = Tokenizer()
C = 192
SETTINGS = dict(
    num_images=24, num_videos=8, num_texts=24, num_actions=8, image_size=32, patch=8, samples_per_shard=8, seed=0
)
BUILD = dict(dp_world_size=1, dp_rank=0, tokenizer=TK, seq_len=512, local_batch_size=2, snapshot_every_n_steps=1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return ensure_procedural_shards(tmp_path_factory.mktemp("cache"), **SETTINGS)


def config(**kw) -> MultimodalDataLoader.Config:
    return MultimodalDataLoader.Config(**{"latent_dim": C, "vocab_size": TK.get_vocab_size(), **kw})


def assert_same(a, b) -> None:
    (xa, ya), (xb, yb) = a, b
    assert xa.keys() == xb.keys()
    for key in xa:
        if key == PROVENANCE_KEY:
            assert xa[key] == xb[key]
        else:
            assert torch.equal(xa[key], xb[key]), key
    assert torch.equal(ya, yb)


def test_settings_follow_the_device():
    cuda = config(device_type="cuda").resolved()
    assert (cuda.num_workers, cuda.pin_memory, cuda.prefetch_factor) == (1, True, OVERLAP_PREFETCH)
    assert cuda.wire == wire.WireFormat(latent_dtype="bfloat16", lm_capacity=0.75, flow_capacity=0.75)
    cpu = config(device_type="cpu").resolved()
    assert (cpu.num_workers, cpu.pin_memory, cpu.prefetch_factor) == (0, False, None)
    assert cpu.wire.latent_dtype == "float32"  # exact on CPU
    tool = config().resolved()  # no device: dense batches in this process, as before
    assert (tool.num_workers, tool.wire) == (0, None)
    assert config(device_type="cuda", overlap="off").resolved().num_workers == 0
    assert config(device_type="cuda", num_workers=2).resolved().num_workers == 2
    assert config(device_type="cuda", latent_wire_dtype="float16").resolved().wire.latent_dtype == "float16"
    with pytest.raises(ValueError, match="lm_capacity=1.5"):
        config(device_type="cpu", lm_capacity=1.5).resolved()


def _pinning_or_skip(pin: bool) -> None:
    if pin and not torch.accelerator.is_available():
        pytest.skip(f"pinned memory needs an accelerator; torch {torch.__version__} here has none to pin for")


@pytest.mark.parametrize("pin", [False, True])
def test_worker_loader_changes_no_batch_and_resumes_exactly(shards, pin):
    _pinning_or_skip(pin)
    in_process = config(shards=str(shards), device_type="cpu").build(**BUILD)
    overlapped_config = config(shards=str(shards), device_type="cpu", overlap="on", pin_memory=pin)
    overlapped = overlapped_config.build(**BUILD)
    assert overlapped.settings.num_workers == 1 and in_process.settings.num_workers == 0
    reference, it = iter(in_process), iter(overlapped)
    for _ in range(3):
        batch = next(it)
        assert_same(batch, next(reference))
        if pin:
            assert batch[0]["latents"].is_pinned()
    state = overlapped.state_dict()  # three batches taken, more already built ahead
    expected = [next(it) for _ in range(4)]

    resumed = overlapped_config.build(**BUILD)
    resumed.load_state_dict(state)
    for a, b in zip(expected, [b for _, b in zip(range(4), resumed)], strict=True):
        assert_same(a, b)


def test_wire_batches_decode_to_the_dense_batches(shards):
    dataset_batches = config(shards=str(shards)).build(**BUILD)
    wire_batches = config(shards=str(shards), device_type="cpu").build(**BUILD)
    for _, (dense, labels), (sent, sent_labels) in zip(range(3), dataset_batches, wire_batches):
        assert torch.equal(labels, sent_labels)
        got = wire.to_device(sent, "cpu")
        for key, value in dense.items():
            if key != PROVENANCE_KEY:
                assert torch.equal(got[key], value), key
        assert sent["latents"].shape[0] < labels.numel()  # rows, not every position
