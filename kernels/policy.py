"""The `auto` backend: Triton only where this GPU model's measured table says it wins.

A table is a committed JSON file per GPU model, ``kernels/tables/<gpu-slug>.json`` (the slug of
``torch.cuda.get_device_name()``, e.g. ``nvidia-h200``), written by ``tools/gpu_check.sh``'s
kernel timing (``OUT/backend_table.json``; copy it here to commit it)::

    {"device": "NVIDIA H200", "torch": "...", "triton": "...", "date": "...", "command": "...",
     "entries": [{"key": "swiglu/m262144/k2048/n512/e256/bfloat16",
                  "triton_ms": 9.1, "torch_grouped_mm_ms": 11.0}, ...]}

A key names the op ("swiglu": the whole expert FFN, fwd+bwd; "grouped_mm": one GEMM), the rows
rounded up to a power of two, K, N (for swiglu: d_model, d_expert), E and the dtype. `auto`
picks "triton" only for a key whose entry has triton_ms < torch_grouped_mm_ms; a missing table
or key gives "torch_grouped_mm" (never a loss against torch's own kernel). Opt-in
(UNIMM_AUTO_BENCHMARK=1): a key missing from the table is timed once at first use (both
backends, fwd+bwd, a few iterations on synthetic balanced routing) and the winner is cached for
the process. Off CUDA, `auto` is always "torch_grouped_mm". Each decision is logged once per key.

The decision runs at trace time under torch.compile (`torch.compiler.assume_constant_result`):
a Python constant, no graph break, no IO in the graph.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger("unimm.kernels")

TABLE_DIR = Path(os.environ.get("UNIMM_KERNEL_TABLES") or Path(__file__).resolve().parent / "tables")
"""Where the tables are read from; UNIMM_KERNEL_TABLES points elsewhere (tools/gpu_check.sh's
training sections read the table its kernel timing has just written)."""
BENCHMARK_ENV = "UNIMM_AUTO_BENCHMARK"


@dataclass(frozen=True)
class ShapeKey:
    op: str
    rows: int
    k: int
    n: int
    experts: int
    dtype: str

    @property
    def bucket(self) -> int:
        return 1 << max(self.rows - 1, 0).bit_length()

    def id(self) -> str:
        return f"{self.op}/m{self.bucket}/k{self.k}/n{self.n}/e{self.experts}/{self.dtype}"


def gpu_slug(device_name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (the table's file name)."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def load_table(path: Path) -> dict[str, dict]:
    """key id -> entry; a malformed file is an error naming the file and what is expected."""
    try:
        data = json.loads(path.read_text())
        entries = {e["key"]: e for e in data["entries"]}
        for key, e in entries.items():
            float(e["triton_ms"]), float(e["torch_grouped_mm_ms"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path}: expected a backend table {{'entries': [{{'key', 'triton_ms', "
            f"'torch_grouped_mm_ms'}}, ...]}} as tools/gpu_check.sh writes it ({err!r})"
        ) from err
    return entries


_tables: dict[str, dict[str, dict] | None] = {}
_decisions: dict[tuple[str, str], str] = {}
_measure: list[Callable[[ShapeKey], dict] | None] = [None]


def table_for(device_name: str) -> dict[str, dict] | None:
    slug = gpu_slug(device_name)
    if slug not in _tables:
        path = TABLE_DIR / f"{slug}.json"
        _tables[slug] = load_table(path) if path.is_file() else None
    return _tables[slug]


def decide(key: ShapeKey, device_name: str) -> str:
    """The backend for `key` on this GPU model: table, then (opt-in) a benchmark, else torch."""
    cache_key = (device_name, key.id())
    if cache_key in _decisions:
        return _decisions[cache_key]
    entry = (table_for(device_name) or {}).get(key.id())
    if entry is None and os.environ.get(BENCHMARK_ENV) == "1" and _measure[0] is not None:
        entry = _measure[0](key)
        source = "benchmark at first use"
    else:
        source = f"table {TABLE_DIR / (gpu_slug(device_name) + '.json')}" if entry else "no measurement"
    if entry is not None and float(entry["triton_ms"]) < float(entry["torch_grouped_mm_ms"]):
        choice = "triton"
    else:
        choice = "torch_grouped_mm"
    timing = f" (triton {entry['triton_ms']:.3g} ms, torch {entry['torch_grouped_mm_ms']:.3g} ms)" if entry else ""
    log.info("grouped GEMM backend auto -> %s for %s on %s, %s%s", choice, key.id(), device_name, source, timing)
    _decisions[cache_key] = choice
    return choice


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@torch.compiler.assume_constant_result
def _decide_constant(op: str, rows: int, k: int, n: int, experts: int, dtype: str, device_index: int) -> str:
    index = device_index if device_index >= 0 else torch.cuda.current_device()
    return decide(ShapeKey(op, rows, k, n, experts, dtype), torch.cuda.get_device_name(index))


def resolve(op: str, x: torch.Tensor, rows: int, k: int, n: int, experts: int) -> str:
    """The concrete backend for `auto` (callers pass their shapes; x gives device and dtype)."""
    if not x.is_cuda:
        return "torch_grouped_mm"
    index = x.device.index if x.device.index is not None else -1
    return _decide_constant(op, rows, k, n, experts, _DTYPE_NAMES[x.dtype], index)


def set_benchmark(measure: Callable[[ShapeKey], dict] | None) -> None:
    """The function that times a key (both backends) for UNIMM_AUTO_BENCHMARK=1 (experts.py
    installs the real one; tests install fakes)."""
    _measure[0] = measure


def clear_cache() -> None:
    """Forget loaded tables and decisions (tests; after committing a new table)."""
    _tables.clear()
    _decisions.clear()
