"""Compile every Triton kernel specialization at every tile config for sm90, without a GPU.

    python -m unimm.kernels.sm90_check

Triton's compiler (frontend, LLVM and its bundled ptxas) runs on any machine: this builds the
cubins a Hopper GPU would run, with the argument specializations the JIT derives at run time
(unit strides and 16-byte alignment of contiguous bf16 tensors), and reports per kernel and
config the shared memory, whether the K loop was software-pipelined (async copies), whether
the MMAs are Hopper's wgmma and whether the weight-TMA configs load through the copy engine.
A compile error or a config over the 227 KB of shared memory shows up here before a GPU session spends its time on it. It checks the installed Triton; the GPU
image's may differ. Not for TRITON_INTERPRET=1 (the interpreter compiles nothing).
"""

from __future__ import annotations

import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import grouped_gemm as gg
from .launch import CONFIGS, DUAL_DW_CONFIGS, TileConfig, with_weight_tma

SM90 = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 227 * 1024
BF16 = "*bf16"

# (kernel, pointer types, constexpr arguments, arguments that are 1 at run time, configs, kind)
_MM_PTRS = {**{n: BF16 for n in ("a_ptr", "b_ptr", "a2_ptr", "b2_ptr", "c_ptr")}, "gather_ptr": "*i64", "offsets_ptr": "*i32"}
_GU_PTRS = {**{n: BF16 for n in ("x_ptr", "w1_ptr", "w3_ptr", "h_ptr", "h1_ptr", "h3_ptr")}, "gather_ptr": "*i64",
            "offsets_ptr": "*i32"}
_DW_PTRS = {**{n: BF16 for n in ("a_ptr", "b_ptr", "b2_ptr")}, "c_ptr": "*fp32", "c2_ptr": "*fp32", "gather_ptr": "*i64",
            "offsets_ptr": "*i32", "order_ptr": "*i32"}
_MM_TMA = with_weight_tma(CONFIGS["mm"])
_GU_TMA = with_weight_tma(CONFIGS["gate_up"])
CASES = [
    ("forward (gather)", gg._grouped_mm_kernel, _MM_PTRS, dict(HAS_GATHER=True, DUAL=False, K_MAJOR=False), ("stride_ak", "stride_bn", "stride_cn"), CONFIGS["mm"] + _MM_TMA, "mm"),
    ("input grad, dual", gg._grouped_mm_kernel, _MM_PTRS, dict(HAS_GATHER=False, DUAL=True, K_MAJOR=True), ("stride_ak", "stride_bk", "stride_cn"), CONFIGS["mm"] + _MM_TMA, "mm"),
    ("gate/up (gather)", gg._gate_up_kernel, _GU_PTRS, dict(HAS_GATHER=True), ("stride_xk", "stride_wn", "stride_hn"), CONFIGS["gate_up"] + _GU_TMA, "gate_up"),
    ("weight grad, split 2", gg._weight_grad_kernel, _DW_PTRS, dict(HAS_GATHER=True, DUAL=False, SPLIT=2), ("stride_ak", "stride_bn", "stride_cn"), CONFIGS["dw"], "dw"),
    ("weight grad, dual", gg._weight_grad_kernel, {**_DW_PTRS, "c_ptr": BF16, "c2_ptr": BF16}, dict(HAS_GATHER=True, DUAL=True, SPLIT=1), ("stride_ak", "stride_bn", "stride_cn"), DUAL_DW_CONFIGS, "dw"),
]


def compile_one(fn, ptrs: dict, consts: dict, ones, config: TileConfig, kind: str) -> dict:
    consts = {**consts, "PRECISION": "ieee", **config.meta(kind), **{name: 1 for name in ones}}
    if "BLOCK_E" in fn.arg_names:
        consts["BLOCK_E"] = 256
    names = fn.arg_names
    signature = {n: "constexpr" if n in consts else ptrs.get(n, "i32") for n in names}
    # what the JIT assumes of torch's allocations: 16-byte aligned pointers, strides and widths
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
               if n not in consts and (n in ptrs or n.startswith("stride") or n in ("N", "K"))}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=aligned)
    start = time.perf_counter()
    kernel = triton.compile(src, target=SM90, options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    ttgir = kernel.asm["ttgir"]
    return dict(shared=kernel.metadata.shared, pipelined="async_copy" in ttgir, wgmma="warp_group_dot" in ttgir,
                tma="async_tma_copy" in ttgir, seconds=time.perf_counter() - start)


def main() -> int:
    if gg.INTERPRETED:
        sys.exit("sm90_check: TRITON_INTERPRET=1 is set; unset it (the interpreter compiles nothing)")
    print(f"triton {triton.__version__}, target sm90")
    ok = True
    for what, fn, ptrs, consts, ones, configs, kind in CASES:
        for config in configs:
            tile = (f"{config.BLOCK_M}x{config.BLOCK_N}x{config.BLOCK_K} w{config.num_warps} s{config.num_stages}"
                    + (" tma" if config.WEIGHT_TMA else ""))
            try:
                r = compile_one(fn, ptrs, consts, ones, config, kind)
            except Exception as err:  # noqa: BLE001  (report every config, then fail)
                ok = False
                print(f"{what:22} {tile:20} FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200]}", flush=True)
                continue
            good = r["pipelined"] and r["wgmma"] and r["shared"] <= SHARED_LIMIT and r["tma"] == config.WEIGHT_TMA
            ok &= good
            print(f"{what:22} {tile:24} shared {r['shared'] / 1024:6.1f} KB  pipelined {r['pipelined']!s:5}  "
                  f"wgmma {r['wgmma']!s:5}  tma {r['tma']!s:5}  {r['seconds']:.1f} s{'' if good else '  <- check'}",
                  flush=True)
    print("all configs compile for sm90" if ok else "some configs failed or are off the fast path")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
