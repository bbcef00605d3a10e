"""Workaround for Triton's CPU interpreter (TRITON_INTERPRET=1), which the kernel tests run under.

Triton 3.9's interpreter does bf16 arithmetic unlike the GPU, so bf16 kernels could not be
checked on CPU without it. The patch is idempotent and applies only when the kernels were
built interpreted (`grouped_gemm.INTERPRETED`); compiled kernels never see it.
"""

from __future__ import annotations

import triton.language as tl


def patch_interpreter_bf16() -> None:
    """Make the interpreter's bf16 arithmetic what the GPU does (triton 3.9's interpreter differs):

    - tl.dot hands bf16 operands, stored as uint16, to np.matmul as integers: widen them to fp32
      first (exact), as the tensor cores multiply bf16 exactly and accumulate in fp32;
    - fp32 -> bf16 casts truncate: round to nearest even, the GPU's default for `.to(tl.bfloat16)`.
    """
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_unimm_bf16", False):
        return
    original_dot, original_cast = builder.create_dot, builder.cast_impl

    def widen(t):
        if t.dtype == tl.bfloat16:
            return interpreter.TensorHandle((t.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return t

    def create_dot(self, a, b, d, *args, **kwargs):
        return original_dot(self, widen(a), widen(b), d, *args, **kwargs)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return original_cast(self, src, dst_type)

    create_dot._unimm_bf16 = True
    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    # the cast entry points are lambdas bound to cast_impl at class creation: rebind them
    for name in ("create_fp_trunc", "create_fp_ext"):
        setattr(builder, name, lambda self, src, dst_type: self.cast_impl(src, dst_type))
