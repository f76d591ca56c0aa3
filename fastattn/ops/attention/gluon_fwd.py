"""The attention forward in Gluon for sm_90, FlashAttention-3's structure.

One program per SM walks its share of the (query tile, head, batch) tiles (longest tiles first, so a causal
grid ends evenly). Each program runs three partitions: a loader warp at a small register budget issuing the
bulk tensor copies of Q and of K/V into a ring of shared stages on mbarriers, and two consumer warpgroups
(the default partition and a worker at the large budget), each owning BLOCK_M of the tile's 2 * BLOCK_M query
rows. A consumer issues QK^T of key block n and PV of block n - 1 together, then runs the softmax of block n
while PV runs; and the two consumers take turns issuing their matrix products (ping-pong through two
mbarriers), so one group's exponentials run under the other's tensor-core work. P stays in registers for PV.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

LOG2E = gl.constexpr(1.4426950408889634)
LN2 = gl.constexpr(0.6931471805599453)


@gluon.jit
def _tile(t, Z, H, L, BLOCK_M: gl.constexpr):
    """Tile t -> (query block of 2 * BLOCK_M rows, batch, head); the query blocks with the most keys first."""
    n_q = gl.cdiv(L, 2 * BLOCK_M)
    zh = t % (Z * H)
    qb = n_q - 1 - t // (Z * H)
    return qb, zh // H, zh % H


@gluon.jit
def _key_range(qb, L, S, offset, left, right, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
               BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):  # fmt: skip
    """Key blocks [lo, hi) any row of the tile sees: query i sees keys i + offset - left .. i + offset + right."""
    first = qb * 2 * BLOCK_M
    last = gl.minimum(first + 2 * BLOCK_M, L) - 1
    lo = 0
    hi = S
    if HAS_LEFT:
        lo = gl.maximum(first + offset - left, 0)
    if HAS_RIGHT:
        hi = gl.minimum(last + offset + right + 1, S)
    hi = gl.maximum(hi, lo)
    return lo // BLOCK_N, gl.cdiv(hi, BLOCK_N)


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready, kv_empty,
            Z, H, L, S, GROUP, offset, left, right, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr,
            BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    tiles = gl.cdiv(L, 2 * BLOCK_M) * Z * H
    kv = 0
    it = 0
    for t in range(gl.program_id(0), tiles, gl.num_programs(0)):
        qb, z, h = _tile(t, Z, H, L, BLOCK_M)
        for c in gl.static_range(2):
            mbarrier.wait(q_empty.index(c), (it & 1) ^ 1)  # parity 1 passes before the first phase
            mbarrier.expect(q_ready.index(c), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [z, h, (2 * qb + c) * BLOCK_M, 0], q_ready.index(c),
                                            q_smem.index(c))  # fmt: skip
        lo, hi = _key_range(qb, L, S, offset, left, right, HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
        for n in range(lo, hi):
            s = kv % STAGES
            mbarrier.wait(kv_empty.index(s), ((kv // STAGES) & 1) ^ 1)
            mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [z, h // GROUP, n * BLOCK_N, 0], k_ready.index(s), k_smem.index(s))
            mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [z, h // GROUP, n * BLOCK_N, 0], v_ready.index(s), v_smem.index(s))
            kv += 1
        it += 1


@gluon.jit
def _tanh(x):
    # 1 - 2 / (e^2x + 1) through exp2, as the Triton kernels: saturates to +-1, no NaN.
    return 1.0 - 2.0 / (gl.exp2(x * (2.0 * LOG2E)) + 1.0)


@gluon.jit
def _softmax_step(s_acc, n, m_i, l_i, rows, qk_scale, cap_scale, cap2, S, offset, left, right,
                  HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, HAS_SOFTCAP: gl.constexpr, BLOCK_N: gl.constexpr,
                  layout: gl.constexpr):  # fmt: skip
    """Scores of key block n -> (P in float32, the rescale factor of the running output, new m, new l).
    Soft-capping: log2-domain scores cap2 * tanh(s_acc * cap_scale), cap2 = c log2(e), cap_scale = scale / c."""
    cols = n * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(0, layout))
    if HAS_SOFTCAP:
        s = _tanh(s_acc * cap_scale) * cap2
    else:
        s = s_acc * qk_scale
    ok = gl.expand_dims(cols < S, 0)
    diag = gl.expand_dims(cols, 0) - gl.expand_dims(rows + offset, 1)  # j - (i + offset)
    if HAS_RIGHT:
        ok = ok & (diag <= right)
    if HAS_LEFT:
        ok = ok & (diag >= -left)
    s = gl.where(ok, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1))
    # A row that has seen only masked scores keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
    m_shift = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s - gl.expand_dims(m_shift, 1))
    alpha = gl.exp2(m_i - m_shift)
    l_new = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_new


@gluon.jit
def _turn(turns, c: gl.constexpr, count):
    """Wait until this consumer may issue its matrix products (consumer 0 goes first)."""
    mbarrier.wait(turns.index(c), (count & 1) ^ (1 - c))


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, q_ready, q_empty, k_ready, v_ready, kv_empty, turns, o_ptr, lse_ptr,
              sinks_ptr, so_z, so_h, so_l, Z, H, L, S, qk_scale, cap_scale, cap2, offset, left, right,
              c: gl.constexpr, HAS_LEFT: gl.constexpr, HAS_RIGHT: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
              HAS_SINKS: gl.constexpr, HEAD_DV: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              BLOCK_D: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_D, 16])  # fmt: skip
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    tiles = gl.cdiv(L, 2 * BLOCK_M) * Z * H
    kv = 0
    it = 0
    turn = 0
    for t in range(gl.program_id(0), tiles, gl.num_programs(0)):
        qb, z, h = _tile(t, Z, H, L, BLOCK_M)
        lo, hi = _key_range(qb, L, S, offset, left, right, HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)
        rows = (2 * qb + c) * BLOCK_M + gl.arange(0, BLOCK_M, row_layout)
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_layout)
        l_i = gl.zeros([BLOCK_M], gl.float32, row_layout)
        if HAS_SINKS:  # the sink as a first key without value: running max its logit, running sum 1
            m_i = gl.zeros([BLOCK_M], gl.float32, row_layout) + gl.load(sinks_ptr + h) * LOG2E
            l_i = gl.full([BLOCK_M], 1.0, gl.float32, row_layout)
        acc = gl.zeros([BLOCK_M, BLOCK_D], gl.float32, o_layout)
        q = q_smem.index(c)
        mbarrier.wait(q_ready.index(c), it & 1)
        if hi > lo:
            # Prologue: scores of the first key block.
            s0 = kv % STAGES
            mbarrier.wait(k_ready.index(s0), (kv // STAGES) & 1)
            _turn(turns, c, turn)
            s_acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
            s_acc = warpgroup_mma(q, k_smem.index(s0).permute((1, 0)), s_acc, use_acc=False, is_async=True)
            mbarrier.arrive(turns.index(1 - c))
            turn += 1
            s_acc = warpgroup_mma_wait(0, deps=[s_acc])
            p, alpha, m_i, l_i = _softmax_step(s_acc, lo, m_i, l_i, rows, qk_scale, cap_scale, cap2, S, offset, left,
                                               right, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BLOCK_N, s_layout)  # fmt: skip
            p_op = gl.convert_layout(p.to(dtype), p_layout)  # P kept in registers, 16-bit, for PV
            for n in range(lo + 1, hi):
                sp = kv % STAGES  # the stage of block n - 1
                sn = (kv + 1) % STAGES
                mbarrier.wait(k_ready.index(sn), ((kv + 1) // STAGES) & 1)
                _turn(turns, c, turn)
                # The scores' registers are free again (last block's softmax is done): reuse them, zeroed.
                s_acc = warpgroup_mma(q, k_smem.index(sn).permute((1, 0)), s_acc, use_acc=False, is_async=True)
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
                mbarrier.wait(v_ready.index(sp), (kv // STAGES) & 1)
                acc = warpgroup_mma(p_op, v_smem.index(sp), acc, is_async=True)
                mbarrier.arrive(turns.index(1 - c))
                turn += 1
                s_acc = warpgroup_mma_wait(1, deps=[s_acc])  # QK^T of block n done; PV of n - 1 runs on
                p, alpha, m_i, l_i = _softmax_step(s_acc, n, m_i, l_i, rows, qk_scale, cap_scale, cap2, S, offset,
                                                   left, right, HAS_LEFT, HAS_RIGHT, HAS_SOFTCAP, BLOCK_N,
                                                   s_layout)  # fmt: skip
                acc = warpgroup_mma_wait(0, deps=[acc])
                p_op = gl.convert_layout(p.to(dtype), p_layout)
                mbarrier.arrive(kv_empty.index(sp))
                kv += 1
            # Epilogue: PV of the last block.
            sl = kv % STAGES
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
            mbarrier.wait(v_ready.index(sl), (kv // STAGES) & 1)
            _turn(turns, c, turn)
            acc = warpgroup_mma(p_op, v_smem.index(sl), acc, is_async=True)
            mbarrier.arrive(turns.index(1 - c))
            turn += 1
            acc = warpgroup_mma_wait(0, deps=[acc])
            mbarrier.arrive(kv_empty.index(sl))
            kv += 1
        mbarrier.arrive(q_empty.index(c))  # this tile's QK^T products are done: the loader may refill Q
        it += 1
        # Fully masked rows (l == 0) give 0 output and lse = -inf, as torch's SDPA gives 0 there.
        empty = l_i == 0.0
        inv = gl.where(empty, 0.0, 1.0 / gl.where(empty, 1.0, l_i))
        out = acc * gl.expand_dims(gl.convert_layout(inv, gl.SliceLayout(1, o_layout)), 1)
        o_rows = (2 * qb + c) * BLOCK_M + gl.arange(0, BLOCK_M, gl.SliceLayout(1, o_layout))
        o_cols = gl.arange(0, BLOCK_D, gl.SliceLayout(0, o_layout))
        o_off = z * so_z + h * so_h + gl.expand_dims(o_rows, 1) * so_l + gl.expand_dims(o_cols, 0)
        o_ok = gl.expand_dims(o_rows < L, 1) & gl.expand_dims(o_cols < HEAD_DV, 0)
        gl.store(o_ptr + o_off, out.to(dtype), mask=o_ok)
        lse = gl.where(empty, float("-inf"), (m_i + gl.log2(gl.where(empty, 1.0, l_i))) * LN2)
        gl.store(lse_ptr + (z * H + h) * L + rows, lse, mask=rows < L)


@gluon.jit
def attention_fwd_gluon_kernel(q_desc, k_desc, v_desc, o_ptr, lse_ptr, sinks_ptr, so_z, so_h, so_l, Z, H, L, S,
                               GROUP, qk_scale, cap_scale, cap2, offset, left, right, HAS_LEFT: gl.constexpr,
                               HAS_RIGHT: gl.constexpr, HAS_SOFTCAP: gl.constexpr, HAS_SINKS: gl.constexpr,
                               HEAD_DV: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                               STAGES: gl.constexpr, LOADER_REGS: gl.constexpr,
                               CONSUMER_REGS: gl.constexpr):  # fmt: skip
    """O (Z, H, L, Ev) and LSE (Z, H, L; natural log) of softmax(scale Q K^T) V, keys of query i limited to
    i + offset - left .. i + offset + right (HAS_LEFT / HAS_RIGHT); soft-capped scores (HAS_SOFTCAP) and a
    sink logit per query head from float32 ``sinks_ptr`` (HAS_SINKS) as in the Triton kernels. q/k/v_desc are
    4-D descriptors of boxes [1, 1, rows, BLOCK_D] (with the shared layout of a [rows, BLOCK_D] tile); GROUP
    query heads share one key/value head."""
    BLOCK_D: gl.constexpr = q_desc.block_type.shape[3]
    dtype: gl.constexpr = q_desc.dtype
    # The boxes are [1, 1, rows, BLOCK_D]; the descriptors' layouts are those of the 2-D [rows, BLOCK_D] tiles.
    q_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, BLOCK_D], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_D], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_D], v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1)
        mbarrier.init(turns.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)  # both consumers release a stage
    # (Argument tuples are spelled out for each partition: a tuple built by + or bound to a name inside a kernel
    # loses its constexprs in Triton 3.6, so the two consumers cannot share one.)
    gl.warp_specialize(
        [
            (
                _consumer,
                (
                    q_smem,
                    k_smem,
                    v_smem,
                    q_ready,
                    q_empty,
                    k_ready,
                    v_ready,
                    kv_empty,
                    turns,
                    o_ptr,
                    lse_ptr,
                    sinks_ptr,
                    so_z,
                    so_h,
                    so_l,
                    Z,
                    H,
                    L,
                    S,
                    qk_scale,
                    cap_scale,
                    cap2,
                    offset,
                    left,
                    right,
                    0,
                    HAS_LEFT,
                    HAS_RIGHT,
                    HAS_SOFTCAP,
                    HAS_SINKS,
                    HEAD_DV,
                    BLOCK_M,
                    BLOCK_N,
                    BLOCK_D,
                    STAGES,
                ),
            ),  # fmt: skip
            (
                _loader,
                (
                    q_desc,
                    k_desc,
                    v_desc,
                    q_smem,
                    k_smem,
                    v_smem,
                    q_ready,
                    q_empty,
                    k_ready,
                    v_ready,
                    kv_empty,
                    Z,
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
                _consumer,
                (
                    q_smem,
                    k_smem,
                    v_smem,
                    q_ready,
                    q_empty,
                    k_ready,
                    v_ready,
                    kv_empty,
                    turns,
                    o_ptr,
                    lse_ptr,
                    sinks_ptr,
                    so_z,
                    so_h,
                    so_l,
                    Z,
                    H,
                    L,
                    S,
                    qk_scale,
                    cap_scale,
                    cap2,
                    offset,
                    left,
                    right,
                    1,
                    HAS_LEFT,
                    HAS_RIGHT,
                    HAS_SOFTCAP,
                    HAS_SINKS,
                    HEAD_DV,
                    BLOCK_M,
                    BLOCK_N,
                    BLOCK_D,
                    STAGES,
                ),
            ),  # fmt: skip
        ],
        [1, 4],
        [LOADER_REGS, CONSUMER_REGS],
    )
