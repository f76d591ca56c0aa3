"""Context parallelism on torch.distributed: ring attention over a sequence split across ranks.

``ring_attention(q, k, v)`` takes each rank's shard of a long sequence in the SDPA layout ``(N, H, L_local, E)``
and returns that rank's rows of attention over the whole sequence. Key/value shards travel round the ring with
point-to-point sends (the next shard is in flight while the current one is computed); each step's partial
result is merged exactly by its log-sum-exp, as ``fastattn.attention(..., return_lse=True)`` returns it. The
backward sends dK/dV round the ring with their shards, so each arrives back at its owner complete.

Layouts: ``"contiguous"``: rank r of W holds positions ``[r L_local, (r + 1) L_local)``; ``"zigzag"`` (for
causal attention, balanced): the sequence is cut into 2W chunks and rank r holds chunks r and 2W - 1 - r.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import fastattn
from fastattn._backend import triton_only, use_triton
from fastattn.ops.attention.spec import MaskSpec
from fastattn.ops.attention.support import triton_refusal

LAYOUTS = ("contiguous", "zigzag")


def _chunks(rank: int, world: int, layout: str) -> list[int]:
    """The global chunk indices a rank holds, in order (chunks of L_local or L_local / 2 positions)."""
    return [rank] if layout == "contiguous" else [rank, 2 * world - 1 - rank]


def _pairs(q_chunks: list[int], k_chunks: list[int], causal: bool):
    """(query chunk slot, key chunk slot, diagonal) for each pair of chunks with visible scores."""
    for a, qc in enumerate(q_chunks):
        for b, kc in enumerate(k_chunks):
            if not causal or kc < qc:
                yield a, b, False
            elif kc == qc:
                yield a, b, True


def _split(x: torch.Tensor, parts: int) -> list[torch.Tensor]:
    return list(x.chunk(parts, dim=2))


def _merge(acc, new):
    """Exact merge of two partial attention results (out, lse) over disjoint key sets."""
    if acc is None:
        return new
    (o1, l1), (o2, l2) = acc, new
    lse = torch.logaddexp(l1, l2)
    w1 = torch.exp(l1 - lse).nan_to_num(0.0)[..., None]  # rows with no key yet: lse -inf on both sides
    w2 = torch.exp(l2 - lse).nan_to_num(0.0)[..., None]
    return o1 * w1 + o2 * w2, lse


def _block_fwd(q, k, v, scale, diagonal):
    """(out fp32, lse) of q against one key/value chunk; diagonal chunks are causal."""
    with torch.no_grad():
        out, lse = fastattn.attention(q, k, v, causal=diagonal, scale=scale, return_lse=True)
    return out.float(), lse.float()


def _block_bwd(do, q, k, v, out, lse, scale, diagonal):
    """dq, dk, dv of one chunk pair given the rows' global output and log-sum-exp (so that the block's
    probabilities are exp(s - lse) of the whole row): the Triton kernels' backward where the backend runs them
    (as the forward's blocks do), the formula elsewhere."""
    if use_triton("ring_attention", q.device, triton_refusal(q, v)):
        triton_only("ring_attention backward")  # the CUDA C++ backward takes no outside log-sum-exp
        from fastattn.ops.attention.launch import attention_bwd

        mask = MaskSpec(offset=0, right=0) if diagonal else MaskSpec()
        dq, dk, dv, _, _ = attention_bwd(do, q, k, v, out.to(q.dtype), lse.contiguous(), None, scale, mask)
        return dq.float(), dk.float(), dv.float()
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, 1)
    vf = v.float().repeat_interleave(group, 1)
    qf, dof = q.float(), do.float()
    s = qf @ kf.transpose(-1, -2) * scale
    if diagonal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    p = torch.exp(s - lse[..., None])
    dv = p.transpose(-1, -2) @ dof
    dp = dof @ vf.transpose(-1, -2)
    ds = p * (dp - (dof * out).sum(-1, keepdim=True))
    dq = ds @ kf * scale
    dk = ds.transpose(-1, -2) @ qf * scale
    fold = lambda t: t.unflatten(1, (k.shape[1], group)).sum(2)  # noqa: E731
    return dq, fold(dk), fold(dv)


