"""Per-step performance metrics (``perf/*`` in metrics.jsonl) and their arithmetic.

Everything here is host-side bookkeeping: wall times from ``time.perf_counter`` around host
calls, FLOPs from :mod:`unimm.flops` on the logged step's CPU batches, and allocator or
``getrusage`` counters. Nothing waits for the device, so no host sync is added to a step.

What each metric means (all of them cover the log window, the steps since the previous
logged step, like torchtitan's own ``throughput(tps)``):

- ``perf/tokens_per_s_per_device``: positions (padding included) this rank read, over the
  window's wall time and the non-data-parallel degree (torchtitan's definition).
- ``perf/flops_per_token``: the exact training FLOPs of an average position
  (:func:`unimm.flops.model_flops` ``.per_token(...).mean``) with the position mix and mask
  density *measured* on the logged step's microbatches (:func:`step_mix`: the numbers of
  :func:`unimm.flops.measure_mix` without its dense mask), not ``TYPICAL_MIX``.
- ``perf/mfu``: ``flops_per_token * tokens_per_s_per_device / peak`` as a fraction (0.4 is
  40%), with the device's dense BF16 peak (:func:`peak_flops_of`); ``None`` (JSON null) on
  CPU and on a GPU the table does not know, never a made-up peak.
- ``perf/peak_memory_gib``: CUDA ``max_memory_allocated`` over the window (torchtitan
  resets the peak at every log; the reserved peak is ``memory_gib``); on CPU the process's
  peak resident set size (``getrusage``), a whole-run peak.
- ``perf/data_wait_s``: wall time the host spent blocked in ``next(data_iterator)``, per step
  (mean over the window), all microbatches of a step together; ``perf/data_wait_share`` is
  that time over the window's wall time. Read-ahead fetches (the trainer takes the next
  step's batches while the device runs the backward) count too: on CUDA they overlap device
  work, so the share is an upper bound on the time the device starved.
- ``perf/mask_build_s``: wall time in ``build_attention_mask`` per step (mean over the
  window). On CUDA the kernels run asynchronously: this is the host-side launch time
  (FlexAttention block-mask construction included), not the device time.
- ``perf/mask_build_device_s``: on CUDA, the device time of the same calls per step, from CUDA
  events around them (``DeviceSpans``) read at the log step, after the step's one wait, so
  reading them waits for nothing; ``None`` (JSON null) elsewhere.
"""

from __future__ import annotations

import contextlib
import resource
import sys
from typing import Any

import torch

from unimm.flops import ModelFlops, PositionMix, mix_with_density

GIB = 1024**3

# Dense (no sparsity) BF16 tensor-core peak per device, FLOP/s, by a substring of
# torch.cuda.get_device_name(); the first match wins, so longer names come first.
# Same figures as torchtitan 0.3.0's tools.utils.get_peak_flops, whose fallback for an
# unknown GPU is A100's 312e12; here an unknown device has no peak and no MFU.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2.5e15),
    ("B200", 2.25e15),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("H20", 148e12),  # after H200, whose name contains it
    ("A100", 312e12),
)

# keys measure_mix reads from a batch's inputs
_MIX_KEYS = ("document_ids", "frame_ids", "modality", "denoise", "understanding")


def peak_flops_of(device_name: str) -> float | None:
    """Dense BF16 peak FLOP/s of a CUDA device by its name; None when unknown."""
    for key, flops in PEAK_BF16_FLOPS:
        if key in device_name:
            return flops
    return None


def peak_flops(device: torch.device) -> float | None:
    """The device's peak for MFU: None on CPU (or any non-CUDA device) and unknown GPUs."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_memory_gib(device: torch.device) -> float:
    """CUDA: peak allocated bytes since the last reset of the peak stats. Elsewhere: the
    process's peak resident set size over its life. Reads counters; no device sync."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max_rss * (1 if sys.platform == "darwin" else 1024) / GIB  # KiB on Linux, bytes on macOS


class DeviceSpans:
    """Device time spent between host-marked points (``with spans.span(): ...``), from CUDA
    events. ``total_s`` sums the spans whose end has completed on the device (it never
    waits: an unfinished span stays for the next call). Off CUDA it records nothing and
    ``total_s`` is None."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def span(self):
        if not self.cuda:
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._pending.append((start, end))

    def total_s(self) -> float | None:
        if not self.cuda:
            return None
        done = [pair for pair in self._pending if pair[1].query()]
        self._pending = [pair for pair in self._pending if pair not in done]
        return sum(start.elapsed_time(end) for start, end in done) / 1000.0


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction of ``peak``; None without a peak."""
    if peak is None or not peak > 0:
        return None
    return flops_per_token * tokens_per_s / peak


