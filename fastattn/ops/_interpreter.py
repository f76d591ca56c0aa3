"""A fix for Triton's CPU interpreter, applied only under ``TRITON_INTERPRET=1``.

Triton 3.6's interpreter keeps bfloat16 tensors as raw uint16 bits and hands them to ``np.matmul`` as
integers, so every bf16 ``tl.dot`` returns garbage there. Widening bf16 to float32 by moving the bits up 16
places is exact, and float32 products with float32 accumulation are what the tensor cores compute for bf16
operands, so the interpreter then runs the real kernel code with the real numerics.
"""

from __future__ import annotations

import numpy as np


def _widen_bf16(handle, tl, TensorHandle):
    if handle.dtype.scalar != tl.bfloat16:
        return handle
    return TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)


def patch_bf16_dot() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_fastattn_bf16", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a = _widen_bf16(a, tl, interpreter.TensorHandle)
        b = _widen_bf16(b, tl, interpreter.TensorHandle)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._fastattn_bf16 = True
    builder.create_dot = create_dot