def _ring_pass(tensors: list[torch.Tensor], group) -> tuple[list[torch.Tensor], list]:
    """Start sending ``tensors`` to the next rank and receiving the previous rank's; returns the receive
    buffers and the requests to wait on."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    nxt = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    prv = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    bufs = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, b, prv, group) for b in bufs]
    return bufs, dist.batch_isend_irecv(ops)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal: bool, layout: str, scale: float):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        parts = 1 if layout == "contiguous" else 2
        q_chunks = _chunks(rank, world, layout)
        qs = _split(q, parts)
        results = [None] * parts
        kv = [k.contiguous(), v.contiguous()]
        for step in range(world):
            pending = _ring_pass(kv, group) if step + 1 < world else None
            src = (rank - step) % world
            ks, vs = _split(kv[0], parts), _split(kv[1], parts)
            for a, b, diagonal in _pairs(q_chunks, _chunks(src, world, layout), causal):
                results[a] = _merge(results[a], _block_fwd(qs[a], ks[b], vs[b], scale, diagonal))
            if pending is not None:
                bufs, reqs = pending
                for req in reqs:
                    req.wait()
                kv = bufs
        outs = [r[0] for r in results]
        lses = [r[1] for r in results]
        out, lse = torch.cat(outs, 2), torch.cat(lses, 2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.causal, ctx.layout, ctx.scale = group, causal, layout, scale
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, layout, scale = ctx.group, ctx.layout, ctx.scale
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        parts = 1 if layout == "contiguous" else 2
        q_chunks = _chunks(rank, world, layout)
        qs, dos, outs, lses = _split(q, parts), _split(dout, parts), _split(out, parts), _split(lse[..., None], parts)
        dq = torch.zeros_like(q, dtype=torch.float32)
        dqs = _split(dq, parts)
        travel = [k.contiguous(), v.contiguous(), torch.zeros_like(k, dtype=torch.float32),
                  torch.zeros_like(v, dtype=torch.float32)]  # fmt: skip
        for step in range(world):
            src = (rank - step) % world
            kk, vv, dk, dv = travel
            ks, vs, dks, dvs = _split(kk, parts), _split(vv, parts), _split(dk, parts), _split(dv, parts)
            for a, b, diagonal in _pairs(q_chunks, _chunks(src, world, layout), ctx.causal):
                gq, gk, gv = _block_bwd(dos[a], qs[a], ks[b], vs[b], outs[a], lses[a][..., 0], scale, diagonal)
                dqs[a] += gq
                dks[b] += gk
                dvs[b] += gv
            # Every shard with its gradient moves on; after `world` moves each is back at its owner.
            bufs, reqs = _ring_pass(travel if step + 1 < world else travel[2:], group)
            for req in reqs:
                req.wait()
            travel = bufs if step + 1 < world else [None, None, *bufs]
        return dq.to(q.dtype), travel[2].to(k.dtype), travel[3].to(v.dtype), None, None, None, None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    layout: str = "contiguous",
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over a sequence split across the ranks of ``group`` (default: the world).

    q ``(N, H, L_local, E)``, k and v ``(N, H_kv, L_local, E)``: this rank's positions (see ``layout``; every
    rank holds the same number). Returns this rank's rows of ``softmax(q kᵀ · scale) v`` over all positions,
    ``(N, H, L_local, E)``, causal (by global position) when ``causal``. Differentiable in q, k, v."""
    if layout not in LAYOUTS:
        raise ValueError(f"ring_attention: layout must be one of {LAYOUTS}, got {layout!r}")
    if not dist.is_initialized():
        raise RuntimeError("ring_attention: torch.distributed is not initialized (dist.init_process_group)")
    if q.dim() != 4 or k.shape != v.shape or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"ring_attention: q (N, H, L, E), k and v (N, H_kv, L, E) with the same local length; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")  # fmt: skip
    if layout == "zigzag" and q.shape[2] % 2:
        raise ValueError(f"ring_attention: the zigzag layout needs an even local length, got {q.shape[2]}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _RingAttention.apply(q, k, v, group, causal, layout, scale)


def shard(x: torch.Tensor, rank: int, world: int, layout: str = "contiguous", dim: int = 2) -> torch.Tensor:
    """This rank's part of a full-sequence tensor in ``layout`` (positions along ``dim``)."""
    if layout == "contiguous":
        return x.chunk(world, dim)[rank]
    chunks = x.chunk(2 * world, dim)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim)
