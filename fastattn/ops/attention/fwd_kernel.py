"""Triton kernel of the attention forward pass (FlashAttention-2: online softmax, O(L) memory).

One program takes ``BLOCK_M`` queries of one (batch, head) and streams the visible key/value tiles through
on-chip memory, keeping a running row max ``m`` and row sum ``l`` in the log2 domain (``exp2`` with
``log2(e)`` folded into the scale). It writes the output and the natural-log log-sum-exp of each row,
which is all the backward needs to recompute the probabilities.
"""

import triton
import triton.language as tl

from .tiles import (
    LN2,
    _alibi2,
    _clip_to_split,
    _dropout_keep,
    _logits,
    _rope_rows,
    _sequence,
    _sink2,
    _skip_if_past,
    _visible_ranges,
)


@triton.jit
def _load_kt(
    k_base,
    z,
    hk,
    n0,
    offs_n,
    offs_dk,
    skn,
    skd,
    S,
    HEAD_DK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    MASKED: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Kᵀ tile (BLOCK_DK, BLOCK_N). With a tensor descriptor the copy engine zero-fills rows past S and
    columns past the head dim, so no mask is computed."""
    if USE_TMA:
        k = k_base.load([z, hk, n0, 0]).reshape(BLOCK_N, BLOCK_DK).trans()
    else:
        k_ptrs = k_base + offs_n[None, :] * skn + offs_dk[:, None] * skd
        if MASKED:
            k = tl.load(k_ptrs, mask=(offs_n[None, :] < S) & (offs_dk[:, None] < HEAD_DK), other=0.0)
        else:
            k = tl.load(k_ptrs, mask=offs_dk[:, None] < HEAD_DK, other=0.0)
    return k


@triton.jit
def _load_v(
    v_base,
    z,
    hk,
    n0,
    offs_n,
    offs_dv,
    svn,
    svd,
    S,
    HEAD_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """V tile (BLOCK_N, BLOCK_DV), as ``_load_kt``."""
    if USE_TMA:
        v = v_base.load([z, hk, n0, 0]).reshape(BLOCK_N, BLOCK_DV)
    else:
        v_ptrs = v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd
        if MASKED:
            v = tl.load(v_ptrs, mask=(offs_n[:, None] < S) & (offs_dv[None, :] < HEAD_DV), other=0.0)
        else:
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < HEAD_DV, other=0.0)
    return v


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, b_base, start_n, end_n, offs_m, K, V, L, S, offset, z, h, hk, bh,
               alibi2, scale, sc, mods, bm_row, win, drop, rope, rows, t: tl.constexpr,
               MASKED: tl.constexpr):  # fmt: skip
    offs_dk = tl.arange(0, t.BLOCK_DK)
    offs_dv = tl.arange(0, t.BLOCK_DV)
    for n0 in range(start_n, end_n, t.BLOCK_N):
        n0 = tl.multiple_of(n0, t.BLOCK_N)
        state = 1  # without a block mask every visited tile runs, its user mask (if any) element by element
        run = True
        if mods.HAS_BLOCK_MASK:  # skip the tiles the block mask calls empty, drop the mask on full ones
            state = tl.load(mods.bm + bm_row + n0 // mods.BM_BLOCK).to(tl.int32)
            run = state != 0
        if run:
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, b_base, n0, offs_m, offs_dk, offs_dv, K, V, L,
                                      S, offset, z, h, hk, bh, alibi2, scale, sc, mods, state, win, drop, rope, rows,
                                      t, MASKED)  # fmt: skip
    return acc, l_i, m_i


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, b_base, n0, offs_m, offs_dk, offs_dv, K, V, L, S, offset, z, h, hk,
              bh, alibi2, scale, sc, mods, state, win, drop, rope, rows, t: tl.constexpr,
              MASKED: tl.constexpr):  # fmt: skip
    """One key tile of the online softmax."""
    offs_n = n0 + tl.arange(0, t.BLOCK_N)
    kv_ok = offs_n < S
    if rope.ON:  # key j sits at table row rope.offset + j; its rotated copy lives only in registers
        k = _rope_rows(
            k_base, offs_n, offs_dk, K.sn, K.sd, S, offs_n + rope.offset, rope.cos, rope.sin, rope.dim,
            t.HEAD_DK, rope.INTERLEAVED,
        )  # fmt: skip
        k = tl.trans(k.to(q.dtype))
    elif rows.PAGED:  # key j lives in page bt[z, j // page] of the (pages, H_kv, page, E) cache, row j % page
        page = tl.load(rows.bt + z * rows.sbt + offs_n // rows.page, mask=kv_ok, other=0).to(tl.int64)
        k_rows = page * K.sz + (offs_n % rows.page) * K.sn
        v_rows = page * V.sz + (offs_n % rows.page) * V.sn
        k_ptrs = k_base + k_rows[None, :] + offs_dk[:, None] * K.sd
        k = tl.load(k_ptrs, mask=kv_ok[None, :] & (offs_dk[:, None] < t.HEAD_DK), other=0.0)
    else:
        k = _load_kt(k_base, z, hk, n0, offs_n, offs_dk, K.sn, K.sd, S, t.HEAD_DK, t.BLOCK_N, t.BLOCK_DK,
                     MASKED, t.USE_TMA)  # fmt: skip
    qk = tl.dot(q, k, input_precision=t.INPUT_PRECISION)
    s, _ = _logits(qk, sc, mods, b_base, alibi2, scale, z, h, offs_m[:, None], offs_n[None, :], L, S, offset, win,
                   state, MASKED)  # fmt: skip
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen only masked scores keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    if drop.ON:
        p = tl.where(_dropout_keep(drop, bh, offs_m[:, None], offs_n[None, :]), p, 0.0)
    if rows.PAGED:
        v_ptrs = v_base + v_rows[:, None] + offs_dv[None, :] * V.sd
        v = tl.load(v_ptrs, mask=kv_ok[:, None] & (offs_dv[None, :] < t.HEAD_DV), other=0.0)
    else:
        v = _load_v(v_base, z, hk, n0, offs_n, offs_dv, V.sn, V.sd, S, t.HEAD_DV, t.BLOCK_N, t.BLOCK_DV, MASKED,
                    t.USE_TMA)  # fmt: skip
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=t.INPUT_PRECISION)
    m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(Q, K, V, O, LSE, H, L, S, scale, sc, mods, win, drop, rope, rows, t: tl.constexpr):
    """Grid ``(cdiv(L, BLOCK_M), Z * H[, splits])``. Q is (Z, H, L, E); K, V are (Z, H // GROUP, S, E/Ev)
    (``Operand`` tuples: tensor and strides); the bias of ``sc`` is addressed through broadcast strides;
    O is (Z, H, L, Ev); LSE float32 at ``z * slse_z + h * slse_h + row``. VARLEN: per-sequence rows and
    lengths from ``rows.seq`` (see ``_sequence``); L and S are then the longest ones. SPLIT: program_id(2)
    takes keys ``[split * split_len, (split + 1) * split_len)`` and writes its partial O (unnormalized by the
    other splits) and LSE ``split * so_split`` / ``split * slse_split`` further on. PAGED: K and V are
    (pages, H_kv, page, E) caches and key j of sequence z is row j % page of page bt[z * sbt + j // page].
    Sinks: each row starts with the sink logit as its running max and 1 as its sum (a key with no value), in
    split 0 only, so a merge of the splits counts it once."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    z = bh // H
    h = bh % H
    hk = h // t.GROUP
    L, S, offset, q_row0, k_row0 = _sequence(rows, z, L, S, win.offset)
    start_m = pid_m * t.BLOCK_M
    offs_m = start_m + tl.arange(0, t.BLOCK_M)
    offs_dk = tl.arange(0, t.BLOCK_DK)
    offs_dv = tl.arange(0, t.BLOCK_DV)

    z64 = z.to(tl.int64)
    q_base = Q.ptr + z64 * Q.sz + h.to(tl.int64) * Q.sh + q_row0 * Q.sn
    if t.USE_TMA:  # K and V are (Z, H_kv, S, E) tensor descriptors, addressed by (z, hk, n, 0)
        k_base = K.ptr
        v_base = V.ptr
    else:
        k_base = K.ptr + z64 * K.sz + hk.to(tl.int64) * K.sh + k_row0 * K.sn
        v_base = V.ptr + z64 * V.sz + hk.to(tl.int64) * V.sh + k_row0 * V.sn
    if rows.PAGED:  # rows are found page by page in the tiles
        k_base = K.ptr + hk.to(tl.int64) * K.sh
        v_base = V.ptr + hk.to(tl.int64) * V.sh
    b_base = sc.bias + z64 * sc.sbz + h.to(tl.int64) * sc.sbh

    if rope.ON:  # query i sits at table row rope.offset + i + offset (aligned with the keys like causal)
        pos_q = offs_m + offset + rope.offset
        q = _rope_rows(q_base, offs_m, offs_dk, Q.sn, Q.sd, L, pos_q, rope.cos, rope.sin, rope.dim, t.HEAD_DK,
                       rope.INTERLEAVED)  # fmt: skip
        q = q.to(Q.ptr.dtype.element_ty)
    else:
        q = tl.load(
            q_base + offs_m[:, None] * Q.sn + offs_dk[None, :] * Q.sd,
            mask=(offs_m[:, None] < L) & (offs_dk[None, :] < t.HEAD_DK),
            other=0.0,
        )
    alibi2 = _alibi2(sc, z, h)
    bm_row = z * mods.sbm_z + h * mods.sbm_h + (start_m // mods.BM_BLOCK) * mods.sbm_m
    split = tl.program_id(2).to(tl.int64)
    m_i = tl.full([t.BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([t.BLOCK_M], tl.float32)
    if sc.HAS_SINKS:  # the sink as a first key without value: running max its logit, running sum 1
        first = split == 0
        m_i = tl.where(first, tl.zeros([t.BLOCK_M], tl.float32) + _sink2(sc, h), m_i)
        l_i += tl.where(first, 1.0, 0.0)
    acc = tl.zeros([t.BLOCK_M, t.BLOCK_DV], tl.float32)

    lo, full_lo, full_hi, hi = _visible_ranges(
        start_m, t.BLOCK_M, t.BLOCK_N, offset, win.left, win.right, S, win.HAS_LEFT, win.HAS_RIGHT
    )
    if rows.VARLEN:
        lo, full_lo, full_hi, hi = _skip_if_past(start_m, L, lo, full_lo, full_hi, hi)
    if rows.SPLIT:
        lo, full_lo, full_hi, hi = _clip_to_split(split, rows.split_len, lo, full_lo, full_hi, hi)
    # Regions [lo, full_lo) and [full_hi, hi) cross a mask edge and pay for the element mask; the middle
    # region [full_lo, full_hi) runs unmasked. Unrolled at compile time, so MASKED stays a constexpr.
    for region in tl.static_range(3):
        if region == 0:
            r_start, r_end = lo, full_lo
        elif region == 1:
            r_start, r_end = full_lo, full_hi
        else:
            r_start, r_end = full_hi, hi
        acc, l_i, m_i = _fwd_tiles(
            acc, l_i, m_i, q, k_base, v_base, b_base, r_start, r_end, offs_m, K, V, L, S, offset, z, h, hk, bh,
            alibi2, scale, sc, mods, bm_row, win, drop, rope, rows, t, region != 1,
        )  # fmt: skip

    # Fully masked rows (l == 0) give 0 output and lse = -inf, as torch's SDPA gives 0 there.
    empty = l_i == 0.0
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    if drop.ON:
        inv_l = inv_l / (1.0 - drop.p)
    out = acc * inv_l[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    lse_base = LSE + z64 * rows.slse_z + h.to(tl.int64) * rows.slse_h + q_row0 + split * rows.slse_split
    tl.store(lse_base + offs_m, lse, mask=offs_m < L)
    o_base = O.ptr + z64 * O.sz + h.to(tl.int64) * O.sh + q_row0 * O.sn + split * rows.so_split
    tl.store(
        o_base + offs_m[:, None] * O.sn + offs_dv[None, :] * O.sd,
        out.to(O.ptr.dtype.element_ty),
        mask=(offs_m[:, None] < L) & (offs_dv[None, :] < t.HEAD_DV),
    )
