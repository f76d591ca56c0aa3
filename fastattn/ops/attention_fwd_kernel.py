"""Triton kernel of the attention forward pass (FlashAttention-2: online softmax, O(L) memory).

One program takes ``BLOCK_M`` queries of one (batch, head) and streams the visible key/value tiles through
on-chip memory, keeping a running row max ``m`` and row sum ``l`` in the log2 domain (``exp2`` with
``log2(e)`` folded into the scale). It writes the output and the natural-log log-sum-exp of each row,
which is all the backward needs to recompute the probabilities.
"""

import triton
import triton.language as tl

from .attention_tiles import (
    LN2,
    LOG2E,
    _clip_to_split,
    _dropout_keep,
    _rope_rows,
    _sequence,
    _skip_if_past,
    _visible,
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
def _fwd_tiles(
    acc,
    l_i,
    m_i,
    q,
    k_base,
    v_base,
    b_base,
    start_n,
    end_n,
    offs_m,
    offs_dk,
    offs_dv,
    skn,
    skd,
    svn,
    svd,
    sbm,
    sbn,
    L,
    S,
    qk_scale,
    offset,
    left,
    right,
    seed,
    philox_offset,
    bh,
    dropout_p,
    HEAD_DK: tl.constexpr,
    HEAD_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    BIAS_MODE: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    z,
    hk,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    USE_TMA: tl.constexpr,
    alibi2,
    HAS_ALIBI: tl.constexpr,
    COS,
    SIN,
    rot,
    rot_offset,
    HAS_ROTARY: tl.constexpr,
    ROT_INTERLEAVED: tl.constexpr,
    BT,
    sbt,
    PAGE,
    skz,
    svz,
    PAGED: tl.constexpr,
):
    for n0 in range(start_n, end_n, BLOCK_N):
        n0 = tl.multiple_of(n0, BLOCK_N)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_ok = offs_n < S
        if HAS_ROTARY:  # key j sits at table row rot_offset + j; its rotated copy lives only in registers
            k = _rope_rows(
                k_base, offs_n, offs_dk, skn, skd, S, offs_n + rot_offset, COS, SIN, rot, HEAD_DK, ROT_INTERLEAVED
            )
            k = tl.trans(k.to(q.dtype))
        elif PAGED:  # key j lives in page BT[z, j // PAGE] of the (pages, H_kv, PAGE, E) cache, at row j % PAGE
            page = tl.load(BT + z * sbt + offs_n // PAGE, mask=kv_ok, other=0).to(tl.int64)
            k_rows = page * skz + (offs_n % PAGE) * skn
            v_rows = page * svz + (offs_n % PAGE) * svn
            k_ptrs = k_base + k_rows[None, :] + offs_dk[:, None] * skd
            k = tl.load(k_ptrs, mask=kv_ok[None, :] & (offs_dk[:, None] < HEAD_DK), other=0.0)
        else:
            k = _load_kt(k_base, z, hk, n0, offs_n, offs_dk, skn, skd, S, HEAD_DK, BLOCK_N, BLOCK_DK, MASKED, USE_TMA)
        s = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale
        if BIAS_MODE != 0:
            b_ptrs = b_base + offs_m[:, None] * sbm + offs_n[None, :] * sbn
            b_ok = (offs_m[:, None] < L) & kv_ok[None, :]
            if BIAS_MODE == 1:
                s += tl.load(b_ptrs, mask=b_ok, other=0.0).to(tl.float32) * LOG2E
            else:
                s = tl.where(tl.load(b_ptrs, mask=b_ok, other=0) != 0, s, float("-inf"))
        if HAS_ALIBI:  # -slope * |i + offset - j|, in log2 units like the rest of s
            s -= alibi2 * tl.abs((offs_m[:, None] + offset - offs_n[None, :]).to(tl.float32))
        if MASKED:
            ok = _visible(offs_m[:, None], offs_n[None, :], L, S, offset, left, right, HAS_LEFT, HAS_RIGHT)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only masked scores keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, philox_offset, bh, offs_m[:, None], offs_n[None, :], dropout_p)
            p = tl.where(keep, p, 0.0)
        if PAGED:
            v_ptrs = v_base + v_rows[:, None] + offs_dv[None, :] * svd
            v = tl.load(v_ptrs, mask=kv_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
        else:
            v = _load_v(v_base, z, hk, n0, offs_n, offs_dv, svn, svd, S, HEAD_DV, BLOCK_N, BLOCK_DV, MASKED, USE_TMA)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_fwd_kernel(
    Q,
    K,
    V,
    B,
    O,
    LSE,
    sqz,
    sqh,
    sqm,
    sqd,
    skz,
    skh,
    skn,
    skd,
    svz,
    svh,
    svn,
    svd,
    sbz,
    sbh,
    sbm,
    sbn,
    soz,
    soh,
    som,
    sod,
    H,
    L,
    S,
    scale,
    offset,
    left,
    right,
    dropout_p,
    seed,
    philox_offset,
    ALIBI,
    sal_z,
    sal_h,
    COS,
    SIN,
    rot,
    rot_offset,
    SEQ,
    slse_z,
    slse_h,
    split_len,
    so_split,
    slse_split,
    BT,
    sbt,
    PAGE,
    GROUP: tl.constexpr,
    HEAD_DK: tl.constexpr,
    HEAD_DV: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BIAS_MODE: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False,
    HAS_ALIBI: tl.constexpr = False,
    HAS_ROTARY: tl.constexpr = False,
    ROT_INTERLEAVED: tl.constexpr = False,
    VARLEN: tl.constexpr = False,
    SPLIT: tl.constexpr = False,
    PAGED: tl.constexpr = False,
):
    """Grid ``(cdiv(L, BLOCK_M), Z * H[, splits])``. Q is (Z, H, L, E); K, V are (Z, H // GROUP, S, E/Ev);
    B (BIAS_MODE 1: additive float, 2: bool keep-mask) is addressed through broadcast strides;
    O is (Z, H, L, Ev); LSE float32 at ``z * slse_z + h * slse_h + row``. VARLEN: per-sequence rows and
    lengths from SEQ (see ``_sequence``); L and S are then the longest ones. SPLIT: program_id(2) takes keys
    ``[split * split_len, (split + 1) * split_len)`` and writes its partial O (unnormalized by the other splits)
    and LSE ``split * so_split`` / ``split * slse_split`` further on. PAGED: K and V are (pages, H_kv, PAGE, E)
    caches and key j of sequence z is row j % PAGE of page BT[z * sbt + j // PAGE]."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    z = bh // H
    h = bh % H
    hk = h // GROUP
    L, S, offset, q_row0, k_row0 = _sequence(SEQ, z, L, S, offset, VARLEN)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)

    z64 = z.to(tl.int64)
    q_base = Q + z64 * sqz + h.to(tl.int64) * sqh + q_row0 * sqm
    if USE_TMA:  # K and V are (Z, H_kv, S, E) tensor descriptors, addressed by (z, hk, n, 0)
        k_base = K
        v_base = V
    else:
        k_base = K + z64 * skz + hk.to(tl.int64) * skh + k_row0 * skn
        v_base = V + z64 * svz + hk.to(tl.int64) * svh + k_row0 * svn
    if PAGED:  # rows are found page by page in the tiles
        k_base = K + hk.to(tl.int64) * skh
        v_base = V + hk.to(tl.int64) * svh
    b_base = B + z64 * sbz + h.to(tl.int64) * sbh

    if HAS_ROTARY:  # query i sits at table row rot_offset + i + offset (aligned with the keys like causal)
        pos_q = offs_m + offset + rot_offset
        q = _rope_rows(q_base, offs_m, offs_dk, sqm, sqd, L, pos_q, COS, SIN, rot, HEAD_DK, ROT_INTERLEAVED)
        q = q.to(Q.dtype.element_ty)
    else:
        q = tl.load(
            q_base + offs_m[:, None] * sqm + offs_dk[None, :] * sqd,
            mask=(offs_m[:, None] < L) & (offs_dk[None, :] < HEAD_DK),
            other=0.0,
        )
    qk_scale = scale * LOG2E
    alibi2 = 0.0
    if HAS_ALIBI:  # ALIBI: float32 slopes, (Z, H) through strides (sal_z = 0 when shared by the batch)
        alibi2 = tl.load(ALIBI + z * sal_z + h * sal_h) * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)

    lo, full_lo, full_hi, hi = _visible_ranges(start_m, BLOCK_M, BLOCK_N, offset, left, right, S, HAS_LEFT, HAS_RIGHT)
    if VARLEN:
        lo, full_lo, full_hi, hi = _skip_if_past(start_m, L, lo, full_lo, full_hi, hi)
    split = tl.program_id(2).to(tl.int64)
    if SPLIT:
        lo, full_lo, full_hi, hi = _clip_to_split(split, split_len, lo, full_lo, full_hi, hi)
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
            acc,
            l_i,
            m_i,
            q,
            k_base,
            v_base,
            b_base,
            r_start,
            r_end,
            offs_m,
            offs_dk,
            offs_dv,
            skn,
            skd,
            svn,
            svd,
            sbm,
            sbn,
            L,
            S,
            qk_scale,
            offset,
            left,
            right,
            seed,
            philox_offset,
            bh,
            dropout_p,
            HEAD_DK,
            HEAD_DV,
            BLOCK_N,
            region != 1,
            BIAS_MODE,
            HAS_LEFT,
            HAS_RIGHT,
            HAS_DROPOUT,
            INPUT_PRECISION,
            z,
            hk,
            BLOCK_DK,
            BLOCK_DV,
            USE_TMA,
            alibi2,
            HAS_ALIBI,
            COS,
            SIN,
            rot,
            rot_offset,
            HAS_ROTARY,
            ROT_INTERLEAVED,
            BT,
            sbt,
            PAGE,
            skz,
            svz,
            PAGED,
        )

    # Fully masked rows (l == 0) give 0 output and lse = -inf, as torch's SDPA gives 0 there.
    empty = l_i == 0.0
    inv_l = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    out = acc * inv_l[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * LN2)
    lse_base = LSE + z64 * slse_z + h.to(tl.int64) * slse_h + q_row0 + split * slse_split
    tl.store(lse_base + offs_m, lse, mask=offs_m < L)
    o_base = O + z64 * soz + h.to(tl.int64) * soh + q_row0 * som + split * so_split
    tl.store(
        o_base + offs_m[:, None] * som + offs_dv[None, :] * sod,
        out.to(O.dtype.element_ty),
        mask=(offs_m[:, None] < L) & (offs_dv[None, :] < HEAD_DV),
    )
