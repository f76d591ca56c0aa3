"""The attention op as an autograd Function over the Triton launchers, and the backend dispatch.

Canonical layout here: q ``(Z, H, L, E)``, k ``(Z, H_kv, S, E)``, v ``(Z, H_kv, S, Ev)``, ``bias`` None or a
``(Z, H, L, S)`` view (broadcast strides allowed), float or bool. The public functions in
``fastattn.attention`` bring their arguments to this form.
"""

from __future__ import annotations

import torch

from .._backend import use_cuda, use_triton
from .attention_cuda import CudaAttention, cuda_refusal, key_padding_mask
from .attention_launch import MaskSpec, RotarySpec, attention_bwd, attention_fwd
from .attention_reference import attention_reference

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def triton_refusal(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these inputs, or None if they can."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"the kernels take float16, bfloat16 and float32, not {q.dtype}"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dims above {MAX_HEAD_DIM} are not compiled (query {q.shape[-1]}, value {v.shape[-1]})"
    return None


def _dropout_seed() -> int:
    # From torch's default CPU generator: reproducible under torch.manual_seed, and no device sync.
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


class TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, scale: float, mask: MaskSpec, dropout_p: float, alibi=None, rotary=None):
        seed = _dropout_seed() if dropout_p > 0.0 else 0
        out, lse = attention_fwd(q, k, v, bias, scale, mask, dropout_p, seed, alibi=alibi, rotary=rotary)
        ctx.save_for_backward(q, k, v, bias, out, lse, alibi)
        ctx.scale, ctx.mask, ctx.dropout_p, ctx.seed, ctx.rotary = scale, mask, dropout_p, seed, rotary
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, bias, out, lse, alibi = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        rot = ctx.rotary
        if rot is not None:  # the backward kernels take rotated q/k; their gradients turn back afterwards
            q, k = _rotate(q, rot, _q_offset(rot, q, k), 1.0), _rotate(k, rot, rot.offset, 1.0)
        dq, dk, dv, dbias = attention_bwd(
            dout, q, k, v, out, lse, bias, ctx.scale, ctx.mask, ctx.dropout_p, ctx.seed, bias_grad=bias_grad,
            alibi=alibi,
        )  # fmt: skip
        if rot is not None:
            dq, dk = _rotate(dq, rot, _q_offset(rot, q, k), -1.0), _rotate(dk, rot, rot.offset, -1.0)
        return dq, dk, dv, dbias, None, None, None, None, None


def attention_forward(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    mask: MaskSpec,
    dropout_p: float,
    alibi: torch.Tensor | None = None,
    rotary: RotarySpec | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` through the CUDA kernels (``cuda`` backend) or the Triton kernels when the backend and the
    case allow, else through the PyTorch reference (float32 compute for half inputs)."""
    if use_cuda(op, q.device, lambda: cuda_refusal(q, k, v, bias, scale, alibi, rotary)):
        seed = _dropout_seed() if dropout_p > 0.0 else 0
        return CudaAttention.apply(q, k, v, key_padding_mask(bias), scale, mask, dropout_p, seed)
    if use_triton(op, q.device, triton_refusal(q, v)):
        return TritonAttention.apply(q, k, v, bias, scale, mask, dropout_p, alibi, rotary)
    if rotary is not None:
        q, k = (
            _rotate(q, rotary, _q_offset(rotary, q, k), 1.0, kernel=False),
            _rotate(k, rotary, rotary.offset, 1.0, kernel=False),
        )
    return attention_reference(q, k, v, bias, scale, mask, dropout_p, alibi=alibi)


def _q_offset(rot: RotarySpec, q: torch.Tensor, k: torch.Tensor) -> int:
    return rot.offset + k.shape[2] - q.shape[2]  # query i is aligned with key i + S - L


def _rotate(x: torch.Tensor, rot: RotarySpec, offset: int, sign: float, kernel: bool = True) -> torch.Tensor:
    """x (N, H, L, E) turned by ``sign`` times the rotary angles at positions offset + l."""
    from .posenc_function import rotary_fwd, rotary_reference  # built on this module's dtypes

    if kernel:
        return rotary_fwd(x, None, offset, rot.base, rot.interleaved, rot.dim, sign)
    pos = torch.arange(offset, offset + x.shape[2], device=x.device)[None]
    return rotary_reference(x, pos, rot.base, rot.interleaved, rot.dim, sign, compute_dtype=torch.float32)
