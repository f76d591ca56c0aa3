"""Launcher of the Gluon attention kernels (sm_90): descriptors, tiles, the persistent grid, and what they take.

Under ``TRITON_INTERPRET=1`` the launch goes through ``fastattn.testing.gluon_emulate`` on CPU tensors, as
the Triton launches go through Triton's interpreter.
"""

from __future__ import annotations

import torch

from ..._backend import interpreting
from ..._kernel_log import record
from ..common import new_buffer as _new
from .support import FAMILIES, features_of, refusal

HEAD_DIMS = FAMILIES["gluon"].head_dims
BWD_HEAD_DIMS = (64, 128, 256)
# The head-dim-256 backward (SPLIT_D: the consumers split dK/dV columns and exchange partial S^T / dP^T) is
# written and checked in the emulator, but compiles for sm_90 with 2 spilled words when causal (an index value
# kept across the partitions' register reallocation), so it is not taken until it compiles clean.
SPLIT_D_SPILLS = True
BLOCK_M = 64  # query rows per consumer warpgroup (two per program)
LOADER_REGS, CONSUMER_REGS = 24, 240  # setmaxnreg budgets: the loader warp's, the second consumer's (FA3's)
BWD_BLOCKS = (32, 128)  # backward: queries per step (dK, dV of 64 keys x 128 dims leave room for 32), keys


def bwd_blocks(e: int) -> tuple[int, int, bool]:
    """(queries per step, keys per program, SPLIT_D): at head dim 256 the two consumers split the columns of
    dK and dV of 64 keys (each consumer's dK, dV stay 64 x 128) over steps of 16 queries."""
    return (16, 64, True) if e == 256 else (*BWD_BLOCKS, False)


BWD_STAGES = 2
EMULATED_SMS = 2  # programs of the persistent grid under the emulator (each walks several tiles)


def gluon_refusal(
    q, k, v, bias, dropout_p: float, alibi, rotary, softcap=None, sinks=None, user_mods=False
) -> str | None:
    """Why the Gluon forward cannot take this case (the Triton kernels then run), or None. Decided from shapes,
    dtypes and features (``attention_support``), so it also holds while torch.compile traces; the data layout
    is checked when the op runs (``layout_refusal``)."""
    why = refusal("gluon", q, v, features_of(bias, dropout_p, alibi, rotary, softcap, sinks, user_mods=user_mods))
    if why is None and not interpreting():
        if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
            return "the Gluon kernels are written for sm_90 (Hopper) GPUs"
    return why


def layout_refusal(**tensors) -> str | None:
    """Why the copy engine cannot take these tensors (the Triton kernels then run), or None: unit last stride,
    16-byte aligned base and strides, no broadcast (stride-0) dims. Read when the op runs (data pointers)."""
    for name, t in tensors.items():
        strides = t.stride()[:-1]
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s == 0 or s * t.element_size() % 16 for s in strides):
            return f"the {name} is not laid out for the copy engine (unit last stride, 16-byte aligned strides)"
    return None


def _tiles(e: int) -> tuple[int, int]:
    """(BLOCK_N, STAGES): a 64 x 256 fp32 accumulator leaves registers for 64-key score tiles only."""
    return {64: (128, 3), 128: (128, 2), 256: (64, 2)}[e]


def _descriptor(t: torch.Tensor, rows: int):
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    block = [1, 1, rows, t.shape[-1]]
    dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for(block[2:], dtype)  # the shared tile is [rows, head dim]
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


def _programs(tiles: int, device: torch.device) -> int:
    if device.type == "cuda":
        return min(tiles, torch.cuda.get_device_properties(device).multi_processor_count)
    return min(tiles, EMULATED_SMS)


def _runnable(kernel):
    """The kernel, or under ``TRITON_INTERPRET=1`` its emulation on CPU tensors."""
    if interpreting():
        from ...testing import gluon_emulate

        return gluon_emulate(kernel)
    return kernel


