"""Layer norm / RMSNorm (optionally after ``dropout(x) + residual``) as the custom ops ``fastattn::norm_fwd`` /
``norm_bwd`` over the Triton and CUDA launchers, and the dispatch between them and PyTorch's own ops."""

from __future__ import annotations

import math

import torch

from ... import _torch
from ..._backend import no_gluon_kernel, use_cuda, use_triton
from ..._kernel_log import record
from ..common import SUPPORTED_DTYPES, dropout_seed
from .cuda import cuda_refusal, norm_bwd_cuda, norm_fwd_cuda


# Layer norm / RMSNorm over the trailing n elements, optionally of dropout(x) + residual (the Triton kernels
# only). Returns (y, s, mean, rstd): s is the fused sum (an empty tensor when there is none).
@torch.library.custom_op("fastattn::norm_fwd", mutates_args=())
def norm_fwd_op(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, bias: torch.Tensor | None,
    seed: torch.Tensor, n: int, eps: float, is_rms: bool, dropout_p: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    if backend == "cuda":
        y, mean, rstd = norm_fwd_cuda(x, n, weight, bias, eps, is_rms)
        return y, x.new_empty(0), mean, rstd
    from .launch import norm_fwd  # triton: only once a kernel runs

    y, s, mean, rstd = norm_fwd(x, n, weight, bias, eps, is_rms, residual, dropout_p, int(seed.item()))
    return y, (x.new_empty(0) if s is None else s), mean, rstd


@norm_fwd_op.register_fake
def _(x, residual, weight, bias, seed, n, eps, is_rms, dropout_p, backend):
    rows = x.numel() // n
    fused = residual is not None or dropout_p > 0.0
    stats = x.new_empty((rows,), dtype=torch.float32)
    return x.new_empty(x.shape), (x.new_empty(x.shape) if fused else x.new_empty(0)), stats, torch.empty_like(stats)


@torch.library.custom_op("fastattn::norm_bwd", mutates_args=())
def norm_bwd_op(
    dy: torch.Tensor, ds_out: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor | None,
    bias: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor, seed: torch.Tensor, n: int, is_rms: bool,
    has_residual: bool, dropout_p: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dx, dresidual, dweight, dbias)``, empty tensors for those that do not exist."""
    if backend == "cuda":
        dx, dw, db = norm_bwd_cuda(dy, s, n, weight, bias, mean, rstd, is_rms)
        dr = None
    else:
        from .launch import norm_bwd

        dx, dr, dw, db = norm_bwd(
            dy, s, n, weight, bias, mean, rstd, is_rms, ds_out, has_residual, dropout_p, int(seed.item())
        )
    # A fresh empty tensor for each missing output: custom-op outputs may not alias one another.
    return tuple(s.new_empty(0) if t is None else t for t in (dx, dr, dw, db))


@norm_bwd_op.register_fake
def _(dy, ds_out, s, weight, bias, mean, rstd, seed, n, is_rms, has_residual, dropout_p, backend):
    return (
        s.new_empty(s.shape), s.new_empty(s.shape) if has_residual else s.new_empty(0),
        s.new_empty(0) if weight is None else weight.new_empty(weight.shape),
        s.new_empty(0) if bias is None else bias.new_empty(bias.shape),
    )  # fmt: skip


def _norm_setup_context(ctx, inputs, output):
    x, residual, weight, bias, seed, n, eps, is_rms, dropout_p, backend = inputs
    y, s, mean, rstd = output
    ctx.fused = residual is not None or dropout_p > 0.0
    ctx.save_for_backward(s if ctx.fused else x, weight, bias, mean, rstd, seed)
    ctx.args = (n, is_rms, residual is not None, dropout_p, backend)
    ctx.mark_non_differentiable(mean, rstd)


def _norm_backward(ctx, dy, ds_out, _dmean, _drstd):
    s, weight, bias, mean, rstd, seed = ctx.saved_tensors
    dx, dr, dw, db = torch.ops.fastattn.norm_bwd(
        dy, ds_out if ctx.fused else None, s, weight, bias, mean, rstd, seed, *ctx.args
    )
    has_residual = ctx.args[2]
    return (
        dx, dr if has_residual else None, None if weight is None else dw, None if bias is None else db,
    ) + (None,) * 6  # fmt: skip


norm_fwd_op.register_autograd(_norm_backward, setup_context=_norm_setup_context)


def _refusal(x: torch.Tensor, params) -> str | None:
    if x.dtype not in SUPPORTED_DTYPES:
        return f"the norm kernels take float16, bfloat16 and float32, not {x.dtype}"
    if any(p is not None and p.dtype not in SUPPORTED_DTYPES for p in params):
        return "weight and bias must be float16, bfloat16 or float32 for the kernels"
    return None


def _autocast_dtype(x: torch.Tensor, shape, is_rms: bool) -> torch.dtype | None:
    """Under autocast, the dtype torch's own op would compute in (CUDA puts layer norm on its float32 list; CPU
    autocast leaves norms alone), read off torch's op on an empty tensor; None without autocast."""
    if not torch.is_autocast_enabled(x.device.type):
        return None
    probe = x.new_empty((0, *shape))
    return (_torch.rms_norm(probe, shape) if is_rms else _torch.layer_norm(probe, shape)).dtype


def _torch_norm(x, shape, weight, bias, eps, is_rms):
    record("norm_fwd", "rms_norm" if is_rms else "layer_norm", "torch")
    if is_rms:
        return _torch.rms_norm(x, shape, weight, eps)
    return _torch.layer_norm(x, shape, weight, bias, eps)


def norm_forward(
    op: str,
    x: torch.Tensor,
    shape: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float | None,
    is_rms: bool,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
):
    """``y`` (or ``(y, s)`` for the fused add) through the CUDA or Triton kernels when the backend allows, else
    torch's ops."""
    fused = residual is not None
    p = dropout_p if training else 0.0
    target = _autocast_dtype(x, shape, is_rms)
    if target is not None and target != x.dtype:
        x, residual = x.to(target), None if residual is None else residual.to(target)
        weight, bias = (t if t is None or t.dtype == torch.float32 else t.to(target) for t in (weight, bias))
    if eps is None:  # RMSNorm's default: the epsilon of the dtype it computes in (after autocast), as torch
        eps = torch.finfo(x.dtype).eps
    w = None if weight is None else weight.reshape(-1)
    b = None if bias is None else bias.reshape(-1)
    n = math.prod(shape)
    backend = None
    if use_cuda(op, x.device, lambda: cuda_refusal(x, weight, bias, n, fused)):
        backend = "cuda"
    elif use_triton(op, x.device, _refusal(x, (weight, bias, residual))):
        no_gluon_kernel(op)
        backend = "triton"
    if backend is not None:
        q = p if fused else 0.0
        y, s, _, _ = torch.ops.fastattn.norm_fwd(x, residual, w, b, dropout_seed(q), n, eps, is_rms, q, backend)
        return (y, s) if fused else y
    if not fused:
        return _torch_norm(x, shape, weight, bias, eps, is_rms)
    s = _torch.dropout(x, p) + residual if p > 0.0 else x + residual
    return _torch_norm(s, shape, weight, bias, eps, is_rms), s
