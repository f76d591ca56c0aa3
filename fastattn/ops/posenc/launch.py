"""Launchers of the positional-encoding Triton kernels."""

from __future__ import annotations

import torch
import triton

from ..._kernel_log import record
from .._interpreter import patch_if_interpreting
from ..common import new_buffer
from ..common import rows2d as _rows
from .kernels import _rotary_kernel, _sinusoidal_kernel
from .reference import inv_freq

patch_if_interpreting()


def sinusoidal_tiles(d: int) -> tuple[int, int]:
    """(rows, columns) of a program's tile: about 2048 elements, 16 per thread of 4 warps."""
    block_d = min(triton.next_power_of_2(d), 1024)
    return max(1, 2048 // block_d), block_d


def sinusoidal_fwd(x: torch.Tensor, offset: int, scale: float, base: float) -> torch.Tensor:
    x2 = _rows(x)
    y = new_buffer(x2.shape, x.dtype, x.device)
    L, D = x.shape[-2], x.shape[-1]
    block_r, block_d = sinusoidal_tiles(D)
    if x2.shape[0] > 0:
        record("sinusoidal_encoding", "_sinusoidal_kernel", "triton")
        _sinusoidal_kernel[(triton.cdiv(x2.shape[0], block_r), triton.cdiv(D, block_d))](
            x2, y, inv_freq((D + 1) // 2, D, base, x.device), x2.stride(0), y.stride(0), x2.shape[0], L, D, offset,
            scale,
            BLOCK_R=block_r, BLOCK_D=block_d,
        )  # fmt: skip
    return y.view(x.shape)


def rotary_fwd(x, pos, offset, base, interleaved, rot, sign) -> torch.Tensor:
    """x (N, H, L, E); pos None or int64 (N|1, L)."""
    N, H, L, E = x.shape
    x2 = _rows(x)
    y = new_buffer(x2.shape, x.dtype, x.device)
    block_p = triton.next_power_of_2(max(rot // 2, 1))
    block_e = triton.next_power_of_2(E - rot) if E > rot else 0
    block_r = max(1, min(64, 2048 // block_p))
    has_pos = pos is not None
    p = pos if has_pos else x2
    if x2.shape[0] > 0:
        record("apply_rotary", "_rotary_kernel", "triton")
        _rotary_kernel[(triton.cdiv(x2.shape[0], block_r),)](
            x2, y, p, inv_freq(max(rot // 2, 1), rot, base, x.device), x2.stride(0), y.stride(0),
            (pos.stride(0) if has_pos and pos.shape[0] > 1 else 0), x2.shape[0], H, L, E, rot, offset, sign,
            HAS_POS=has_pos, INTERLEAVED=interleaved, BLOCK_R=block_r, BLOCK_P=block_p, BLOCK_E=block_e,
        )  # fmt: skip
    return y.view(x.shape)
