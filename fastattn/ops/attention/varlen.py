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


def varlen_reference(q, k, v, cu_q: list[int], cu_k: list[int], scale, left, right, dropout_p, softcap=None,
                     sinks=None):  # fmt: skip
    """Sequence by sequence through the PyTorch reference; ``(out (total_q, H, Ev), lse (H, total_q))``."""
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qb = q[cu_q[b] : cu_q[b + 1]].transpose(0, 1)[None]
        kb = k[cu_k[b] : cu_k[b + 1]].transpose(0, 1)[None]
        vb = v[cu_k[b] : cu_k[b + 1]].transpose(0, 1)[None]
        spec = MaskSpec(kb.shape[2] - qb.shape[2], left, right)
        if kb.shape[2] == 0:  # a sequence without keys: every row sees nothing (but its sink)
            o = q.new_zeros((1, q.shape[1], qb.shape[2], v.shape[2]))
            lse = torch.full((1, q.shape[1], qb.shape[2]), float("-inf"), device=q.device)
            if sinks is not None:
                lse = sinks.float().reshape(1, -1, 1).expand_as(lse)
        else:
            record("varlen_attention", "attention_reference", "torch")
            o, lse = attention_reference(qb, kb, vb, None, scale, spec, dropout_p, softcap=softcap, sinks=sinks)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0].float())
    return torch.cat(outs, 0), torch.cat(lses, 1)
