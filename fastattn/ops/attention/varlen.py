"""Packed variable-length attention: the ``fastattn::varlen_fwd`` / ``varlen_bwd`` custom ops over the Triton
kernels in their VARLEN mode, and the per-sequence PyTorch reference.

Packed layout: q ``(total_q, H, E)``, k ``(total_k, H_kv, E)``, v ``(total_k, H_kv, Ev)``; ``seq`` int32
``(B, 4)`` holds each sequence's first query row, query count, first key row and key count. The kernels see
4-D strided views ``(B, H, max_len, E)`` with batch stride 0, whose rows start at each sequence's first row.
"""

from __future__ import annotations

import torch

from ..._kernel_log import record
from ..common import float32_params
from ..common import new_buffer as _new
from .reference import attention_reference
from .spec import MaskSpec, Varlen


def _view4(x: torch.Tensor, batch: int, rows: int) -> torch.Tensor:
    """(total, heads, E) -> a (batch, heads, rows, E) view with batch stride 0 (rows offset by the kernels)."""
    return x.as_strided((batch, x.shape[1], rows, x.shape[2]), (0, x.stride(1), x.stride(0), x.stride(2)))


def _varlen(seq: torch.Tensor, total_q: int) -> Varlen:
    return Varlen(seq, (0, total_q))  # lse / delta are (H, total_q)


@torch.library.custom_op("fastattn::varlen_fwd", mutates_args=())
def varlen_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq: torch.Tensor, sinks: torch.Tensor | None,
    seed: torch.Tensor, scale: float, softcap: float | None, left: int | None, right: int | None,
    dropout_p: float, max_q: int, max_k: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``out (total_q, H, Ev)`` and ``lse (H, total_q)`` float32."""
    B = seq.shape[0]
    out = _new((q.shape[0], q.shape[1], v.shape[2]), q.dtype, q.device)
    lse = _new((q.shape[1], q.shape[0]), torch.float32, q.device)
    from .launch import attention_fwd  # triton: only once a kernel runs

    attention_fwd(
        _view4(q, B, max_q), _view4(k, B, max_k), _view4(v, B, max_k), None, scale, MaskSpec(0, left, right),
        dropout_p, int(seed.item()), varlen=_varlen(seq, q.shape[0]), out=_view4(out, B, max_q), lse=lse,
        softcap=softcap, sinks=float32_params(sinks),
    )  # fmt: skip
    return out, lse


@varlen_fwd_op.register_fake
def _(q, k, v, seq, sinks, seed, scale, softcap, left, right, dropout_p, max_q, max_k):
    return q.new_empty((q.shape[0], q.shape[1], v.shape[2])), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fastattn::varlen_bwd", mutates_args=())
def varlen_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    seq: torch.Tensor, sinks: torch.Tensor | None, seed: torch.Tensor, scale: float, softcap: float | None,
    left: int | None, right: int | None, dropout_p: float, max_q: int, max_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dq, dk, dv, dsinks)``; dsinks float32 (H,), an empty tensor without sinks."""
    B = seq.shape[0]
    dq, dk, dv = (_new(t.shape, t.dtype, t.device) for t in (q, k, v))
    views = lambda *ts: [_view4(t, B, n) for t, n in ts]  # noqa: E731
    q4, k4, v4, o4, do4 = views((q, max_q), (k, max_k), (v, max_k), (out, max_q), (dout, max_q))
    from .launch import attention_bwd

    *_, dsinks = attention_bwd(
        do4, q4, k4, v4, o4, lse, None, scale, MaskSpec(0, left, right), dropout_p, int(seed.item()),
        varlen=_varlen(seq, q.shape[0]), grads=tuple(views((dq, max_q), (dk, max_k), (dv, max_k))),
        softcap=softcap, sinks=float32_params(sinks),
    )  # fmt: skip
    return dq, dk, dv, q.new_empty(0) if dsinks is None else dsinks


