"""Host side of the Triton grouped GEMM: tile configs, autotuning, grids, allocation, launches.

Every function here allocates its outputs and launches kernels from grouped_gemm.py; none reads
a tensor back to the host, so they run inside `torch.library.triton_op` bodies (triton_ops.py),
where torch.compile traces them (launches go through `wrap_triton`).

Tile configs. Each kernel has a short list for sm90 (bf16 operands, fp32 accumulation): the
tiles the Hopper tensor cores like (128x128x64, 128x256x64 with 8 warps, 3-5 stages) plus the
small 64x128x64 one for small or ragged groups. `triton.autotune` picks per key (rows rounded up
to a power of two, N, K, E, gather, dual). Configs that do not fit in shared memory are skipped
by the autotuner. The interpreter cannot time configs: it runs the config named by
`force_configs` (tests run each), else the first of each list.

Weight TMA. On sm90 and newer the kernels that read expert weights (forward, input grad,
gate/up) can load them through a TMA descriptor (grouped_gemm._weight_desc) instead of masked
pointer loads. Each of their configs then also exists with WEIGHT_TMA, and the autotuner times
both per key, so TMA is used exactly where it measures faster. `weight_tma("on"|"off"|"auto")`
or UNIMM_TRITON_WEIGHT_TMA fixes the choice (parity checks and benchmarks run each). A weight
whose layout TMA cannot describe (no unit-stride axis among K and N, a stride or offset not a
multiple of 16 bytes) takes the pointer path whatever the setting.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import asdict, dataclass, replace

import torch
import triton
import triton.testing

from .grouped_gemm import (
    INTERPRETED,
    _gate_up_kernel,
    _grouped_mm_kernel,
    _segment_sum_kernel,
    _swiglu_grad_kernel,
    _weight_grad_kernel,
)


@dataclass(frozen=True)
class TileConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int
    GROUP_M: int = 8
    PROGRAMS_PER_SM: int = 1
    """Persistent grid size per multiprocessor (row-tiled kernels): as many as fit at once."""
    WEIGHT_TMA: bool = False
    """Expert weight tiles through a TMA descriptor (row-tiled kernels; sm90+)."""

    def meta(self, kind: str) -> dict:
        meta = {k: v for k, v in asdict(self).items() if k not in ("num_warps", "num_stages")}
        if kind == "dw":
            meta.pop("PROGRAMS_PER_SM")
            meta.pop("WEIGHT_TMA")
        return meta

    def triton(self, kind: str) -> triton.Config:
        return triton.Config(self.meta(kind), num_warps=self.num_warps, num_stages=self.num_stages)


CONFIGS: dict[str, tuple[TileConfig, ...]] = {
    # y = x @ w[e] and dx = dy @ w[e]^T (also the fused gate/up input grad: two products, one acc)
    "mm": (
        TileConfig(128, 128, 64, num_warps=8, num_stages=4),
        TileConfig(128, 256, 64, num_warps=8, num_stages=3),
        TileConfig(64, 128, 64, num_warps=4, num_stages=3, PROGRAMS_PER_SM=2),
    ),
    # h1, h3 = x @ w1[e], x @ w3[e]: two fp32 accumulators, so N stays <= 128 (registers)
    "gate_up": (
        TileConfig(128, 128, 64, num_warps=8, num_stages=3),
        TileConfig(128, 64, 64, num_warps=4, num_stages=4),
        TileConfig(64, 128, 64, num_warps=4, num_stages=3),  # 120 KB of shared memory: one per SM
    ),
    # dw[e] = a_e^T @ b_e: BLOCK_K x BLOCK_N output tile, BLOCK_M rows per step
    "dw": (
        TileConfig(64, 128, 128, num_warps=8, num_stages=4),
        TileConfig(64, 256, 128, num_warps=8, num_stages=3),
        TileConfig(64, 128, 64, num_warps=4, num_stages=3),
    ),
}
DUAL_DW_CONFIGS = CONFIGS["dw"][::2]  # two accumulators: not the 128x256 output tile

_AUTOTUNE_KEYS = {
    "mm": ["M_BUCKET", "N", "K", "E", "HAS_GATHER", "DUAL"],
    "gate_up": ["M_BUCKET", "N", "K", "E", "HAS_GATHER"],
    "dw": ["M_BUCKET", "N", "K", "E", "HAS_GATHER", "DUAL", "SPLIT"],
}


def _bench(fn, quantiles):
    # Short timing runs: a first use tunes ~4 configs per kernel and key.
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


WEIGHT_TMA_KINDS = ("mm", "gate_up")
"""The kernels that read expert weights, which TMA can load."""


def with_weight_tma(configs: tuple[TileConfig, ...]) -> tuple[TileConfig, ...]:
    return tuple(replace(c, WEIGHT_TMA=True) for c in configs)


def _config_list(name: str, tma: str) -> tuple[TileConfig, ...]:
    """The configs kernel `name` is tuned over: pointer loads, TMA ("on"), or both ("auto")."""
    kind = _KIND[name]
    base = DUAL_DW_CONFIGS if name == "dw_dual" else CONFIGS[kind]
    if kind not in WEIGHT_TMA_KINDS or tma == "off":
        return base
    return with_weight_tma(base) if tma == "on" else base + with_weight_tma(base)


def _tuned(kernel, kind: str, configs: tuple[TileConfig, ...]):
    return triton.autotune([c.triton(kind) for c in configs], key=_AUTOTUNE_KEYS[kind], do_bench=_bench)(kernel)


_RAW = {"fwd": _grouped_mm_kernel, "dx": _grouped_mm_kernel, "gate_up": _gate_up_kernel,
        "dw": _weight_grad_kernel, "dw_dual": _weight_grad_kernel}
_KIND = {"fwd": "mm", "dx": "mm", "gate_up": "gate_up", "dw": "dw", "dw_dual": "dw"}


_autotuners: dict[tuple[str, str], triton.runtime.Autotuner] = {}


def _autotuner(name: str, tma: str) -> triton.runtime.Autotuner:
    # One autotuner per use and TMA setting: the forward and the input grad differ in their
    # weight strides, and each setting tunes over its own config list.
    if (name, tma) not in _autotuners:
        _autotuners[name, tma] = _tuned(_RAW[name], _KIND[name], _config_list(name, tma))
    return _autotuners[name, tma]


def tuned_configs() -> dict[str, dict[str, str]]:
    """What the autotuners chose so far: {kernel/tma setting: {autotune key: config}} (reports)."""
    return {f"{name}/tma-{tma}": {str(key): str(config) for key, config in tuner.cache.items()}
            for (name, tma), tuner in _autotuners.items()}


_forced: dict[str, TileConfig] = {}
WEIGHT_TMA_ENV = "UNIMM_TRITON_WEIGHT_TMA"
_weight_tma_mode = [os.environ.get(WEIGHT_TMA_ENV, "auto")]


@contextlib.contextmanager
def force_configs(**configs: TileConfig):
    """Run these kernels (fwd, dx, gate_up, dw, dw_dual) with one config instead of autotuning."""
    unknown = set(configs) - set(_RAW)
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; choose from {sorted(_RAW)}")
    saved = dict(_forced)
    _forced.update(configs)
    try:
        yield
    finally:
        _forced.clear()
        _forced.update(saved)


def _check_tma_mode(mode: str, where: str) -> str:
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"{where}: expected 'auto', 'on' or 'off', got {mode!r}")
    return mode


@contextlib.contextmanager
def weight_tma(mode: str):
    """Expert weight loads through TMA: "auto" (the autotuner times both), "on" (TMA configs
    only, where the layout allows), "off" (pointer loads only)."""
    saved = _weight_tma_mode[0]
    _weight_tma_mode[0] = _check_tma_mode(mode, "weight_tma")
    try:
        yield
    finally:
        _weight_tma_mode[0] = saved


@functools.lru_cache(maxsize=None)
def _tma_hardware(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0) and hasattr(triton.language, "make_tensor_descriptor")


def weight_layout(b: torch.Tensor) -> tuple[bool, bool]:
    """(k_major, tma_ok) of expert weights b [E, K, N]: whether K is the unit-stride axis (the
    input grad's transposed view), and whether a TMA descriptor can describe b (16-byte aligned
    offset and outer strides, a unit stride on K or N)."""
    k_major = b.stride(2) != 1 and b.stride(1) == 1
    unit_axis = 1 if k_major else 2
    size = b.element_size()
    aligned = (b.stride(unit_axis) == 1 and b.storage_offset() * size % 16 == 0
               and all(b.stride(d) * size % 16 == 0 for d in range(3) if d != unit_axis))
    return k_major, aligned


def _tma_setting(*weights: torch.Tensor) -> str:
    """The TMA setting of a launch reading these weights: "off" where TMA cannot be used."""
    mode = _check_tma_mode(_weight_tma_mode[0], WEIGHT_TMA_ENV)
    if mode == "off" or not all(weight_layout(w)[1] for w in weights):
        return "off"
    b = weights[0]
    if INTERPRETED or (b.is_cuda and _tma_hardware(b.device.index if b.device.index is not None else torch.cuda.current_device())):
        return mode
    return "off"


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, device="cuda", dtype=torch.int8)


@functools.lru_cache(maxsize=None)
def _install_tma_allocator() -> None:
    # Descriptors made inside a kernel live in global scratch memory that Triton asks the host
    # for at launch. Inductor installs its own allocator before each launch of a compiled graph;
    # eager launches need this one.
    triton.set_allocator(_tma_scratch)


def _wrap(kernel):
    if INTERPRETED:  # torch < 2.13's wrap_triton rejects interpreter functions
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def _launch(name: str, grid, *args, tma: str = "off", **kwargs) -> None:
    """Launch kernel `name`: the forced config, the interpreter's default, or the autotuner.

    tma: the weight-TMA setting (_tma_setting) for the kernels that read expert weights; a forced
    TMA config runs with pointer loads where the setting is "off"."""
    config = _forced.get(name)
    if config is None and INTERPRETED:
        config = _config_list(name, tma)[0]
    if config is not None and tma == "off" and config.WEIGHT_TMA:
        config = replace(config, WEIGHT_TMA=False)
    if tma != "off" and not INTERPRETED:
        _install_tma_allocator()
    if config is None:
        _wrap(_autotuner(name, tma))[grid](*args, **kwargs)
        return
    meta = config.meta(_KIND[name])
    _wrap(_RAW[name])[grid](*args, **kwargs, **meta, num_warps=config.num_warps, num_stages=config.num_stages)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    # The interpreter runs one program at a time: 4 "multiprocessors" make each program of the
    # persistent kernels walk several tiles, as on the GPU.
    return 4 if device.type != "cuda" else _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _m_bucket(rows: int) -> int:
    return triton.next_power_of_2(max(rows, 1))


def _block_e(num_experts: int) -> int:
    return max(2, triton.next_power_of_2(num_experts))


def _precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own TF32 switch so the kernel matches torch.matmul on the same machine.
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _persistent_grid(rows: int, num_experts: int, n: int, sms: int):
    def grid(meta):
        bm = meta["BLOCK_M"]
        # at most one partial tile per non-empty expert: an upper bound from shapes alone
        m_tiles = (rows + min(num_experts, rows) * (bm - 1)) // bm
        return (max(1, min(m_tiles * triton.cdiv(n, meta["BLOCK_N"]), sms * meta["PROGRAMS_PER_SM"])),)

    return grid


def grouped_mm(
    a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, gather_idx: torch.Tensor | None,
    rows: int, a2: torch.Tensor | None = None, b2: torch.Tensor | None = None, name: str = "fwd",
) -> torch.Tensor:
    """c[i] = a[src(i)] @ b[e(i)] (+ a2[i] @ b2[e(i)]): [rows, N] in a's dtype.

    a: [*, K]; b: [E, K, N], any strides (a transposed view for the input grad); src(i) is
    gather_idx[i] if given, else i; e(i) the expert owning row i. a2/b2 share a's/b's strides.
    """
    num_experts, k, n = b.shape
    c = torch.empty((rows, n), device=a.device, dtype=a.dtype)
    if rows == 0 or n == 0:
        return c
    dual = a2 is not None
    if dual and (a2.stride() != a.stride() or b2.stride() != b.stride()):
        raise ValueError("grouped_mm: the second product's operands must share the first's strides")
    _launch(
        name, _persistent_grid(rows, num_experts, n, num_sms(a.device)),
        a, b, a2 if dual else a, b2 if dual else b, c,
        gather_idx if gather_idx is not None else offsets, offsets,
        num_experts, n, k, _m_bucket(rows),
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        HAS_GATHER=gather_idx is not None, DUAL=dual, K_MAJOR=weight_layout(b)[0], PRECISION=_precision(a.dtype),
        BLOCK_E=_block_e(num_experts), tma=_tma_setting(b, b2) if dual else _tma_setting(b),
    )
    return c


def gate_up(
    x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, offsets: torch.Tensor,
    gather_idx: torch.Tensor | None, rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, h1, h3): h1 = x[src] @ w1[e], h3 = x[src] @ w3[e], h = silu(h1) * h3, each [rows, H]."""
    if w3.stride() != w1.stride():
        w1, w3 = w1.contiguous(), w3.contiguous()
    num_experts, k, n = w1.shape
    h, h1, h3 = (torch.empty((rows, n), device=x.device, dtype=x.dtype) for _ in range(3))
    if rows == 0 or n == 0:
        return h, h1, h3
    _launch(
        "gate_up", _persistent_grid(rows, num_experts, n, num_sms(x.device)),
        x, w1, w3, h, h1, h3, gather_idx if gather_idx is not None else offsets, offsets,
        num_experts, n, k, _m_bucket(rows),
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w1.stride(2), h.stride(0), h.stride(1),
        HAS_GATHER=gather_idx is not None, PRECISION=_precision(x.dtype), BLOCK_E=_block_e(num_experts),
        tma=_tma_setting(w1, w3),
    )
    return h, h1, h3


