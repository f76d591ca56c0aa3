"""Launchers and custom ops (``fastattn::sinusoidal``, ``fastattn::rotary``) of the positional encodings, their
PyTorch references, and the dispatch."""

from __future__ import annotations

import functools

import torch
import triton

from .._backend import no_gluon_kernel, use_cuda, use_triton
from .._kernel_log import record
from . import posenc_cuda
from .attention_function import SUPPORTED_DTYPES
from .attention_launch import _new
from .posenc_kernels import _rotary_kernel, _sinusoidal_kernel


def _refusal(x: torch.Tensor) -> str | None:
    return None if x.dtype in SUPPORTED_DTYPES else f"the kernels take float16, bfloat16 and float32, not {x.dtype}"


@functools.lru_cache(maxsize=64)
def inv_freq(pairs: int, d: int, base: float, device) -> torch.Tensor:
    """float64 ``base^(-2j/d)`` for j < pairs; cached, so that a launch does not first launch its table."""
    return base ** (-2.0 * torch.arange(pairs, dtype=torch.float64, device=device) / d)


def _angles(pos: torch.Tensor, pairs: int, d: int, base: float) -> torch.Tensor:
    """float64 ``pos / base^(2j/d)`` for j < pairs, shape pos.shape + (pairs,)."""
    return pos.to(torch.float64)[..., None] * inv_freq(pairs, d, base, pos.device)


def sinusoidal_table(positions: torch.Tensor, d: int, base: float = 10000.0) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / base^(2i/d)), PE(pos, 2i+1) = cos(...), float64, shape positions.shape + (d,)."""
    a = _angles(positions, (d + 1) // 2, d, base)
    pe = torch.stack([a.sin(), a.cos()], dim=-1).flatten(-2)
    return pe[..., :d]


def rotary_reference(x, pos, base, interleaved, rot, sign=1.0, compute_dtype=torch.float64):
    """Rotate pairs of the first ``rot`` columns of x (N, H, L, E) by ``sign * angle``; pos (N|1, L). Angles
    in float64; the rotation in ``compute_dtype`` (float32 on the PyTorch path, as the kernel)."""
    a = _angles(pos, rot // 2, rot, base)[:, None]  # (N|1, 1, L, rot/2)
    cos, sin = a.cos().to(compute_dtype), (a.sin() * sign).to(compute_dtype)
    xf = x.to(compute_dtype)
    if interleaved:
        x1, x2 = xf[..., 0:rot:2], xf[..., 1:rot:2]
    else:
        x1, x2 = xf[..., : rot // 2], xf[..., rot // 2 : rot]
    y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    rotated = torch.stack([y1, y2], -1).flatten(-2) if interleaved else torch.cat([y1, y2], -1)
    return torch.cat([rotated, xf[..., rot:]], -1).to(x.dtype)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def sinusoidal_tiles(d: int) -> tuple[int, int]:
    """(rows, columns) of a program's tile: about 2048 elements, 16 per thread of 4 warps."""
    block_d = min(triton.next_power_of_2(d), 1024)
    return max(1, 2048 // block_d), block_d


def sinusoidal_fwd(x: torch.Tensor, offset: int, scale: float, base: float) -> torch.Tensor:
    x2 = _rows(x)
    y = _new(x2.shape, x.dtype, x.device)
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
    y = _new(x2.shape, x.dtype, x.device)
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


@torch.library.custom_op("fastattn::sinusoidal", mutates_args=())
def sinusoidal_op(x: torch.Tensor, offset: int, scale: float, base: float, backend: str) -> torch.Tensor:
    """``x * scale + PE(offset + l)`` by the Triton or CUDA kernel; its gradient is ``dy * scale``."""
    fwd = posenc_cuda.sinusoidal_fwd_cuda if backend == "cuda" else sinusoidal_fwd
    return fwd(x, offset, scale, base)


# Outputs are fresh contiguous tensors whatever the input strides; the fakes say the same.
sinusoidal_op.register_fake(lambda x, offset, scale, base, backend: x.new_empty(x.shape))


def _sinusoidal_setup(ctx, inputs, output):
    ctx.scale = inputs[2]


sinusoidal_op.register_autograd(
    lambda ctx, dy: (dy * ctx.scale, None, None, None, None), setup_context=_sinusoidal_setup
)


@torch.library.custom_op("fastattn::rotary", mutates_args=())
def rotary_op(
    x: torch.Tensor, pos: torch.Tensor | None, offset: int, base: float, interleaved: bool, rot: int, sign: float,
    backend: str,
) -> torch.Tensor:  # fmt: skip
    """x (N, H, L, E) turned by ``sign`` times the rotary angles. The rotation is orthogonal: its backward is
    the same op with the opposite sign."""
    fwd = posenc_cuda.rotary_fwd_cuda if backend == "cuda" else rotary_fwd
    return fwd(x, pos, offset, base, interleaved, rot, sign)


rotary_op.register_fake(lambda x, pos, offset, base, interleaved, rot, sign, backend: x.new_empty(x.shape))


def _rotary_setup(ctx, inputs, output):
    x, pos, offset, base, interleaved, rot, sign, backend = inputs
    ctx.save_for_backward(pos)
    ctx.args = (offset, base, interleaved, rot, -sign, backend)


def _rotary_backward(ctx, dy):
    (pos,) = ctx.saved_tensors
    return (torch.ops.fastattn.rotary(dy, pos, *ctx.args),) + (None,) * 7


rotary_op.register_autograd(_rotary_backward, setup_context=_rotary_setup)


def sinusoidal_forward(x: torch.Tensor, offset: int, scale: float, base: float) -> torch.Tensor:
    if use_cuda("sinusoidal_encoding", x.device, lambda: _refusal(x)):
        return torch.ops.fastattn.sinusoidal(x, offset, scale, base, "cuda")
    if use_triton("sinusoidal_encoding", x.device, _refusal(x)):
        no_gluon_kernel("sinusoidal_encoding")
        return torch.ops.fastattn.sinusoidal(x, offset, scale, base, "triton")
    record("sinusoidal_encoding", "sinusoidal_table", "torch")
    pos = torch.arange(offset, offset + x.shape[-2], device=x.device)
    return (x * scale + sinusoidal_table(pos, x.shape[-1], base).to(torch.float32)).to(x.dtype)


def rotary_forward(x, pos, offset, base, interleaved, rot) -> torch.Tensor:
    if use_cuda("apply_rotary", x.device, lambda: _refusal(x)):
        return torch.ops.fastattn.rotary(x, pos, offset, base, interleaved, rot, 1.0, "cuda")
    if use_triton("apply_rotary", x.device, _refusal(x)):
        no_gluon_kernel("apply_rotary")
        return torch.ops.fastattn.rotary(x, pos, offset, base, interleaved, rot, 1.0, "triton")
    if pos is None:
        pos = torch.arange(offset, offset + x.shape[-2], device=x.device)[None]
    record("apply_rotary", "rotary_reference", "torch")
    return rotary_reference(x, pos, base, interleaved, rot, compute_dtype=torch.float32)