def share(part_s: float, total_s: float) -> float | None:
    """``part_s / total_s``; None for an empty window."""
    return part_s / total_s if total_s > 0 else None


def _cumcount(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each element of a 1-D tensor: how many elements at or before it hold the same
    key (1 for the first), and how many hold it in all."""
    order = torch.sort(keys, stable=True).indices
    _, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts  # first sorted index of each key
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(keys))
    return rank - starts[inverse] + 1, counts[inverse]


def keys_per_query(document_ids_BL: torch.Tensor, frame_ids_BL: torch.Tensor) -> torch.Tensor:
    """Keys each query may attend to under unimm.masks' rule (same document, and an earlier or
    the same position or the same frame), counted in O(B L log L) instead of the B x L x L
    mask measure_mix builds (0.3 s a row at 4096 positions on a CPU core, per logged step)."""
    B, L = document_ids_BL.shape
    row = torch.arange(B)[:, None].expand(B, L)
    doc = (row * (int(document_ids_BL.max()) - int(document_ids_BL.min()) + 1)
           + document_ids_BL - document_ids_BL.min()).reshape(-1)
    frame = frame_ids_BL.reshape(-1)
    # earlier-or-same positions of the same document: the query's rank in its document
    causal, _ = _cumcount(doc)
    # later positions of the same document and frame (a frame sees all of itself)
    pair = doc * (int(frame.max()) - int(frame.min()) + 1) + frame - frame.min()
    pair_rank, pair_size = _cumcount(pair)
    later_same_frame = torch.where(frame >= 0, pair_size - pair_rank, 0)
    return (causal + later_same_frame).reshape(B, L)


def step_mix(inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> PositionMix:
    """:func:`unimm.flops.measure_mix` of a batch, with the densities from
    :func:`keys_per_query` (the same numbers, tested against it)."""
    density_BL = keys_per_query(inputs["document_ids"], inputs["frame_ids"]).double() / labels.shape[1]
    return mix_with_density(inputs, labels, density_BL)


def batch_mix(microbatches) -> PositionMix:
    """The position mix of a step's microbatches ``[(inputs, labels), ...]`` together (rows
    concatenated, so the densities are exact over the step, not a mean of means)."""
    if len(microbatches) == 1:
        return step_mix(*microbatches[0])
    inputs = {
        key: torch.cat([mb_inputs[key] for mb_inputs, _ in microbatches])
        for key in _MIX_KEYS
        if all(key in mb_inputs for mb_inputs, _ in microbatches)
    }
    return step_mix(inputs, torch.cat([labels for _, labels in microbatches]))


def window_metrics(
    *,
    tokens: int,
    window_s: float,
    steps: int,
    data_wait_s: float,
    mask_build_s: float,
    flops_per_token: float,
    peak: float | None,
    memory_gib: float,
    non_data_parallel_size: int = 1,
    mask_build_device_s: float | None = None,
) -> dict[str, Any]:
    """The ``perf/*`` metrics of one log window from its totals: ``tokens`` read by this rank,
    ``window_s`` of wall time, ``steps`` steps, ``data_wait_s``, ``mask_build_s`` and
    ``mask_build_device_s`` (None off CUDA) summed over those steps."""
    steps = max(steps, 1)
    tps = tokens / (window_s * non_data_parallel_size) if window_s > 0 else 0.0
    return {
        "perf/tokens_per_s_per_device": tps,
        "perf/flops_per_token": flops_per_token,
        "perf/mfu": mfu(flops_per_token, tps, peak),
        "perf/peak_memory_gib": memory_gib,
        "perf/data_wait_s": data_wait_s / steps,
        "perf/data_wait_share": share(data_wait_s, window_s),
        "perf/mask_build_s": mask_build_s / steps,
        "perf/mask_build_device_s": None if mask_build_device_s is None else mask_build_device_s / steps,
    }


def flops_per_token(model_flops: ModelFlops, microbatches) -> float:
    """Exact training FLOPs of an average position of these microbatches."""
    seq_len = microbatches[0][1].shape[1]
    return model_flops.per_token(batch_mix(microbatches), seq_len).mean
