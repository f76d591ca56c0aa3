"""Fixes for Triton's CPU interpreter, applied only under ``TRITON_INTERPRET=1``.

Triton 3.6's interpreter keeps bfloat16 tensors as raw uint16 bits and
- hands them to ``np.matmul`` as integers, so every bf16 ``tl.dot`` returns garbage. Widening bf16 to float32
  by moving the bits up 16 places is exact, and float32 products with float32 accumulation are what the tensor
  cores compute for bf16 operands;
- truncates float32 -> bfloat16 in ``.to()``, where the GPU rounds to nearest even, doubling the rounding error.
With both fixed the interpreter runs the real kernel code with the GPU's numerics.
"""

from __future__ import annotations

import numpy as np


def _widen_bf16(handle, tl, TensorHandle):
    if handle.dtype.scalar != tl.bfloat16:
        return handle
    return TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)


def _round_to_bf16(data: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (NaN stays NaN), as the GPU converts."""
    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
    return np.where(np.isnan(data), np.uint32(0x7FC0), rounded).astype(np.uint16)


def patch_bf16() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_fastattn_bf16", False):
        return
    original = builder.create_dot
    original_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_round_to_bf16(src.data), tl.bfloat16)
        return original_cast(self, src, dst_type)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a = _widen_bf16(a, tl, interpreter.TensorHandle)
        b = _widen_bf16(b, tl, interpreter.TensorHandle)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._fastattn_bf16 = True
    builder.create_dot = create_dot
    builder.cast_impl = cast_impl  # the create_fp_trunc/_ext/... entries dispatch through self.cast_impl


def patch_if_interpreting() -> None:
    """Apply the fixes when Triton's interpreter runs the kernels: every Triton launcher module calls this when
    it is imported, so that no kernel's numerics depend on which launcher was imported first."""
    from .._backend import interpreting

    if interpreting():
        patch_bf16()
