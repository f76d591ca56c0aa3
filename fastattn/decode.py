"""Decoding with a key/value cache: ``decode_attention``, split over the key length (flash-decoding)."""

from __future__ import annotations

import contextlib

import torch

from . import _torch
from ._attention import _autocast, _check_alibi, _check_scale, check_sinks, check_softcap
from ._backend import torch_path, triton_only, use_triton
from ._kernel_log import record
from .ops.attention.reference import attention_reference
from .ops.attention.spec import MaskSpec, Varlen
from .ops.attention.support import triton_refusal
from .ops.common import float32_params
from .ops.common import host_readable as _host_readable
from .posenc import RotaryEmbedding, apply_rotary

_API = "decode_attention"
SPLIT_TILE = 256  # split lengths are multiples of every key tile the configs use


# Stand-in SM count off a GPU (the interpreter), so the default split choice runs there as it does on a GPU.
CPU_SMS = 8


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else CPU_SMS


def default_splits(programs: int, s_max: int, sms: int) -> int:
    """Key splits so that a small batch still fills the GPU: about two programs per SM in all, each split at
    least SPLIT_TILE keys, at most 64 splits. ``programs``: the launch's programs without splitting."""
    return max(1, min(-(-2 * sms // programs), -(-s_max // SPLIT_TILE), 64))


def _splits(q: torch.Tensor, s_max: int, num_splits: int | None) -> int:
    if num_splits is not None:
        return max(1, min(int(num_splits), -(-s_max // SPLIT_TILE)))
    programs = q.shape[0] * q.shape[1] * -(-q.shape[2] // 64)
    return default_splits(programs, s_max, _sm_count(q.device))


def _check(q, k_cache, v_cache, cache_seqlens, k_new, v_new) -> None:
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{_API}: {name} must be a 4-D tensor (N, heads, length, head_dim); got {t!r:.60}")
    N, H, L, E = q.shape
    if k_cache.shape[:3] != v_cache.shape[:3] or k_cache.shape[0] != N or k_cache.shape[3] != E or H % k_cache.shape[1]:
        raise ValueError(f"{_API}: q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
                         f" do not fit (same N; caches (N, H_kv, S_max, E) with H_kv dividing H)")  # fmt: skip
    device = q.device
    if not (q.dtype == k_cache.dtype == v_cache.dtype and device == k_cache.device == v_cache.device):
        raise ValueError(f"{_API}: q and the caches must share dtype and device")
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype != torch.int32 or cache_seqlens.shape != (N,):
        raise ValueError(f"{_API}: cache_seqlens must be an int32 tensor of shape ({N},); got {cache_seqlens!r:.60}")
    if cache_seqlens.device != device:
        raise ValueError(f"{_API}: cache_seqlens is on {cache_seqlens.device}, q on {q.device}")
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{_API}: give k_new and v_new together")
    if k_new is not None:
        want_k, want_v = (N, k_cache.shape[1], L, E), (N, k_cache.shape[1], L, v_cache.shape[3])
        if k_new.shape != want_k or v_new.shape != want_v:
            raise ValueError(f"{_API}: k_new / v_new must be {want_k} / {want_v}; got {tuple(k_new.shape)} / "
                             f"{tuple(v_new.shape)}")  # fmt: skip


def _as_sequences(pool: torch.Tensor, n: int) -> torch.Tensor:
    """A stand-in of the per-sequence cache shape for the shared checks (no data is read)."""
    return pool.new_empty((n, pool.shape[1], 0, pool.shape[3]))


def _check_pages(q, k_cache, v_cache, block_table) -> None:
    if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2:
        raise ValueError(f"{_API}: block_table must be an int32 tensor (N, max_pages); got {block_table!r:.60}")
    if block_table.shape[0] != q.shape[0] or block_table.device != q.device:
        raise ValueError(f"{_API}: block_table must have N = {q.shape[0]} rows on {q.device}; got "
                         f"{tuple(block_table.shape)} on {block_table.device}")  # fmt: skip
    if k_cache.dim() != 4 or k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"{_API}: paged caches must be (num_pages, H_kv, page_size, E); got {tuple(k_cache.shape)}"
                         f" and {tuple(v_cache.shape)}")  # fmt: skip


def _pages_in_use_range(block_table, cache_seqlens, new: int, page_size: int) -> torch.Tensor:
    """(min, max) int32 of the table entries a step reads or writes: sequence n uses its first
    ceil((cache_seqlens[n] + new) / page_size) entries. Computed on the device; 0 stands in for unused ones."""
    pages = (cache_seqlens + (new + page_size - 1)) // page_size
    used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < pages[:, None]
    entries = torch.where(used, block_table, 0)
    return torch.stack([entries.amin(), entries.amax()]).to(cache_seqlens.dtype)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    rotary: RotaryEmbedding | None = None,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    block_table: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    check: bool = False,
) -> torch.Tensor:
    """Attention of a few new query tokens per sequence over a key/value cache (inference: no gradient).

    q ``(N, H, L_new, E)``; caches ``(N, H_kv, S_max, E / Ev)``; ``cache_seqlens`` int32 ``(N,)``. With
    ``k_new`` / ``v_new`` ``(N, H_kv, L_new, E / Ev)``, ``cache_seqlens[n]`` is the filled length before this
    step: the new keys and values are written into the caches in place at ``cache_seqlens[n] + t`` and query t,
    at that position, attends causally to everything up to it. Without them, the queries attend to the first
    ``cache_seqlens[n]`` keys, the last query aligned with the last key. ``rotary`` turns q (and k_new) at
    their positions before the cache is written; ``alibi_slopes`` ``(H,)`` or ``(N, H)`` as in
    :func:`fastattn.attention`, and so are ``softcap`` and ``sinks`` ``(H,)``. The key length is split into
    ``num_splits`` parts (default: enough to fill the GPU) computed in parallel and merged by log-sum-exp (the
    sinks counted once). Returns ``(N, H, L_new, Ev)``.

    Paged cache: with ``block_table`` int32 ``(N, max_pages)``, the caches are pools of pages ``(num_pages,
    H_kv, page_size, E / Ev)`` and position p of sequence n lives at row ``p % page_size`` of page
    ``block_table[n, p // page_size]`` (pages in any order; the kernels walk the table).

    No host synchronization (a decode step can be captured in a CUDA graph and compiles with
    ``fullgraph=True``): what shapes, dtypes and arguments tell raises ValueError before anything runs; the
    lengths and the table entries in use are device data, checked by a device-side assert that never waits for
    the device, or with ``check=True`` read on the host (one copy) and refused with ValueError first (CPU
    tensors are always read on the host, which costs no synchronization there, outside tracing).
    """
    paged = block_table is not None
    if paged:
        _check_pages(q, k_cache, v_cache, block_table)
        _check(q, _as_sequences(k_cache, q.shape[0]), _as_sequences(v_cache, q.shape[0]), cache_seqlens, k_new, v_new)
    else:
        _check(q, k_cache, v_cache, cache_seqlens, k_new, v_new)
    N, H, L, E = q.shape
    s_max = block_table.shape[1] * k_cache.shape[2] if paged else k_cache.shape[2]
    # The bounds (lengths, and the range of the table's pages in use) must hold before the cache is written.
    # Entries past a sequence's last page are not read: serving engines leave -1 there.
    new_rows = L if k_new is not None else 0
    limit = s_max - new_rows
    pages = _pages_in_use_range(block_table, cache_seqlens, new_rows, k_cache.shape[2]) if paged else None
    # CPU tensors: reading them is no device synchronization, so the values are checked on the host (the clear
    # error) and steer the PyTorch path below; under tracing or FakeTensorMode nothing is read.
    host_values = _host_readable(cache_seqlens)
    if check or host_values:
        host = (torch.cat([cache_seqlens, pages]) if paged else cache_seqlens).tolist()
        filled = host[:N]
        if N and (min(filled) < 0 or max(filled) > limit):
            raise ValueError(f"{_API}: cache_seqlens must be in [0, {limit}] (S_max {s_max}, {L} new); got {filled}")
        if paged and (host[N] < 0 or host[N + 1] >= k_cache.shape[0]):
            raise ValueError(f"{_API}: block_table entries of the pages in use must be in [0, {k_cache.shape[0]}); "
                             f"got entries from {host[N]} to {host[N + 1]}")  # fmt: skip
    else:
        torch._assert_async(((cache_seqlens >= 0) & (cache_seqlens <= limit)).all(),
                            f"{_API}: cache_seqlens must be in [0, {limit}] (check=True says which)")  # fmt: skip
        if paged:
            torch._assert_async((pages[0] >= 0) & (pages[1] < k_cache.shape[0]),
                                f"{_API}: block_table entries of the pages in use must be in [0, "
                                f"{k_cache.shape[0]})")  # fmt: skip
    q, k_new, v_new = _autocast(q, k_new, v_new)
    if k_new is not None and k_new.dtype != k_cache.dtype:
        k_new, v_new = k_new.to(k_cache.dtype), v_new.to(v_cache.dtype)
    if q.dtype != k_cache.dtype:
        q = q.to(k_cache.dtype)
    scale_f = _check_scale(_API, scale, E)
    alibi = None if alibi_slopes is None else _check_alibi(_API, alibi_slopes, q)
    cap = check_softcap(_API, softcap)
    sink = None if sinks is None else float32_params(check_sinks(_API, sinks, q))
    # One length for the whole batch (a model's decode step), read on the host: the new rows are one slice.
    one = filled[0] if host_values and N and filled.count(filled[0]) == N else None
    positions = None
    if rotary is not None or (k_new is not None and (paged or one is None)):
        first = cache_seqlens.long() if k_new is not None else cache_seqlens.long() - L
        positions = first[:, None] + torch.arange(L, device=q.device)  # (N, L) position of each query
    if rotary is not None:
        turned = apply_rotary(q, q[:, :1] if k_new is None else k_new, positions=positions, base=rotary.base,
                              interleaved=rotary.interleaved, rotary_dim=rotary.dim)  # fmt: skip
        q, k_new = turned[0], (k_new if k_new is None else turned[1])
    with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():  # (entering costs a µs)
        if k_new is not None and not paged and one is not None:
            k_cache[:, :, one : one + L] = k_new
            v_cache[:, :, one : one + L] = v_new
        elif k_new is not None:
            if paged:
                page_size = k_cache.shape[2]
                rows = block_table.long().gather(1, positions // page_size)
                slots = positions % page_size
            else:
                rows, slots = torch.arange(N, device=q.device)[:, None], positions
            k_cache[rows, :, slots] = k_new.permute(0, 2, 1, 3)
            v_cache[rows, :, slots] = v_new.permute(0, 2, 1, 3)
        if not torch_path(q.device) and use_triton(_API, q.device, triton_refusal(q, v_cache)):
            triton_only(_API)
            lengths = cache_seqlens + new_rows
            return torch.ops.fastattn.decode_fwd(q, k_cache, v_cache, lengths, alibi, block_table, sink, scale_f,
                                                 num_splits, cap)  # fmt: skip
        if one is not None and not paged and alibi is None and cap is None and sink is None and one + new_rows >= L:
            # One length for the batch, read on the host, every query seeing a key: torch's SDPA on the filled
            # rows, with no mask for one query, its causal rule for a first chunk, else one (L, rows) mask.
            end = one + new_rows
            k, v = k_cache[:, :, :end], v_cache[:, :, :end]
            mask = None if L == 1 or end == L else torch.ones(L, end, dtype=torch.bool, device=q.device).tril(end - L)
            record(_API, "scaled_dot_product_attention", "torch")
            return _torch.scaled_dot_product_attention(q, k, v, mask, is_causal=L > 1 and end == L, scale=scale_f,
                                                       enable_gqa=H != k.shape[1])  # fmt: skip
        longest = max(filled) + new_rows if host_values and N else None
        return _decode_reference(q, k_cache, v_cache, cache_seqlens + new_rows, alibi, block_table, scale_f, cap,
                                 sink, longest)  # fmt: skip


def _decode_reference(q, k_cache, v_cache, lengths, alibi, block_table, scale, softcap, sinks, longest=None):
    """The PyTorch path on the whole batch at once (no per-sequence loop): query t of sequence n, at position
    lengths[n] - L + t, sees the keys j <= that position below lengths[n]. Without ALiBi, softcap or sinks it is
    torch's own SDPA (its fused CPU kernel) with that mask, else the reference. ``longest`` (when the lengths
    were read on the host) spares the cache rows past the longest sequence; else the mask covers them."""
    N, H, L, _ = q.shape
    rows = block_table.shape[1] * k_cache.shape[2] if block_table is not None else k_cache.shape[2]
    if longest is not None:
        rows = max(min(longest, rows), 1)
    if block_table is not None:  # the pages of each sequence in order; unused entries (any value) are masked
        pages = -(-rows // k_cache.shape[2])
        table = block_table[:, :pages].long().clamp(0, k_cache.shape[0] - 1)
        k_cache, v_cache = (c[table].permute(0, 2, 1, 3, 4).flatten(2, 3) for c in (k_cache, v_cache))
    k_cache, v_cache = k_cache[:, :, :rows], v_cache[:, :, :rows]
    pos = (lengths.long() - L)[:, None] + torch.arange(L, device=q.device)  # (N, L)
    j = torch.arange(rows, device=q.device)
    keep = (j[None, None, :] <= pos[:, :, None]) & (j[None, None, :] < lengths[:, None, None].long())
    bias = keep[:, None]
    if alibi is None and softcap is None and sinks is None:
        record(_API, "scaled_dot_product_attention", "torch")
        out = _torch.scaled_dot_product_attention(q, k_cache, v_cache, bias, scale=scale,
                                                  enable_gqa=q.shape[1] != k_cache.shape[1])  # fmt: skip
        return torch.where(bias.any(-1, keepdim=True), out, 0.0)  # a row that sees no key: 0, not NaN
    if alibi is not None:  # -slope * |position of the query - j|, per sequence
        slopes = alibi.float().reshape(-1 if alibi.dim() == 2 else 1, H, 1, 1)
        dist = (pos[:, None, :, None] - j).abs().float()
        bias = torch.where(bias, -slopes * dist, float("-inf"))
    record(_API, "attention_reference", "torch")
    out, _ = attention_reference(q, k_cache, v_cache, bias, scale, MaskSpec(), softcap=softcap, sinks=sinks)
    return out.to(q.dtype)


@torch.library.custom_op("fastattn::decode_fwd", mutates_args=())
def decode_fwd_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor, alibi: torch.Tensor | None,
    block_table: torch.Tensor | None, sinks: torch.Tensor | None, scale: float, num_splits: int | None,
    softcap: float | None,
) -> torch.Tensor:  # fmt: skip
    """The decode kernels on checked inputs whose new keys are already in the caches (``lengths`` counts them)."""
    s_max = block_table.shape[1] * k_cache.shape[2] if block_table is not None else k_cache.shape[2]
    # VARLEN offsets are relative: causal is bottom-right per sequence.
    return _decode_kernels(q, k_cache, v_cache, lengths, MaskSpec(offset=0, right=0), scale, alibi, num_splits,
                           block_table, s_max, softcap, sinks)  # fmt: skip


@decode_fwd_op.register_fake
def _(q, k_cache, v_cache, lengths, alibi, block_table, sinks, scale, num_splits, softcap):
    return q.new_empty((*q.shape[:3], v_cache.shape[3]))


def _decode_kernels(q, k_cache, v_cache, lengths, causal, scale, alibi, num_splits, block_table, s_max, softcap=None,
                    sinks=None):  # fmt: skip
    from .ops.attention.launch import attention_fwd  # triton: only on the kernels' path

    N, H, L, E = q.shape
    HK = k_cache.shape[1]
    if L == 1 and H > HK and alibi is None and sinks is None:
        # One new token and grouped heads: the group's query heads become the rows of one program, so each
        # shared key/value head is read once per group. With one query per head no causal limit is needed
        # (every cached key precedes it); ALiBi's slopes and the sinks, per query head, would not fit a shared
        # row block.
        rows = q.reshape(N, HK, H // HK, E)
        out = _decode_kernels(rows, k_cache, v_cache, lengths, MaskSpec(), scale, None, num_splits, block_table, s_max,
                              softcap)  # fmt: skip
        return out.reshape(N, H, 1, -1)
    extra = dict(softcap=softcap, sinks=sinks)
    zeros = torch.zeros_like(lengths)
    seq = torch.stack([zeros, torch.full_like(lengths, L), zeros, lengths, lengths - L], 1).contiguous()
    splits = _splits(q, s_max, num_splits)
    if splits == 1:
        out, _ = attention_fwd(q, k_cache, v_cache, None, scale, causal, alibi=alibi,
                               varlen=Varlen(seq, (H * L, L), block_table=block_table), **extra)  # fmt: skip
        return out
    split_len = -(-s_max // splits)
    split_len = -(-split_len // SPLIT_TILE) * SPLIT_TILE
    # Each split writes its normalized partial output (fp32) and log-sum-exp; rows a split does not reach
    # keep lse = -inf and weigh 0 in the merge.
    part = torch.empty((splits, N, H, L, v_cache.shape[3]), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((splits, N, H, L), dtype=torch.float32, device=q.device)
    vl = Varlen(seq, (H * L, L), splits, split_len, (part.stride(0), part_lse.stride(0)), block_table)
    attention_fwd(q, k_cache, v_cache, None, scale, causal, alibi=alibi, varlen=vl, out=part[0], lse=part_lse, **extra)
    lse = torch.logsumexp(part_lse, 0)
    weights = torch.exp(part_lse - lse).nan_to_num(0.0)
    return (weights[..., None] * part).sum(0).to(q.dtype)