@varlen_bwd_op.register_fake
def _(dout, q, k, v, out, lse, seq, sinks, seed, scale, softcap, left, right, dropout_p, max_q, max_k):
    dsinks = q.new_empty((q.shape[1],), dtype=torch.float32) if sinks is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


def _setup(ctx, inputs, output):
    q, k, v, seq, sinks, seed, *args = inputs
    ctx.save_for_backward(q, k, v, seq, sinks, seed, *output)
    ctx.args = args
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dout, _dlse):
    q, k, v, seq, sinks, seed, out, lse = ctx.saved_tensors
    dq, dk, dv, dsinks = torch.ops.fastattn.varlen_bwd(
        dout.contiguous(), q, k, v, out, lse, seq, sinks, seed, *ctx.args
    )
    dsinks = dsinks.to(sinks.dtype) if sinks is not None and ctx.needs_input_grad[4] else None
    # One gradient per input: q, k, v, the rows (none), sinks, then the scalars.
    return (dq, dk, dv, None, dsinks) + (None,) * (len(ctx.needs_input_grad) - 5)


varlen_fwd_op.register_autograd(_backward, setup_context=_setup)


def _gather_rows(x: torch.Tensor, cu: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed ``x (total, H, E)`` as a padded batch ``(B, H, rows, E)`` (rows past a sequence's end are its
    last row again, or row 0), with each entry's packed row index and whether it is a real row; on the device,
    no host copy."""
    starts, lengths = cu[:-1].long(), (cu[1:] - cu[:-1]).long()
    i = torch.arange(rows, device=x.device)
    real = i[None, :] < lengths[:, None]
    index = (starts[:, None] + i[None, :]).clamp(0, max(x.shape[0] - 1, 0))
    padded = x[index] if x.shape[0] else x.new_zeros((index.shape[0], rows, *x.shape[1:]))
    return padded.transpose(1, 2), index, real


def varlen_reference(q, k, v, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int, scale, left, right,
                     dropout_p, softcap=None, sinks=None):  # fmt: skip
    """The PyTorch reference on the whole batch at once: the sequences padded to ``max_q`` / ``max_k`` rows,
    each one's visibility (bottom-right aligned, its own lengths) as a mask, and the real rows written back;
    ``(out (total_q, H, Ev), lse (H, total_q))``. Reads no device data on the host."""
    B = cu_q.numel() - 1
    qb, index_q, real_q = _gather_rows(q, cu_q, max_q)
    kb, _, real_k = _gather_rows(k, cu_k, max_k)
    vb, _, _ = _gather_rows(v, cu_k, max_k)
    len_q, len_k = (cu_q[1:] - cu_q[:-1]).long(), (cu_k[1:] - cu_k[:-1]).long()
    i = torch.arange(max_q, device=q.device)[None, :, None] + (len_k - len_q)[:, None, None]  # i + offset
    j = torch.arange(max_k, device=q.device)[None, None, :]
    keep = real_q[:, :, None] & real_k[:, None, :]
    if left is not None:
        keep &= j >= i - left
    if right is not None:
        keep &= j <= i + right
    record("varlen_attention", "attention_reference", "torch")
    out, lse = attention_reference(qb, kb, vb, keep[:, None], scale, MaskSpec(), dropout_p, softcap=softcap,
                                   sinks=sinks)  # fmt: skip
    # Real rows go to their packed row, padding rows to one extra row that is dropped.
    total = q.shape[0]
    target = torch.where(real_q, index_q, total).flatten()
    packed = out.new_zeros((total + 1, q.shape[1], v.shape[2]))
    packed = packed.index_put((target,), out.transpose(1, 2).flatten(0, 1))
    lse_packed = lse.new_zeros((q.shape[1], total + 1))
    lse_packed = lse_packed.index_put(
        (torch.arange(q.shape[1], device=q.device)[:, None], target[None, :]),
        lse.transpose(0, 1).flatten(1, 2) if B else lse.new_zeros((q.shape[1], 0)),
    )
    return packed[:total], lse_packed[:, :total]