def attention_fwd_gluon(q, k, v, scale: float, mask, softcap=None, sinks=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of the canonical inputs (see ``attention.function``); ``mask`` a ``MaskSpec``; ``softcap``
    and float32 ``sinks`` (H,) as in the Triton kernels."""
    from .gluon_fwd import LOG2E, attention_fwd_gluon_kernel

    Z, H, L, E = q.shape
    S = k.shape[2]
    out, lse = _new((Z, H, L, E), q.dtype, q.device), _new((Z, H, L), torch.float32, q.device)
    block_n, stages = _tiles(E)
    tiles = -(-L // (2 * BLOCK_M)) * Z * H
    grid = (_programs(tiles, q.device),)
    record("attention_fwd", "attention_fwd_gluon_kernel", "gluon")
    _runnable(attention_fwd_gluon_kernel)[grid](
        _descriptor(q, BLOCK_M), _descriptor(k, block_n), _descriptor(v, block_n), out, lse,
        lse if sinks is None else sinks, out.stride(0), out.stride(1), out.stride(2), Z, H, L, S, H // k.shape[1],
        scale * LOG2E.value, scale / (softcap or 1.0), (softcap or 1.0) * LOG2E.value, mask.offset, mask.left or 0,
        mask.right or 0, HAS_LEFT=mask.left is not None, HAS_RIGHT=mask.right is not None,
        HAS_SOFTCAP=softcap is not None, HAS_SINKS=sinks is not None, HEAD_DV=E, BLOCK_M=BLOCK_M,
        BLOCK_N=block_n, STAGES=stages, LOADER_REGS=LOADER_REGS, CONSUMER_REGS=CONSUMER_REGS, num_warps=4,
    )  # fmt: skip
    return out, lse


def gluon_bwd_refusal(do, q, k, v, softcap=None, sinks=None) -> str | None:
    """Why the Gluon backward cannot take this case (the Triton backward then runs, from the Gluon forward's
    output and LSE), or None."""
    if softcap is not None or sinks is not None:
        return "the Gluon backward has no soft-capping or sinks yet (its forward has them)"
    if q.shape[-1] not in BWD_HEAD_DIMS:
        return f"the Gluon backward takes head dims {BWD_HEAD_DIMS}, not {q.shape[-1]}"
    if q.shape[-1] == 256 and SPLIT_D_SPILLS:
        return "the Gluon backward at head dim 256 still spills registers on sm_90 (2 words when causal)"
    return layout_refusal(query=q, key=k, value=v, output_gradient=do)


def attention_bwd_gluon(do, q, k, v, out, lse, scale: float, mask) -> tuple[torch.Tensor, ...]:
    """``(dq, dk, dv)`` of the canonical inputs, from the forward's ``out`` and ``lse``."""
    import triton

    from .gluon_bwd import LOG2E, attention_bwd_gluon_kernel

    Z, H, L, E = q.shape
    HK, S = k.shape[1], k.shape[2]
    from .launch import _rows, rowsum_do_o

    delta = rowsum_do_o(out, do, (Z, H, L), _rows(None, q, H, L))
    dq_acc = torch.zeros((Z, H, L, E), dtype=torch.float32, device=q.device)  # summed into: zeros, not poison
    dk, dv = _new(k.shape, k.dtype, k.device), _new(v.shape, v.dtype, v.device)
    block_m, block_n, split_d = bwd_blocks(E)
    key_rows = block_n if split_d else block_n // 2
    record("attention_bwd", "attention_bwd_gluon_kernel", "gluon")
    _runnable(attention_bwd_gluon_kernel)[(triton.cdiv(S, block_n), Z * HK)](
        _descriptor(q, block_m), _descriptor(do, block_m), _descriptor(k, key_rows), _descriptor(v, key_rows),
        lse, delta, dq_acc, dk, dv, *dq_acc.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], H, L, S, H // HK,
        scale * LOG2E.value, scale, mask.offset, mask.left or 0, mask.right or 0, HAS_LEFT=mask.left is not None,
        HAS_RIGHT=mask.right is not None, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=BWD_STAGES, SPLIT_D=split_d,
        LOADER_REGS=LOADER_REGS, CONSUMER_REGS=CONSUMER_REGS, num_warps=4,
    )  # fmt: skip
    record("attention_bwd", "to", "torch")  # dQ's float32 sums in q's dtype
    return dq_acc.to(q.dtype), dk, dv
