"""perf/* metrics (unimm.titan.step_metrics): the arithmetic, by hand. That a training run
writes them to metrics.jsonl is checked on test_trainer.py's test_losses_fall run."""

import resource

import pytest
import torch

from test_flops import batch, tiny_config
from unimm.data.batch import IGNORE_INDEX, NO_FRAME, TEXT
from unimm.flops import PositionMix, model_flops
from unimm.model.params import meta_model
from unimm.titan import step_metrics as sm


def test_mfu_from_known_flops_time_and_peak():
    # 6 GFLOP per token at 50k tokens/s = 3e14 FLOP/s on an H100's 989e12
    assert sm.mfu(6e9, 50_000, 989e12) == pytest.approx(3e14 / 989e12)
    assert sm.mfu(6e9, 50_000, None) is None
    assert sm.mfu(6e9, 50_000, 0.0) is None


def test_window_metrics_by_hand():
    # 4 steps in 2 s; 8192 positions read; 0.5 s blocked on data; 0.2 s building masks
    perf = sm.window_metrics(
        tokens=8192, window_s=2.0, steps=4, data_wait_s=0.5, mask_build_s=0.2,
        flops_per_token=1e9, peak=1e13, memory_gib=1.5,
    )
    assert perf == {
        "perf/tokens_per_s_per_device": 4096.0,
        "perf/flops_per_token": 1e9,
        "perf/mfu": pytest.approx(4096 * 1e9 / 1e13),  # 0.4096
        "perf/peak_memory_gib": 1.5,
        "perf/data_wait_s": 0.125,  # per step
        "perf/data_wait_share": 0.25,  # of the window's wall time
        "perf/mask_build_s": 0.05,
        "perf/mask_build_device_s": None,  # no CUDA events: no device time
    }
    # tensor parallel over 2 devices: each device's share of a replica's tokens (torchtitan's tps)
    tp2 = sm.window_metrics(
        tokens=8192, window_s=2.0, steps=4, data_wait_s=0.0, mask_build_s=0.0,
        flops_per_token=1e9, peak=None, memory_gib=0.0, non_data_parallel_size=2,
    )
    assert tp2["perf/tokens_per_s_per_device"] == 2048.0
    assert tp2["perf/mfu"] is None
    assert tp2["perf/data_wait_share"] == 0.0
    device = sm.window_metrics(
        tokens=8192, window_s=2.0, steps=4, data_wait_s=0.0, mask_build_s=0.0,
        flops_per_token=1e9, peak=None, memory_gib=0.0, mask_build_device_s=0.4,
    )
    assert device["perf/mask_build_device_s"] == 0.1  # per step
    spans = sm.DeviceSpans(torch.device("cpu"))
    with spans.span():
        pass
    assert spans.total_s() is None  # no device clock off CUDA
    assert sm.share(1.0, 0.0) is None


def test_peak_flops_table():
    assert sm.peak_flops_of("NVIDIA H200") == 989e12
    assert sm.peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert sm.peak_flops_of("NVIDIA H100 PCIe") == 756e12
    assert sm.peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert sm.peak_flops_of("NVIDIA H20") == 148e12
    assert sm.peak_flops_of("NVIDIA GB200") == 2.5e15
    assert sm.peak_flops_of("Tesla T4") is None  # unknown: no MFU rather than a guessed peak
    assert sm.peak_flops(torch.device("cpu")) is None


def test_peak_memory_on_cpu_is_the_max_rss():
    rss_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    assert sm.peak_memory_gib(torch.device("cpu")) == pytest.approx(rss_gib, rel=0.05)


def test_mix_of_microbatches_is_exact_over_the_step():
    # test_flops's row (9 text queries seeing 43 keys, 7 visual seeing 47) and a row of one
    # text document, every position a target: causal, 1 + 2 + ... + 16 = 136 keys
    L = 16
    text_row = (
        {
            "modality": torch.tensor([[TEXT] * L]),
            "frame_ids": torch.tensor([[NO_FRAME] * L]),
            "document_ids": torch.zeros(1, L, dtype=torch.long),
            "denoise": torch.zeros(1, L, dtype=torch.bool),
        },
        torch.full((1, L), 7),
    )
    microbatches = [batch(), text_row]
    mix = sm.batch_mix(microbatches)
    expected = PositionMix(
        vision=7 / 32,
        lm_targets=(6 + 16) / 32,
        denoised=3 / 32,
        text_density=pytest.approx((43 + 136) / 25 / L),  # not the mean of the rows' means
        vision_density=pytest.approx(47 / 7 / L),
    )
    assert mix == expected
    assert (text_row[1] != IGNORE_INDEX).all()

    flops = model_flops(meta_model(tiny_config("shared")))
    exact = flops.per_token(
        PositionMix(7 / 32, 22 / 32, 3 / 32, (43 + 136) / 25 / L, 47 / 7 / L), L
    ).mean
    assert sm.flops_per_token(flops, microbatches) == pytest.approx(exact)
    assert sm.flops_per_token(flops, [batch()]) == pytest.approx(flops.per_token(sm.batch_mix([batch()]), L).mean)



@pytest.mark.parametrize("seed", range(5))
def test_step_mix_matches_measure_mix(seed):
    # the O(L log L) count against the dense mask on random packed rows: several documents
    # and frames a row, frame ids repeating across documents, padding-like trailing docs
    from unimm.data.batch import VISION
    from unimm.flops import measure_mix

    g = torch.Generator().manual_seed(seed)
    B, L = 3, 64
    docs = torch.sort(torch.randint(0, 5, (B, L), generator=g), dim=1).values
    frame_id = torch.randint(0, 4, (B, L // 8), generator=g).repeat_interleave(8, dim=1)
    is_frame = torch.rand(B, L // 8, generator=g).repeat_interleave(8, dim=1) < 0.5
    frames = torch.where(is_frame, frame_id, NO_FRAME)
    inputs = {
        "document_ids": docs,
        "frame_ids": frames,
        "modality": torch.where(is_frame, VISION, TEXT),
        "denoise": is_frame & (torch.rand(B, L, generator=g) < 0.7),
    }
    labels = torch.where(torch.rand(B, L, generator=g) < 0.5, 7, IGNORE_INDEX)
    fast, dense = sm.step_mix(inputs, labels), measure_mix(inputs, labels)
    for field in ("vision", "lm_targets", "denoised", "text_density", "vision_density", "understanding"):
        assert getattr(fast, field) == pytest.approx(getattr(dense, field), rel=1e-12), field
    assert sm.step_mix(*batch()) == measure_mix(*batch())
