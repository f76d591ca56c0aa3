"""Custom ops (``fastattn::sinusoidal``, ``fastattn::rotary``) of the positional encodings and the dispatch; the
launchers (``launch``, triton) are imported when an op runs, so the PyTorch path imports no triton."""

from __future__ import annotations

import torch

from ..._backend import no_gluon_kernel, torch_path, use_cuda, use_triton
from ..._kernel_log import record
from ..common import SUPPORTED_DTYPES
from .reference import (
    rotary_full_tables,
    rotary_reference,
    rotary_tables,
    rotate_full,
    rotate_pairs,
    sinusoidal_cached,
    sinusoidal_table,
)  # fmt: skip


def _refusal(x: torch.Tensor) -> str | None:
    return None if x.dtype in SUPPORTED_DTYPES else f"the kernels take float16, bfloat16 and float32, not {x.dtype}"


@torch.library.custom_op("fastattn::sinusoidal", mutates_args=())
def sinusoidal_op(x: torch.Tensor, offset: int, scale: float, base: float, backend: str) -> torch.Tensor:
    """``x * scale + PE(offset + l)`` by the Triton or CUDA kernel; its gradient is ``dy * scale``."""
    if backend == "cuda":
        from .cuda import sinusoidal_fwd_cuda

        return sinusoidal_fwd_cuda(x, offset, scale, base)
    from .launch import sinusoidal_fwd

    return sinusoidal_fwd(x, offset, scale, base)


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
    if backend == "cuda":
        from .cuda import rotary_fwd_cuda

        return rotary_fwd_cuda(x, pos, offset, base, interleaved, rot, sign)
    from .launch import rotary_fwd

    return rotary_fwd(x, pos, offset, base, interleaved, rot, sign)


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
    if not torch_path(x.device):
        if use_cuda("sinusoidal_encoding", x.device, lambda: _refusal(x)):
            return torch.ops.fastattn.sinusoidal(x, offset, scale, base, "cuda")
        if use_triton("sinusoidal_encoding", x.device, _refusal(x)):
            no_gluon_kernel("sinusoidal_encoding")
            return torch.ops.fastattn.sinusoidal(x, offset, scale, base, "triton")
    record("sinusoidal_encoding", "sinusoidal_table", "torch")
    L = x.shape[-2]
    if base == 10000.0:  # the cached float32 table (the public op's base)
        table = sinusoidal_cached(x.shape[-1], base, x.device, offset + L)[offset : offset + L]
    else:
        table = sinusoidal_table(torch.arange(offset, offset + L, device=x.device), x.shape[-1], base).float()
    return torch.add(table, x, alpha=scale).to(x.dtype)


def rotary_forward(q, k, pos, offset, base, interleaved, rot) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k turned (each by the CUDA or Triton kernel, or PyTorch with the tables looked up once)."""
    if not torch_path(q.device):
        if use_cuda("apply_rotary", q.device, lambda: _refusal(q) or _refusal(k)):
            return tuple(torch.ops.fastattn.rotary(x, pos, offset, base, interleaved, rot, 1.0, "cuda") for x in (q, k))
        if use_triton("apply_rotary", q.device, _refusal(q) or _refusal(k)):
            no_gluon_kernel("apply_rotary")
            return tuple(
                torch.ops.fastattn.rotary(x, pos, offset, base, interleaved, rot, 1.0, "triton") for x in (q, k)
            )
    record("apply_rotary", "rotary_reference", "torch")
    L = q.shape[-2]
    if pos is None and rot == q.shape[-1]:  # every column turns: the full-width tables, two products
        cos, sin = rotary_full_tables(rot, base, q.device, offset + L, interleaved)
        cos, sin = cos[offset : offset + L], sin[offset : offset + L]
        return rotate_full(q, cos, sin, interleaved), rotate_full(k, cos, sin, interleaved)
    if pos is None:  # positions offset.. from the cached tables: the same values, fewer ops
        cos, sin = rotary_tables(rot, base, q.device, offset + L)
        cos, sin = cos[offset : offset + L], sin[offset : offset + L]
        return tuple(rotate_pairs(x, cos, sin, interleaved, rot) for x in (q, k))
    return tuple(rotary_reference(x, pos, base, interleaved, rot, compute_dtype=torch.float32) for x in (q, k))
