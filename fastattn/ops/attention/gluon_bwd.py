"""The attention backward in Gluon for sm_90: one fused kernel over key/value tiles.

A program owns BLOCK_N = 2 x 64 keys of one key/value head; each of its two consumer warpgroups keeps dK and
dV of its 64 keys in registers (float32 wgmma accumulators) while a loader warp streams the query blocks of
every query head of the group (Q and dO through bulk tensor copies into a ring of shared stages). Per query
block a consumer computes S^T = K Q^T and dP^T = V dO^T (both issued before the first is waited for), P^T from
the forward's log-sum-exp, dV += P^T dO with P^T from registers, dS^T = P^T (dP^T - delta), dK += dS^T Q, and
its share of dQ = dS K through shared memory, added into a float32 buffer with atomics (the post-step casts it).
delta = rowsum(dO * O) comes from the Triton pre-kernel.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

LOG2E = gl.constexpr(1.4426950408889634)
DQ_CHUNK = gl.constexpr(64)  # head-dim rows of dQ^T per product (64: one warpgroup's M)


@gluon.jit
def _query_range(n, L, S, offset, left, right, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):  # fmt: skip
    """Query blocks [lo, hi) that see a key of block n: key j is seen by queries j - offset - right ..
    j - offset + left."""
    first = n * BLOCK_N
    last = gl.minimum(first + BLOCK_N, S) - 1
    lo = 0
    hi = L
    if HAS_RIGHT:
        lo = gl.maximum(first - offset - right, 0)
    if HAS_LEFT:
        hi = gl.minimum(last - offset + left + 1, L)
    hi = gl.maximum(hi, lo)
    return lo // BLOCK_M, gl.cdiv(hi, BLOCK_M)


@gluon.jit
def _bwd_loader(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_ready, qdo_ready, qdo_empty,
                H, L, S, GROUP, offset, left, right, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    n = gl.program_id(0)
    z = gl.program_id(1) // (H // GROUP)
    hk = gl.program_id(1) % (H // GROUP)
    PARTS: gl.constexpr = k_smem.shape[0]  # key parts: one per consumer, or one both share (SPLIT_D)
    KR: gl.constexpr = k_smem.shape[1]
    mbarrier.expect(kv_ready, PARTS * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
    for c in gl.static_range(PARTS):
        tma.async_copy_global_to_shared(k_desc, [z, hk, n * BLOCK_N + c * KR, 0], kv_ready, k_smem.index(c))
        tma.async_copy_global_to_shared(v_desc, [z, hk, n * BLOCK_N + c * KR, 0], kv_ready, v_smem.index(c))
    lo, hi = _query_range(n, L, S, offset, left, right, HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    i = 0
    for g in range(GROUP):
        h = hk * GROUP + g
        for m in range(lo, hi):
            s = i % STAGES
            mbarrier.wait(qdo_empty.index(s), ((i // STAGES) & 1) ^ 1)  # parity 1 passes on a fresh ring
            mbarrier.expect(qdo_ready.index(s), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [z, h, m * BLOCK_M, 0], qdo_ready.index(s), q_smem.index(s))
            tma.async_copy_global_to_shared(do_desc, [z, h, m * BLOCK_M, 0], qdo_ready.index(s), do_smem.index(s))
            i += 1


@gluon.jit
def _bwd_consumer(q_smem, do_smem, k_smem, v_smem, ds_smem, p_smem, xs, xchg, kv_ready, qdo_ready, qdo_empty,
                  lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr, sdq_z, sdq_h, sdq_l, sdk_z, sdk_h, sdk_l, sdv_z, sdv_h,
                  sdv_l, H, L, S, GROUP, qk_scale, scale, offset, left, right, c: gl.constexpr, HAS_LEFT: gl.constexpr,
                  HAS_RIGHT: gl.constexpr, HEAD_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr):  # fmt: skip
    dtype: gl.constexpr = q_smem.dtype
    # SPLIT_D (head dim 256: one key part in shared memory): both consumers see all BLOCK_N keys and each owns
    # half the head-dim columns of dK and dV; each computes S^T and dP^T over its half of the head dim and the
    # two add each other's partial sums through shared memory (xs, handed over on the xchg barriers).
    SPLIT_D: gl.constexpr = k_smem.shape[0] == 1
    half: gl.constexpr = k_smem.shape[1]  # keys of this consumer
    DH: gl.constexpr = HEAD_D // 2 if SPLIT_D else HEAD_D  # its dK / dV columns
    kp: gl.constexpr = 0 if SPLIT_D else c  # its key part
    d0c: gl.constexpr = c * DH if SPLIT_D else 0  # its first column
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])  # fmt: skip
    d_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, DH, 16])  # fmt: skip
    q_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])  # fmt: skip
    red_layout: gl.constexpr = gl.BlockedLayout([4, 1], [16, 2], [1, 4], [0, 1])
    n = gl.program_id(0)
    z = gl.program_id(1) // (H // GROUP)
    hk = gl.program_id(1) % (H // GROUP)
    keys = n * BLOCK_N + kp * half + gl.arange(0, half, gl.SliceLayout(1, s_layout))
    k_c = k_smem.index(kp)
    v_c = v_smem.index(kp)
    ds_c = ds_smem.index(c)
    p_c = p_smem.index(c)
    dk = gl.zeros([half, DH], gl.float32, d_layout)
    dv = gl.zeros([half, DH], gl.float32, d_layout)
    mbarrier.wait(kv_ready, 0)
    lo, hi = _query_range(n, L, S, offset, left, right, HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
    i = 0
    for g in range(GROUP):
        h = hk * GROUP + g
        for m in range(lo, hi):
            s = i % STAGES
            mbarrier.wait(qdo_ready.index(s), (i // STAGES) & 1)
            q_s = q_smem.index(s)
            do_s = do_smem.index(s)
            zero_s = gl.zeros([half, BLOCK_M], gl.float32, s_layout)  # made here: not held across the loop
            if SPLIT_D:
                q_s = q_s.slice(d0c, DH, dim=1)
                do_s = do_s.slice(d0c, DH, dim=1)
                st = warpgroup_mma(k_c.slice(d0c, DH, dim=1), q_s.permute((1, 0)), zero_s, use_acc=False,
                                   is_async=True)  # fmt: skip
                zero_p = gl.zeros([half, BLOCK_M], gl.float32, s_layout)  # its own: both products are in flight
                dpt = warpgroup_mma(v_c.slice(d0c, DH, dim=1), do_s.permute((1, 0)), zero_p, use_acc=False,
                                    is_async=True)  # fmt: skip
            else:
                st = warpgroup_mma(k_c, q_s.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            rows = m * BLOCK_M + gl.arange(0, BLOCK_M, gl.SliceLayout(0, s_layout))
            # A row with no visible key has lse = -inf, a row past L none: +inf there makes its P exactly 0.
            lse = gl.load(lse_ptr + (z * H + h) * L + rows, mask=rows < L, other=float("inf"))
            lse = gl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
            delta = gl.load(delta_ptr + (z * H + h) * L + rows, mask=rows < L, other=0.0)
            if SPLIT_D:
                st, dpt = warpgroup_mma_wait(0, deps=[st, dpt])
                # Hand over this half's partial sums (two slots by iteration parity: the other consumer read
                # slot i % 2 of iteration i - 2 before it arrived in iteration i - 1, which was waited for).
                slot = (c * 2 + i % 2) * 2
                xs.index(slot).store(st)
                xs.index(slot + 1).store(dpt)
                mbarrier.arrive(xchg.index(c))
                mbarrier.wait(xchg.index(1 - c), i & 1)
                other = ((1 - c) * 2 + i % 2) * 2
                st = st + xs.index(other).load(s_layout)  # S_0 + S_1 in either order: the same float32 sum
                dpt = dpt + xs.index(other + 1).load(s_layout)
            else:
                st = warpgroup_mma_wait(0, deps=[st])
            pt = gl.exp2(st * qk_scale - gl.expand_dims(lse, 0))
            if HAS_LEFT or HAS_RIGHT:
                diag = gl.expand_dims(keys, 1) - gl.expand_dims(rows + offset, 0)  # j - (i + offset)
                ok = gl.expand_dims(keys < S, 1)
                if HAS_RIGHT:
                    ok = ok & (diag <= right)
                if HAS_LEFT:
                    ok = ok & (diag >= -left)
                pt = gl.where(ok, pt, 0.0)
            else:  # keys past S (zero-filled by the copy) must not reach dQ
                pt = gl.where(gl.expand_dims(keys < S, 1), pt, 0.0)
            # P^T and dS^T go through shared memory as the A operands: registers holding an A operand stay
            # taken until its product retires, and the accumulators of dK and dV already fill half of them.
            if SPLIT_D:  # dP^T is summed already: both products go out together
                dst = pt * (dpt - gl.expand_dims(delta, 0))
                p_c.store(pt.to(dtype))
                ds_c.store(dst.to(dtype))
                fence_async_shared()
                dv = warpgroup_mma(p_c, do_s, dv, is_async=True)
                dk = warpgroup_mma(ds_c, q_s, dk, is_async=True)
            else:
                p_c.store(pt.to(dtype))
                fence_async_shared()
                dpt = warpgroup_mma(v_c, do_s.permute((1, 0)), zero_s, use_acc=False, is_async=True)
                dv = warpgroup_mma(p_c, do_s, dv, is_async=True)
                dpt = warpgroup_mma_wait(1, deps=[dpt])  # dP^T ready; dV's product still runs
                dst = pt * (dpt - gl.expand_dims(delta, 0))
                ds_c.store(dst.to(dtype))
                fence_async_shared()
                dk = warpgroup_mma(ds_c, q_s, dk, is_async=True)
            dv = warpgroup_mma_wait(1, deps=[dv])  # dV's product done; dK's may still run
            dk = warpgroup_mma_wait(0, deps=[dk])
            mbarrier.arrive(qdo_empty.index(s))  # this consumer is done with the stage's Q and dO
            # dQ += dS K for this consumer's keys, computed as dQ^T = K^T dS^T (a query block of BLOCK_M rows is
            # below a warpgroup's M of 64; the head dim is not), DQ_CHUNK head-dim rows at a time, added into the
            # float32 buffer (contiguous: (Z, H, L, HEAD_D)).
            q_cols = m * BLOCK_M + gl.arange(0, BLOCK_M, gl.SliceLayout(0, red_layout))
            dq_head = dq_ptr + (z * H + h).to(gl.int64) * L * HEAD_D
            for d0 in gl.static_range(d0c, d0c + DH, DQ_CHUNK):  # this consumer's head-dim rows of dQ^T
                part = gl.zeros([DQ_CHUNK, BLOCK_M], gl.float32, q_layout)
                part = warpgroup_mma(k_c.slice(d0, DQ_CHUNK, dim=1).permute((1, 0)), ds_c, part, use_acc=False)
                # Each thread adds 4 consecutive head-dim elements of a row: 4 addresses, not 16.
                part = gl.convert_layout(part, red_layout)
                d = d0 + gl.arange(0, DQ_CHUNK, gl.SliceLayout(1, red_layout))
                off = gl.expand_dims(q_cols, 0) * HEAD_D + gl.expand_dims(d, 1)
                gl.atomic_add(dq_head + off, part * scale, mask=gl.expand_dims(q_cols < L, 0))
            i += 1
    # dK carries the score scale; rows past S are not written.
    out_rows = n * BLOCK_N + kp * half + gl.arange(0, half, gl.SliceLayout(1, d_layout))
    cols = d0c + gl.arange(0, DH, gl.SliceLayout(0, d_layout))
    ok = gl.expand_dims(out_rows < S, 1)
    dk_off = z * sdk_z + hk * sdk_h + gl.expand_dims(out_rows, 1) * sdk_l + gl.expand_dims(cols, 0)
    gl.store(dk_ptr + dk_off, (dk * scale).to(dtype), mask=ok)
    dv_off = z * sdv_z + hk * sdv_h + gl.expand_dims(out_rows, 1) * sdv_l + gl.expand_dims(cols, 0)
    gl.store(dv_ptr + dv_off, dv.to(dtype), mask=ok)


@gluon.jit
def attention_bwd_gluon_kernel(q_desc, do_desc, k_desc, v_desc, lse_ptr, delta_ptr, dq_ptr, dk_ptr, dv_ptr,
                               sdq_z, sdq_h, sdq_l, sdk_z, sdk_h, sdk_l, sdv_z, sdv_h, sdv_l, H, L, S, GROUP,
                               qk_scale, scale, offset, left, right, HAS_LEFT: gl.constexpr,
                               HAS_RIGHT: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                               STAGES: gl.constexpr, SPLIT_D: gl.constexpr, LOADER_REGS: gl.constexpr,
                               CONSUMER_REGS: gl.constexpr):  # fmt: skip
    """dK, dV (dtype of k, v) and dQ added into the float32 ``dq_ptr`` buffer, for key block program_id(0)
    of key/value head program_id(1) (batch-major); descriptors as the forward's, boxes [1, 1, rows, HEAD_D]."""
    HEAD_D: gl.constexpr = q_desc.block_type.shape[3]
    dtype: gl.constexpr = q_desc.dtype
    PARTS: gl.constexpr = 1 if SPLIT_D else 2  # SPLIT_D: the consumers split the head dim, not the keys
    half: gl.constexpr = BLOCK_N // PARTS
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_D], q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_D], do_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [PARTS, half, HEAD_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [PARTS, half, HEAD_D], v_desc.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([half, BLOCK_M], dtype)
    ds_smem = gl.allocate_shared_memory(dtype, [2, half, BLOCK_M], ds_layout)
    p_smem = gl.allocate_shared_memory(dtype, [2, half, BLOCK_M], ds_layout)
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    qdo_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    qdo_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    if SPLIT_D:  # the partial S^T / dP^T exchange: [consumer, slot, S or dP] buffers and one barrier each way
        xs_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([half, BLOCK_M], gl.float32)
        xs = gl.allocate_shared_memory(gl.float32, [8, half, BLOCK_M], xs_layout)
        xchg = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(xchg.index(0), count=1)
        mbarrier.init(xchg.index(1), count=1)
    else:  # not used: any shared buffers of the right kinds
        xs = ds_smem
        xchg = qdo_ready
    for i in gl.static_range(STAGES):
        mbarrier.init(qdo_ready.index(i), count=1)
        mbarrier.init(qdo_empty.index(i), count=2)  # both consumers release a stage
    # (Argument tuples are spelled out for each partition: see the forward.)
    gl.warp_specialize(
        [
            (
                _bwd_consumer,
                (
                    q_smem,
                    do_smem,
                    k_smem,
                    v_smem,
                    ds_smem,
                    p_smem,
                    xs,
                    xchg,
                    kv_ready,
                    qdo_ready,
                    qdo_empty,
                    lse_ptr,
                    delta_ptr,
                    dq_ptr,
                    dk_ptr,
                    dv_ptr,
                    sdq_z,
                    sdq_h,
                    sdq_l,
                    sdk_z,
                    sdk_h,
                    sdk_l,
                    sdv_z,
                    sdv_h,
                    sdv_l,
                    H,
                    L,
                    S,
                    GROUP,
                    qk_scale,
                    scale,
                    offset,
                    left,
                    right,
                    0,
                    HAS_LEFT,
                    HAS_RIGHT,
                    HEAD_D,
                    BLOCK_M,
                    BLOCK_N,
                    STAGES,
                ),
            ),  # fmt: skip
            (
                _bwd_loader,
                (
                    q_desc,
                    do_desc,
                    k_desc,
                    v_desc,
                    q_smem,
                    do_smem,
                    k_smem,
                    v_smem,
                    kv_ready,
                    qdo_ready,
                    qdo_empty,
                    H,
                    L,
                    S,
                    GROUP,
                    offset,
                    left,
                    right,
                    HAS_LEFT,
                    HAS_RIGHT,
                    BLOCK_M,
                    BLOCK_N,
                    STAGES,
                ),
            ),  # fmt: skip
            (
                _bwd_consumer,
                (
                    q_smem,
                    do_smem,
                    k_smem,
                    v_smem,
                    ds_smem,
                    p_smem,
                    xs,
                    xchg,
                    kv_ready,
                    qdo_ready,
                    qdo_empty,
                    lse_ptr,
                    delta_ptr,
                    dq_ptr,
                    dk_ptr,
                    dv_ptr,
                    sdq_z,
                    sdq_h,
                    sdq_l,
                    sdk_z,
                    sdk_h,
                    sdk_l,
                    sdv_z,
                    sdv_h,
                    sdv_l,
                    H,
                    L,
                    S,
                    GROUP,
                    qk_scale,
                    scale,
                    offset,
                    left,
                    right,
                    1,
                    HAS_LEFT,
                    HAS_RIGHT,
                    HEAD_D,
                    BLOCK_M,
                    BLOCK_N,
                    STAGES,
                ),
            ),  # fmt: skip
        ],
        [1, 4],
        [LOADER_REGS, CONSUMER_REGS],
    )
