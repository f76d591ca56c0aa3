"""Triton kernels of the attention backward pass (FlashAttention-2, recomputation from the saved LSE).

Three launches, no atomics, so gradients are bit-identical run to run:
- ``_attention_bwd_preprocess_kernel``: ``delta_i = sum_d dO_id * O_id`` (fp32);
- ``_attention_bwd_dkdv_kernel``: one program per key tile of a key/value head, streaming the query tiles of
  every query head of its GQA group; it owns its dK/dV rows, so they are written once;
- ``_attention_bwd_dq_kernel``: one program per query tile, streaming key tiles; it also writes the score
  gradient dS when the bias needs a gradient (dS is exactly d loss / d bias).
"""

import triton
import triton.language as tl

from .attention_tiles import LOG2E, _dropout_keep, _load_rows, _sequence, _skip_if_past, _visible, _visible_ranges


@triton.jit
def _attention_bwd_preprocess_kernel(
    O,
    DO,
    DELTA,
    soz,
    soh,
    som,
    sod,
    sdoz,
    sdoh,
    sdom,
    sdod,
    H,
    L,
    SEQ,
    slse_z,
    slse_h,
    HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    VARLEN: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    z = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    L, _, _, row0, _ = _sequence(SEQ, z, L, L, 0, VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    ok = (offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DV)
    rows = row0 + offs_m
    o = tl.load(O + z * soz + h * soh + rows[:, None] * som + offs_d[None, :] * sod, mask=ok, other=0.0)
    do = tl.load(DO + z * sdoz + h * sdoh + rows[:, None] * sdom + offs_d[None, :] * sdod, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + z * slse_z + h * slse_h + rows, delta, mask=offs_m < L)


@triton.jit
def _lse_log2(lse):
    # Fully masked rows carry lse = -inf; +inf makes their recomputed probabilities exp2(-inf) = 0.
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _dkdv_tiles(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    b_base,
    lse_base,
    delta_base,
    start_m,
    end_m,
    offs_n,
    offs_dk,
    offs_dv,
    sqm,
    sqd,
    sdom,
    sdod,
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
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,
    BIAS_MODE: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    z,
    h,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    USE_TMA: tl.constexpr,
    alibi2,
    HAS_ALIBI: tl.constexpr,
):
    for m0 in range(start_m, end_m, BLOCK_M):
        offs_m = tl.multiple_of(m0, BLOCK_M) + tl.arange(0, BLOCK_M)
        q_ok = offs_m < L
        q = _load_rows(q_base, z, h, m0, offs_m, offs_dk, sqm, sqd, L, HEAD_DK, BLOCK_M, BLOCK_DK, USE_TMA)
        lse2 = _lse_log2(tl.load(lse_base + offs_m, mask=q_ok, other=0.0))
        # Transposed scores (keys x queries), so that dV and dK come out of plain row-major products.
        s = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale
        if BIAS_MODE != 0:
            b_ptrs = b_base + offs_m[None, :] * sbm + offs_n[:, None] * sbn
            b_ok = q_ok[None, :] & (offs_n[:, None] < S)
            if BIAS_MODE == 1:
                s += tl.load(b_ptrs, mask=b_ok, other=0.0).to(tl.float32) * LOG2E
            else:
                s = tl.where(tl.load(b_ptrs, mask=b_ok, other=0) != 0, s, float("-inf"))
        if HAS_ALIBI:
            s -= alibi2 * tl.abs((offs_m[None, :] + offset - offs_n[:, None]).to(tl.float32))
        if MASKED:
            ok = _visible(offs_m[None, :], offs_n[:, None], L, S, offset, left, right, HAS_LEFT, HAS_RIGHT)
            s = tl.where(ok, s, float("-inf"))
        p = tl.math.exp2(s - lse2[None, :])
        do = _load_rows(do_base, z, h, m0, offs_m, offs_dv, sdom, sdod, L, HEAD_DV, BLOCK_M, BLOCK_DV, USE_TMA)
        dp = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, philox_offset, bh, offs_m[None, :], offs_n[:, None], dropout_p)
            inv_keep = 1.0 / (1.0 - dropout_p)
            dv += tl.dot(tl.where(keep, p * inv_keep, 0.0).to(do.dtype), do, input_precision=INPUT_PRECISION)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        else:
            dv += tl.dot(p.to(do.dtype), do, input_precision=INPUT_PRECISION)
        delta = tl.load(delta_base + offs_m, mask=q_ok, other=0.0)
        ds = p * (dp - delta[None, :])
        dk += tl.dot(ds.to(q.dtype), q, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q,
    K,
    V,
    B,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
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
    sdoz,
    sdoh,
    sdom,
    sdod,
    sdkz,
    sdkh,
    sdkn,
    sdkd,
    sdvz,
    sdvh,
    sdvn,
    sdvd,
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
    SEQ,
    slse_z,
    slse_h,
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
    VARLEN: tl.constexpr = False,
):
    """Grid ``(cdiv(S, BLOCK_N), Z * H // GROUP)``: dK, dV of one key tile of one key/value head. LSE and
    DELTA at ``z * slse_z + h * slse_h + row``; VARLEN as in the forward kernel."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    HK = H // GROUP
    z = bhk // HK
    hk = bhk % HK
    L, S, offset, q_row0, k_row0 = _sequence(SEQ, z, L, S, offset, VARLEN)
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < S
    z64 = z.to(tl.int64)
    k = tl.load(
        K + z64 * skz + hk.to(tl.int64) * skh + (k_row0 + offs_n)[:, None] * skn + offs_dk[None, :] * skd,
        mask=n_ok[:, None] & (offs_dk[None, :] < HEAD_DK),
        other=0.0,
    )
    v = tl.load(
        V + z64 * svz + hk.to(tl.int64) * svh + (k_row0 + offs_n)[:, None] * svn + offs_dv[None, :] * svd,
        mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DV),
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_DK], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    qk_scale = scale * LOG2E
    # Seen from a key, the visible queries obey the same rule with the roles of the two sides swapped.
    lo, full_lo, full_hi, hi = _visible_ranges(start_n, BLOCK_N, BLOCK_M, -offset, right, left, L, HAS_RIGHT, HAS_LEFT)
    if VARLEN:
        lo, full_lo, full_hi, hi = _skip_if_past(start_n, S, lo, full_lo, full_hi, hi)
    for g in range(GROUP):
        h = hk * GROUP + g
        bh = z * H + h
        alibi2 = 0.0
        if HAS_ALIBI:
            alibi2 = tl.load(ALIBI + z * sal_z + h * sal_h) * LOG2E
        if USE_TMA:  # Q and DO are (Z, H, L, E) tensor descriptors, addressed by (z, h, m, 0)
            q_base = Q
            do_base = DO
        else:
            q_base = Q + z64 * sqz + h.to(tl.int64) * sqh + q_row0 * sqm
            do_base = DO + z64 * sdoz + h.to(tl.int64) * sdoh + q_row0 * sdom
        b_base = B + z64 * sbz + h.to(tl.int64) * sbh
        lse_base = LSE + z64 * slse_z + h.to(tl.int64) * slse_h + q_row0
        delta_base = DELTA + z64 * slse_z + h.to(tl.int64) * slse_h + q_row0
        # Regions [lo, full_lo) and [full_hi, hi) cross a mask edge and pay for the element mask; the middle
        # region [full_lo, full_hi) runs unmasked. Unrolled at compile time, so MASKED stays a constexpr.
        for region in tl.static_range(3):
            if region == 0:
                r_start, r_end = lo, full_lo
            elif region == 1:
                r_start, r_end = full_lo, full_hi
            else:
                r_start, r_end = full_hi, hi
            dk, dv = _dkdv_tiles(
                dk,
                dv,
                k,
                v,
                q_base,
                do_base,
                b_base,
                lse_base,
                delta_base,
                r_start,
                r_end,
                offs_n,
                offs_dk,
                offs_dv,
                sqm,
                sqd,
                sdom,
                sdod,
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
                BLOCK_M,
                region != 1,
                BIAS_MODE,
                HAS_LEFT,
                HAS_RIGHT,
                HAS_DROPOUT,
                INPUT_PRECISION,
                z,
                h,
                BLOCK_DK,
                BLOCK_DV,
                USE_TMA,
                alibi2,
                HAS_ALIBI,
            )
    dk *= scale
    tl.store(
        DK + z64 * sdkz + hk.to(tl.int64) * sdkh + (k_row0 + offs_n)[:, None] * sdkn + offs_dk[None, :] * sdkd,
        dk.to(DK.dtype.element_ty),
        mask=n_ok[:, None] & (offs_dk[None, :] < HEAD_DK),
    )
    tl.store(
        DV + z64 * sdvz + hk.to(tl.int64) * sdvh + (k_row0 + offs_n)[:, None] * sdvn + offs_dv[None, :] * sdvd,
        dv.to(DV.dtype.element_ty),
        mask=n_ok[:, None] & (offs_dv[None, :] < HEAD_DV),
    )


@triton.jit
def _dq_tiles(
    dq,
    q,
    do,
    lse2,
    delta,
    k_base,
    v_base,
    b_base,
    db_base,
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
    sdbm,
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
    BIAS_GRAD: tl.constexpr,
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
):
    for n0 in range(start_n, end_n, BLOCK_N):
        offs_n = tl.multiple_of(n0, BLOCK_N) + tl.arange(0, BLOCK_N)
        n_ok = offs_n < S
        k = _load_rows(k_base, z, hk, n0, offs_n, offs_dk, skn, skd, S, HEAD_DK, BLOCK_N, BLOCK_DK, USE_TMA)
        v = _load_rows(v_base, z, hk, n0, offs_n, offs_dv, svn, svd, S, HEAD_DV, BLOCK_N, BLOCK_DV, USE_TMA)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        tile_ok = (offs_m[:, None] < L) & n_ok[None, :]
        if BIAS_MODE != 0:
            b_ptrs = b_base + offs_m[:, None] * sbm + offs_n[None, :] * sbn
            if BIAS_MODE == 1:
                s += tl.load(b_ptrs, mask=tile_ok, other=0.0).to(tl.float32) * LOG2E
            else:
                s = tl.where(tl.load(b_ptrs, mask=tile_ok, other=0) != 0, s, float("-inf"))
        if HAS_ALIBI:
            s -= alibi2 * tl.abs((offs_m[:, None] + offset - offs_n[None, :]).to(tl.float32))
        if MASKED:
            ok = _visible(offs_m[:, None], offs_n[None, :], L, S, offset, left, right, HAS_LEFT, HAS_RIGHT)
            s = tl.where(ok, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, philox_offset, bh, offs_m[:, None], offs_n[None, :], dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if BIAS_GRAD:
            tl.store(db_base + offs_m[:, None] * sdbm + offs_n[None, :], ds, mask=tile_ok)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def _attention_bwd_dq_kernel(
    Q,
    K,
    V,
    B,
    DO,
    LSE,
    DELTA,
    DQ,
    DB,
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
    sdoz,
    sdoh,
    sdom,
    sdod,
    sdqz,
    sdqh,
    sdqm,
    sdqd,
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
    SEQ,
    slse_z,
    slse_h,
    GROUP: tl.constexpr,
    HEAD_DK: tl.constexpr,
    HEAD_DV: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BIAS_MODE: tl.constexpr,
    BIAS_GRAD: tl.constexpr,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False,
    HAS_ALIBI: tl.constexpr = False,
    VARLEN: tl.constexpr = False,
):
    """Grid ``(cdiv(L, BLOCK_M), Z * H)``: dQ of one query tile; DB, when BIAS_GRAD, is a zeroed
    contiguous (Z, H, L, S) float32 buffer that receives dS on the visible tiles (not with VARLEN)."""
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
    m_ok = offs_m < L
    z64 = z.to(tl.int64)
    q = tl.load(
        Q + z64 * sqz + h.to(tl.int64) * sqh + (q_row0 + offs_m)[:, None] * sqm + offs_dk[None, :] * sqd,
        mask=m_ok[:, None] & (offs_dk[None, :] < HEAD_DK),
        other=0.0,
    )
    do = tl.load(
        DO + z64 * sdoz + h.to(tl.int64) * sdoh + (q_row0 + offs_m)[:, None] * sdom + offs_dv[None, :] * sdod,
        mask=m_ok[:, None] & (offs_dv[None, :] < HEAD_DV),
        other=0.0,
    )
    row_base = z64 * slse_z + h.to(tl.int64) * slse_h + q_row0
    lse2 = _lse_log2(tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0))
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    if USE_TMA:  # K and V are (Z, H_kv, S, E) tensor descriptors, addressed by (z, hk, n, 0)
        k_base = K
        v_base = V
    else:
        k_base = K + z64 * skz + hk.to(tl.int64) * skh + k_row0 * skn
        v_base = V + z64 * svz + hk.to(tl.int64) * svh + k_row0 * svn
    b_base = B + z64 * sbz + h.to(tl.int64) * sbh
    db_base = DB + bh.to(tl.int64) * L * S
    dq = tl.zeros([BLOCK_M, BLOCK_DK], tl.float32)
    qk_scale = scale * LOG2E
    alibi2 = 0.0
    if HAS_ALIBI:
        alibi2 = tl.load(ALIBI + z * sal_z + h * sal_h) * LOG2E
    lo, full_lo, full_hi, hi = _visible_ranges(start_m, BLOCK_M, BLOCK_N, offset, left, right, S, HAS_LEFT, HAS_RIGHT)
    if VARLEN:
        lo, full_lo, full_hi, hi = _skip_if_past(start_m, L, lo, full_lo, full_hi, hi)
    # Regions [lo, full_lo) and [full_hi, hi) cross a mask edge and pay for the element mask; the middle
    # region [full_lo, full_hi) runs unmasked. Unrolled at compile time, so MASKED stays a constexpr.
    for region in tl.static_range(3):
        if region == 0:
            r_start, r_end = lo, full_lo
        elif region == 1:
            r_start, r_end = full_lo, full_hi
        else:
            r_start, r_end = full_hi, hi
        dq = _dq_tiles(
            dq,
            q,
            do,
            lse2,
            delta,
            k_base,
            v_base,
            b_base,
            db_base,
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
            S,
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
            BIAS_GRAD,
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
        )
    dq *= scale
    tl.store(
        DQ + z64 * sdqz + h.to(tl.int64) * sdqh + (q_row0 + offs_m)[:, None] * sdqm + offs_dk[None, :] * sdqd,
        dq.to(DQ.dtype.element_ty),
        mask=m_ok[:, None] & (offs_dk[None, :] < HEAD_DK),
    )
