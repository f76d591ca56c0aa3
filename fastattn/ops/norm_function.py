"""Layer norm / RMSNorm (optionally after ``dropout(x) + residual``) as an autograd Function over the Triton
launchers, and the dispatch between it and PyTorch's own ops."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._backend import use_cuda, use_triton
from .attention_function import SUPPORTED_DTYPES, _dropout_seed
from .norm_cuda import CudaNorm, cuda_refusal
from .norm_launch import norm_bwd, norm_fwd


class TritonNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, n: int, eps: float, is_rms: bool, dropout_p: float):
        seed = _dropout_seed() if dropout_p > 0.0 else 0
        y, s, mean, rstd = norm_fwd(x, n, weight, bias, eps, is_rms, residual, dropout_p, seed)
        ctx.save_for_backward(x if s is None else s, weight, bias, mean, rstd)
        ctx.n, ctx.is_rms, ctx.dropout_p, ctx.seed = n, is_rms, dropout_p, seed
        ctx.has_residual = residual is not None
        return y if s is None else (y, s)

    @staticmethod
    def backward(ctx, dy, ds_out=None):
        s, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dr, dw, db = norm_bwd(
            dy, s, ctx.n, weight, bias, mean, rstd, ctx.is_rms, ds_out, ctx.has_residual, ctx.dropout_p, ctx.seed
        )
        dw = None if dw is None else dw.view(weight.shape)
        db = None if db is None else db.view(bias.shape)
        return dx, dr, dw, db, None, None, None, None


def _refusal(x: torch.Tensor, params) -> str | None:
    if x.dtype not in SUPPORTED_DTYPES:
        return f"the norm kernels take float16, bfloat16 and float32, not {x.dtype}"
    if any(p is not None and p.dtype not in SUPPORTED_DTYPES for p in params):
        return "weight and bias must be float16, bfloat16 or float32 for the kernels"
    return None


def _torch_norm(x, shape, weight, bias, eps, is_rms):
    if is_rms:
        return F.rms_norm(x, shape, weight, eps)
    return F.layer_norm(x, shape, weight, bias, eps)


def norm_forward(
    op: str,
    x: torch.Tensor,
    shape: tuple[int, ...],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    is_rms: bool,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
):
    """``y`` (or ``(y, s)`` for the fused add) through the CUDA or Triton kernels when the backend allows, else
    torch's ops."""
    fused = residual is not None
    p = dropout_p if training else 0.0
    w = None if weight is None else weight.reshape(-1)
    b = None if bias is None else bias.reshape(-1)
    n = math.prod(shape)
    if use_cuda(op, x.device, lambda: cuda_refusal(x, weight, bias, n, fused)):
        return CudaNorm.apply(x, w, b, n, eps, is_rms)
    if use_triton(op, x.device, _refusal(x, (weight, bias, residual))):
        return TritonNorm.apply(x, residual, w, b, n, eps, is_rms, p if fused else 0.0)
    if not fused:
        return _torch_norm(x, shape, weight, bias, eps, is_rms)
    s = F.dropout(x, p) + residual if p > 0.0 else x + residual
    return _torch_norm(s, shape, weight, bias, eps, is_rms), s
