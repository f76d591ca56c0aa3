"""Packed variable-length batches: ``varlen_attention`` and the ``unpad`` / ``pad`` helpers."""

from __future__ import annotations

import operator

import torch

from ._attention import _autocast, _check_dropout, _check_scale, _check_window, check_sinks, check_softcap
from ._backend import triton_only, use_triton
from .ops.attention.support import triton_refusal
from .ops.attention.varlen import varlen_reference
from .ops.common import dropout_seed
from .ops.common import host_readable as _host_readable

_API = "varlen_attention"


def _check_cu(name: str, cu, total: int, device) -> None:
    """What the offsets' type and shape tell, checked on the host (no device data read)."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{_API}(): argument '{name}' must be Tensor, not {type(cu).__name__}")
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{_API}: {name} must be a 1-D int32 tensor of B + 1 >= 2 offsets; got {cu.dtype} "
                         f"{tuple(cu.shape)}")  # fmt: skip
    if cu.device != device:
        raise ValueError(f"{_API}: {name} is on {cu.device}, the inputs on {device}")


def _check_cu_values(name: str, cu: torch.Tensor, total: int, longest: int, host: bool) -> None:
    """The offsets' values: from 0, never decreasing, to ``total``, no sequence above ``longest``. ``host``:
    read them (one device-to-host copy) and raise ValueError before any kernel; else a device-side assert,
    which never waits for the device (a failure surfaces as a device error at the next synchronization)."""
    lengths = cu[1:] - cu[:-1]
    if host:
        values = cu.tolist()
        if values[0] != 0 or any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"{_API}: {name} must start at 0 and never decrease; got {values[:8]}...")
        if values[-1] != total:
            raise ValueError(f"{_API}: the last entry of {name} ({values[-1]}) must be the total length {total}")
        if max(b - a for a, b in zip(values, values[1:])) > longest:
            raise ValueError(f"{_API}: a sequence of {name} is longer than its max_seqlen ({longest})")
        return
    ok = (cu[0] == 0) & (cu[-1] == total) & (lengths >= 0).all() & (lengths <= longest).all()
    torch._assert_async(ok, f"{_API}: {name} must start at 0, never decrease, end at {total}, no sequence above "
                        f"{longest} (check=True says which)")  # fmt: skip


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    window: tuple[int | None, int | None] | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_lse: bool = False,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    check: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over sequences of different lengths packed along the first dimension, no padding.

    q ``(total_q, H, E)``, k ``(total_k, H_kv, E)``, v ``(total_k, H_kv, Ev)`` (H a multiple of H_kv);
    sequence b is rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q and ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``
    of k and v (int32 offsets, B + 1 of them, from 0 to the totals); ``max_seqlen_*`` bound the lengths.
    ``causal`` and ``window`` are per sequence and bottom-right aligned as in :func:`fastattn.attention`.
    ``softcap`` and ``sinks`` ``(H,)`` as in :func:`fastattn.attention` (the sinks get their gradient).
    Returns ``out (total_q, H, Ev)`` and, with ``return_lse``, ``lse (H, total_q)`` float32. Equal, sequence
    by sequence, to :func:`fastattn.attention` on each sequence alone. Bad input: ValueError / TypeError,
    before any kernel runs, for everything shapes, dtypes and arguments tell. The offsets' values are device
    data: checked by a device-side assert that never waits for the device (the call stays free of host
    synchronization and compiles with ``fullgraph=True``), or, with ``check=True``, read on the host (one copy)
    and refused with ValueError first (CPU tensors are always read on the host, outside tracing: that costs no
    synchronization there).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{_API}: {name} must be a 3-D tensor (total, heads, head_dim); got {t!r:.60}")
    if not (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device and q.dtype.is_floating_point):
        raise ValueError(f"{_API}: q, k, v must be floating, of one dtype and device; got {q.dtype}/{k.dtype}/"
                         f"{v.dtype} on {q.device}/{k.device}/{v.device}")  # fmt: skip
    if q.shape[2] != k.shape[2] or k.shape[:2] != v.shape[:2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"{_API}: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
                         f"(same head dim for q and k, same rows and heads for k and v, H_kv dividing H)")  # fmt: skip
    _check_cu("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device)
    _check_cu("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{_API}: cu_seqlens_q and cu_seqlens_k must describe the same number of sequences; got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")  # fmt: skip
    bounds = []
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        try:
            bound = operator.index(m)  # ints, numpy integers (not floats, not tensors with more than one value)
        except TypeError:
            bound = -1
        if isinstance(m, bool) or bound < 0:
            raise ValueError(f"{_API}: {name} must be a non-negative int (a bound on the lengths); got {m!r}")
        bounds.append(bound)
    # A loose bound is legal; no sequence is longer than its total, and the kernels' views must fit in it.
    max_seqlen_q, max_seqlen_k = min(bounds[0], q.shape[0]), min(bounds[1], k.shape[0])
    host = check or _host_readable(cu_seqlens_q)  # CPU tensors: reading them costs no synchronization
    _check_cu_values("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, host)
    _check_cu_values("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, host)
    q, k, v = _autocast(q, k, v)
    p = _check_dropout(_API, ValueError, dropout_p, upper_inclusive=False)
    scale_f = _check_scale(_API, scale, q.shape[-1])
    left, right = _check_window(window, causal)
    cap = check_softcap(_API, softcap)
    sink = None if sinks is None else check_sinks(_API, sinks, q.transpose(0, 1))
    out, lse = _run(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale_f, left, right, p, cap,
                    sink)  # fmt: skip
    return (out, lse) if return_lse else out


def _run(q, k, v, cu_seqlens_q, cu_seqlens_k, longest_q: int, longest_k: int, scale, left, right, p, softcap=None,
         sinks=None):  # fmt: skip
    """Checked packed inputs (offsets on the device, bounds on the lengths) to ``(out, lse)`` on the kernels or
    the reference; no host copy here."""
    if use_triton(_API, q.device, triton_refusal(q, v)):
        triton_only(_API)
        starts_q, starts_k = cu_seqlens_q[:-1], cu_seqlens_k[:-1]
        len_q, len_k = cu_seqlens_q[1:] - starts_q, cu_seqlens_k[1:] - starts_k
        seq = torch.stack([starts_q, len_q, starts_k, len_k, len_k - len_q], 1)  # bottom-right per sequence
        return torch.ops.fastattn.varlen_fwd(
            q, k, v, seq.contiguous(), sinks, dropout_seed(p), scale, softcap, left, right, p, max(longest_q, 1),
            max(longest_k, 1),
        )  # fmt: skip
    return varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, longest_q, longest_k, scale, left, right, p, softcap,
                            sinks)  # fmt: skip


def unpad(x: torch.Tensor, key_padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A padded batch ``x (N, L, ...)`` and its padding mask ``(N, L)`` (True = padding, as torch's
    ``key_padding_mask``) in packed form: ``(x_packed (total, ...), indices, cu_seqlens int32 (N + 1), max_seqlen)``;
    ``indices`` are the kept positions of the flattened ``(N * L)`` batch, for :func:`pad`."""
    if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != x.shape[:2]:
        raise ValueError(f"unpad: key_padding_mask must be bool of shape {tuple(x.shape[:2])}; got "
                         f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")  # fmt: skip
    keep = ~key_padding_mask
    lengths = keep.sum(1, dtype=torch.int32)
    indices = keep.flatten().nonzero().flatten()
    cu = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return x.flatten(0, 1)[indices], indices, cu, int(lengths.max())


def pad(x: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`unpad`: ``(batch, seqlen, ...)`` with zeros at the padded positions."""
    out = x.new_zeros((batch * seqlen, *x.shape[1:]))
    return out.index_put((indices,), x).unflatten(0, (batch, seqlen))


def padded_key_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor | None:
    """Attention of every query over the real keys only, or None when the kernels do not run here or the mask
    does not fit (then the caller attends with the mask as it is).

    q ``(N, H, L, E)``, k/v ``(N, H_kv, S, E/Ev)``; ``key_mask`` ``(N, S)`` bool, True = a real key. The result is
    SDPA's with that mask (rows of a sequence without keys give 0). No host synchronization: each sequence's
    real keys are moved to its front by a stable sort on the device, and the varlen kernels attend to the first
    ``count[n]`` keys of row n (they never visit the padding, wherever it was)."""
    from ._backend import current_backend, interpreting

    backend = current_backend()
    kernels = backend != "torch" and (q.is_cuda or (interpreting() and backend != "auto"))
    # A float mask is packable only if its entries are all 0 or -inf, which only its values tell: it is attended
    # with as it is (deciding would read device data).
    if not kernels or key_mask.shape != (q.shape[0], k.shape[2]) or key_mask.dtype != torch.bool:
        return None
    if triton_refusal(q, v) is not None:
        return None
    keep = key_mask
    N, H, L, E = q.shape
    S = k.shape[2]
    counts = keep.sum(1, dtype=torch.int32)
    order = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices  # real keys first, in order
    k_c, v_c = (t.gather(2, order[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])) for t in (k, v))
    rows = torch.arange(N, dtype=torch.int32, device=q.device)
    # Sequence n's keys start at row n * S of the compacted keys; the first counts[n] of them are real. The
    # padding after them forms a sequence of its own with no query, so that every key row belongs to one
    # sequence and gets its (zero) gradient written.
    real = torch.stack([rows * L, torch.full_like(rows, L), rows * S, counts, counts - L], 1)
    rest = torch.stack([(rows + 1) * L, torch.zeros_like(rows), rows * S + counts, S - counts, S - counts], 1)
    seq = torch.stack([real, rest], 1).flatten(0, 1).contiguous()
    triton_only(_API)
    q_p, k_p, v_p = (t.transpose(1, 2).flatten(0, 1) for t in (q, k_c, v_c))
    out, _ = torch.ops.fastattn.varlen_fwd(
        q_p, k_p, v_p, seq, None, dropout_seed(dropout_p), E**-0.5, None, None, None, dropout_p, max(L, 1), max(S, 1)
    )  # fmt: skip
    return out.unflatten(0, (N, L)).transpose(1, 2)