SPLIT_BUFFER_BYTES = 1 << 30
"""Cap on the fp32 [SPLIT, E, K, N] partial-sum buffer of the split weight gradient."""


def choose_split(rows: int, num_experts: int, k: int, n: int, sms: int, outputs: int = 1) -> int:
    """Row splits of the weight gradient, from shapes alone.

    Split only when the (E, K-tile, N-tile) grid at 128x128 tiles is under 4 waves of programs,
    keep >= 512 rows (on average) per split, and the fp32 partial buffer under SPLIT_BUFFER_BYTES.
    """
    programs = num_experts * triton.cdiv(k, 128) * triton.cdiv(n, 128)
    if programs >= 4 * sms:
        return 1
    split = min(8, triton.cdiv(4 * sms, programs), max(1, rows // (512 * num_experts)))
    per_split = 4 * num_experts * k * n * outputs
    split = min(split, max(1, SPLIT_BUFFER_BYTES // max(per_split, 1)))
    return 1 << (max(split, 1).bit_length() - 1)  # a power of two: few compiled variants


def weight_grad(
    a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, gather_idx: torch.Tensor | None,
    b2: torch.Tensor | None = None, split: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """dw[e] = a[src rows of e]^T @ b[rows of e] ([E, K, N] in a's dtype; zero for an empty
    expert), and with b2 also dw2[e] = a[...]^T @ b2[...], from one read of a."""
    num_experts, k, n = offsets.shape[0], a.shape[1], b.shape[1]
    dual = b2 is not None
    if dual and b2.stride() != b.stride():
        b, b2 = b.contiguous(), b2.contiguous()
    if split is None:
        split = choose_split(b.shape[0], num_experts, k, n, num_sms(a.device), 2 if dual else 1)
    # split 1 writes dw itself (split stride 0); else fp32 partial sums [SPLIT, E, K, N]
    shape = (num_experts, k, n) if split == 1 else (split, num_experts, k, n)
    out_dtype = a.dtype if split == 1 else torch.float32
    outs = [torch.empty(shape, device=a.device, dtype=out_dtype) for _ in range(1 + dual)]
    strides = (0, *outs[0].stride()) if split == 1 else outs[0].stride()
    if outs[0].numel():
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
        order = torch.argsort(counts, descending=True, stable=True).to(torch.int32)

        def grid(meta):
            return (triton.cdiv(k, meta["BLOCK_K"]) * triton.cdiv(n, meta["BLOCK_N"]) * split, num_experts)

        c = outs[0]
        _launch(
            "dw_dual" if dual else "dw", grid,
            a, b, b2 if dual else b, c, outs[-1], gather_idx if gather_idx is not None else offsets, offsets, order,
            num_experts, n, k, _m_bucket(b.shape[0]),
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), *strides,
            HAS_GATHER=gather_idx is not None, DUAL=dual, SPLIT=split, PRECISION=_precision(a.dtype),
        )
    # The splits' partial sums, added in a fixed order: deterministic.
    dws = outs if split == 1 else [o.sum(0).to(a.dtype) for o in outs]
    return (dws[0], dws[1]) if dual else dws[0]


def swiglu_grad(dh: torch.Tensor, h1: torch.Tensor, h3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dh1, dh3) of h = silu(h1) * h3, computed in fp32, stored in dh's dtype."""
    dh, h1, h3 = dh.contiguous(), h1.contiguous(), h3.contiguous()
    dh1, dh3 = torch.empty_like(dh), torch.empty_like(dh)
    numel = dh.numel()
    if numel:
        block = 1024

        def grid(meta):
            return (triton.cdiv(numel, block),)

        _wrap(_swiglu_grad_kernel)[grid](dh, h1, h3, dh1, dh3, numel, BLOCK=block, num_warps=4)
    return dh1, dh3


def segment_sum(src: torch.Tensor, gather_idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """out[t] = sum of src[i] over the rows i with gather_idx[i] == t: [num_tokens, D] in src's
    dtype, summed in fp32 in a fixed order (the rows sorted by token, stably)."""
    d = src.shape[1]
    out = torch.empty((num_tokens, d), device=src.device, dtype=src.dtype)
    if num_tokens == 0 or d == 0:
        return out
    order = torch.argsort(gather_idx, stable=True)
    tokens = torch.arange(num_tokens + 1, device=src.device, dtype=gather_idx.dtype)
    bounds = torch.searchsorted(gather_idx[order], tokens).to(torch.int32)
    block_d = min(1024, triton.next_power_of_2(d))

    def grid(meta):
        return (num_tokens, triton.cdiv(d, block_d))

    _wrap(_segment_sum_kernel)[grid](src, order, bounds, out, d, src.stride(0), out.stride(0),
                                     BLOCK_D=block_d, num_warps=4)
    return out
