"""Workarounds for Triton's CPU interpreter (TRITON_INTERPRET=1), which the kernel tests run under.

- Its bf16 arithmetic differs from the GPU's, so bf16 kernels could not be checked on CPU.
- Triton < 3.9 turns a scalar into a Python int (a `range` bound, say) with `int(array)` on a
  one-element array, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted").

The patches are idempotent and apply only when the kernels were built interpreted
(`grouped_gemm.INTERPRETED`); compiled kernels never see them.
"""

from __future__ import annotations

import triton.language as tl


def patch_interpreter() -> None:
    _patch_bf16()
    _patch_scalar_index()


def _patch_scalar_index() -> None:
    """Scalars as Python ints from any one-element array (what triton 3.9 does)."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_unimm_index", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

    patch_lang_tensor._unimm_index = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def _patch_bf16() -> None:
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
