"""Launchers and autograd of the CUDA C++ attention kernels (``csrc/attention_*.cu``), and which cases they take.

They take what FlashAttention-2's kernels take: float16/bfloat16, head dim 64 or 128 (query and value alike),
grouped-query heads, the visibility rule of ``MaskSpec`` (causal either alignment, sliding windows), a key
padding mask (a bool mask broadcast over heads and queries), dropout with the Triton kernels' Philox stream,
and the log-sum-exp. Everything else (float biases, other masks, ALiBi, fused rotary, other head dims, fp32)
is for the Triton kernels.
"""

from __future__ import annotations

import torch

from .. import cuda_ext
from ..common import new_buffer as _new
from .spec import MaskSpec, RotarySpec
from .support import FAMILIES, features_of, refusal

HEAD_DIMS = FAMILIES["cuda"].head_dims


def key_padding_mask(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The ``(Z, S)`` bool view of ``bias`` when it is a key padding mask (broadcast over heads and queries,
    unit stride along keys), else None."""
    if bias is None or bias.dtype != torch.bool:
        return None
    if any(bias.shape[d] > 1 and bias.stride(d) != 0 for d in (1, 2)) or (bias.shape[3] > 1 and bias.stride(3) != 1):
        return None
    return bias[:, 0, 0, :]


def cuda_refusal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    alibi: torch.Tensor | None,
    rotary: RotarySpec | None,
    dropout_p: float = 0.0,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    user_mods: bool = False,
) -> str | None:
    """Why the CUDA attention kernels cannot take this case, or None if they can (``attention_support``)."""
    used = features_of(bias, dropout_p, alibi, rotary, softcap, sinks, key_padding_mask(bias) is not None, user_mods)
    why = refusal("cuda", q, v, used)
    if why is not None:
        return why
    if not scale > 0.0:
        return f"they take a positive scale, not {scale}"
    if q.shape[0] * q.shape[1] > 65535:
        return f"batch x heads ({q.shape[0] * q.shape[1]}) is above one grid dimension (65535)"
    return None


def _args(q, k, v, key_mask, scale: float, mask: MaskSpec, dropout_p: float, seed: int, seqlens_k=None) -> list:
    Z, H, L, E = q.shape
    km = 0 if key_mask is None else key_mask.data_ptr()
    km_stride = 0 if key_mask is None or key_mask.shape[0] == 1 else key_mask.stride(0)
    return [
        [Z, H, k.shape[1], L, k.shape[2], E],
        scale,
        [mask.offset, mask.left or 0, mask.right or 0],
        [mask.left is not None, mask.right is not None],
        cuda_ext.ptr(seqlens_k),  # per-batch key lengths (int32), or 0: the ops give key padding as a mask
        km,
        km_stride,
        dropout_p,
        seed,
        0,
        cuda_ext.DTYPE_CODES[q.dtype],
    ]


def _strides(*tensors: torch.Tensor) -> list:
    return [list(t.stride()[:3]) for t in tensors]


def attention_fwd_cuda(
    q,
    k,
    v,
    key_mask,
    scale: float,
    mask: MaskSpec,
    dropout_p: float = 0.0,
    seed: int = 0,
    seqlens_k: torch.Tensor | None = None,
):
    """``out (Z, H, L, E)`` in q's dtype and ``lse (Z, H, L)`` float32 (natural log), by the CUDA kernel; keys
    at or past ``seqlens_k[z]`` (int32, when given) take no part."""
    q, k, v = (cuda_ext.aligned_rows(t) for t in (q, k, v))
    Z, H, L, E = q.shape
    out = _new((Z, H, L, E), q.dtype, q.device)
    lse = _new((Z, H, L), torch.float32, q.device)
    code = cuda_ext.launch(q, "attention_forward",
        tuple(cuda_ext.ptr(t) for t in (q, k, v, out, lse)), _strides(q, k, v, out),
        *_args(q, k, v, key_mask, scale, mask, dropout_p, seed, seqlens_k), cuda_ext.stream(q),
        reads={"q": q, "k": k, "v": v, "key_mask": key_mask, "seqlens_k": seqlens_k}, writes={"out": out, "lse": lse},
    )  # fmt: skip
    cuda_ext.check(code, "attention (CUDA forward)", q)
    return out, lse


def attention_bwd_cuda(
    do,
    q,
    k,
    v,
    out,
    lse,
    key_mask,
    scale: float,
    mask: MaskSpec,
    dropout_p: float,
    seed: int,
    seqlens_k: torch.Tensor | None = None,
):
    """``dq, dk, dv`` by the CUDA kernels (dQ through an fp32 buffer: its blocks add with atomics)."""
    do, q, k, v, out = (cuda_ext.aligned_rows(t) for t in (do, q, k, v, out))
    Z, H, L, E = q.shape
    dq, dk, dv = _new(q.shape, q.dtype, q.device), _new(k.shape, k.dtype, k.device), _new(v.shape, v.dtype, v.device)
    delta = _new((Z, H, L), torch.float32, q.device)
    dq_accum = torch.zeros((Z, H, L, E), dtype=torch.float32, device=q.device)
    code = cuda_ext.launch(q, "attention_backward",
        tuple(cuda_ext.ptr(t) for t in (q, k, v, out, lse)), _strides(q, k, v, out),
        *_args(q, k, v, key_mask, scale, mask, dropout_p, seed, seqlens_k),
        [cuda_ext.ptr(t) for t in (do, delta, dq_accum, dq, dk, dv)], _strides(do, dq, dk, dv), cuda_ext.stream(q),
        reads={"q": q, "k": k, "v": v, "out": out, "lse": lse, "dout": do, "key_mask": key_mask,
               "seqlens_k": seqlens_k},
        writes={"delta": delta, "dq_accum": dq_accum, "dq": dq, "dk": dk, "dv": dv},
    )  # fmt: skip
    cuda_ext.check(code, "attention (CUDA backward)", q)
    return dq, dk, dv
