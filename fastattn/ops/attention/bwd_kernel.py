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

from .tiles import (
    LOG2E,
    _alibi2,
    _dropout_keep,
    _load_rows,
    _logits,
    _sequence,
    _skip_if_past,
    _visible_ranges,
)


@triton.jit
def _attention_bwd_preprocess_kernel(
    O, DO, DELTA, H, L, rows, HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    z = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    L, _, _, row0, _ = _sequence(rows, z, L, L, 0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    ok = (offs_m[:, None] < L) & (offs_d[None, :] < HEAD_DV)
    r = row0 + offs_m
    o = tl.load(O.ptr + z * O.sz + h * O.sh + r[:, None] * O.sn + offs_d[None, :] * O.sd, mask=ok, other=0.0)
    do = tl.load(DO.ptr + z * DO.sz + h * DO.sh + r[:, None] * DO.sn + offs_d[None, :] * DO.sd, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + z * rows.slse_z + h * rows.slse_h + r, delta, mask=offs_m < L)


@triton.jit
def _lse_log2(lse):
    # Fully masked rows carry lse = -inf; +inf makes their recomputed probabilities exp2(-inf) = 0.
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, b_base, lse_base, delta_base, start_m, end_m, offs_n, Q, DO, L, S,
                offset, z, h, bh, alibi2, scale, sc, mods, bm_head, win, drop, t: tl.constexpr,
                MASKED: tl.constexpr):  # fmt: skip
    offs_dk = tl.arange(0, t.BLOCK_DK)
    offs_dv = tl.arange(0, t.BLOCK_DV)
    for m0 in range(start_m, end_m, t.BLOCK_M):
        state = 1  # the block mask's state of this tile (see the forward)
        run = True
        if mods.HAS_BLOCK_MASK:
            state = tl.load(mods.bm + bm_head + (m0 // mods.BM_BLOCK) * mods.sbm_m).to(tl.int32)
            run = state != 0
        if run:
            offs_m = tl.multiple_of(m0, t.BLOCK_M) + tl.arange(0, t.BLOCK_M)
            q_ok = offs_m < L
            q = _load_rows(
                q_base, z, h, m0, offs_m, offs_dk, Q.sn, Q.sd, L, t.HEAD_DK, t.BLOCK_M, t.BLOCK_DK, t.USE_TMA
            )
            lse2 = _lse_log2(tl.load(lse_base + offs_m, mask=q_ok, other=0.0))
            # Transposed scores (keys x queries), so that dV and dK come out of plain row-major products.
            qk = tl.dot(k, tl.trans(q), input_precision=t.INPUT_PRECISION)
            s, dmod = _logits(qk, sc, mods, b_base, alibi2, scale, z, h, offs_m[None, :], offs_n[:, None], L, S,
                              offset, win, state, MASKED)  # fmt: skip
            p = tl.math.exp2(s - lse2[None, :])
            do = _load_rows(do_base, z, h, m0, offs_m, offs_dv, DO.sn, DO.sd, L, t.HEAD_DV, t.BLOCK_M, t.BLOCK_DV,
                            t.USE_TMA)  # fmt: skip
            dp = tl.dot(v, tl.trans(do), input_precision=t.INPUT_PRECISION)
            if drop.ON:
                keep = _dropout_keep(drop, bh, offs_m[None, :], offs_n[:, None])
                inv_keep = 1.0 / (1.0 - drop.p)
                dv += tl.dot(tl.where(keep, p * inv_keep, 0.0).to(do.dtype), do, input_precision=t.INPUT_PRECISION)
                dp = tl.where(keep, dp * inv_keep, 0.0)
            else:
                dv += tl.dot(p.to(do.dtype), do, input_precision=t.INPUT_PRECISION)
            delta = tl.load(delta_base + offs_m, mask=q_ok, other=0.0)
            ds = p * (dp - delta[None, :])
            if sc.HAS_SOFTCAP or mods.HAS_SCORE_MOD:
                ds = ds * dmod
            dk += tl.dot(ds.to(q.dtype), q, input_precision=t.INPUT_PRECISION)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, H, L, S, scale, sc, mods, win, drop, rows,
                               t: tl.constexpr):  # fmt: skip
    """Grid ``(cdiv(S, BLOCK_N), Z * H // GROUP)``: dK, dV of one key tile of one key/value head. LSE and
    DELTA at ``z * slse_z + h * slse_h + row``; VARLEN as in the forward kernel."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    HK = H // t.GROUP
    z = bhk // HK
    hk = bhk % HK
    L, S, offset, q_row0, k_row0 = _sequence(rows, z, L, S, win.offset)
    start_n = pid_n * t.BLOCK_N
    offs_n = start_n + tl.arange(0, t.BLOCK_N)
    offs_dk = tl.arange(0, t.BLOCK_DK)
    offs_dv = tl.arange(0, t.BLOCK_DV)
    n_ok = offs_n < S
    z64 = z.to(tl.int64)
    kr = k_row0 + offs_n
    k = tl.load(
        K.ptr + z64 * K.sz + hk.to(tl.int64) * K.sh + kr[:, None] * K.sn + offs_dk[None, :] * K.sd,
        mask=n_ok[:, None] & (offs_dk[None, :] < t.HEAD_DK),
        other=0.0,
    )
    v = tl.load(
        V.ptr + z64 * V.sz + hk.to(tl.int64) * V.sh + kr[:, None] * V.sn + offs_dv[None, :] * V.sd,
        mask=n_ok[:, None] & (offs_dv[None, :] < t.HEAD_DV),
        other=0.0,
    )
    dk = tl.zeros([t.BLOCK_N, t.BLOCK_DK], tl.float32)
    dv = tl.zeros([t.BLOCK_N, t.BLOCK_DV], tl.float32)
    # Seen from a key, the visible queries obey the same rule with the roles of the two sides swapped.
    lo, full_lo, full_hi, hi = _visible_ranges(
        start_n, t.BLOCK_N, t.BLOCK_M, -offset, win.right, win.left, L, win.HAS_RIGHT, win.HAS_LEFT
    )
    if rows.VARLEN:
        lo, full_lo, full_hi, hi = _skip_if_past(start_n, S, lo, full_lo, full_hi, hi)
    for g in range(t.GROUP):
        h = hk * t.GROUP + g
        bh = z * H + h
        alibi2 = _alibi2(sc, z, h)
        if t.USE_TMA:  # Q and DO are (Z, H, L, E) tensor descriptors, addressed by (z, h, m, 0)
            q_base = Q.ptr
            do_base = DO.ptr
        else:
            q_base = Q.ptr + z64 * Q.sz + h.to(tl.int64) * Q.sh + q_row0 * Q.sn
            do_base = DO.ptr + z64 * DO.sz + h.to(tl.int64) * DO.sh + q_row0 * DO.sn
        b_base = sc.bias + z64 * sc.sbz + h.to(tl.int64) * sc.sbh
        lse_base = LSE + z64 * rows.slse_z + h.to(tl.int64) * rows.slse_h + q_row0
        delta_base = DELTA + z64 * rows.slse_z + h.to(tl.int64) * rows.slse_h + q_row0
        bm_head = z * mods.sbm_z + h * mods.sbm_h + start_n // mods.BM_BLOCK  # this program's keys: one tile column
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
                dk, dv, k, v, q_base, do_base, b_base, lse_base, delta_base, r_start, r_end, offs_n, Q, DO, L, S,
                offset, z, h, bh, alibi2, scale, sc, mods, bm_head, win, drop, t, region != 1,
            )  # fmt: skip
    dk *= scale
    tl.store(
        DK.ptr + z64 * DK.sz + hk.to(tl.int64) * DK.sh + kr[:, None] * DK.sn + offs_dk[None, :] * DK.sd,
        dk.to(DK.ptr.dtype.element_ty),
        mask=n_ok[:, None] & (offs_dk[None, :] < t.HEAD_DK),
    )
    tl.store(
        DV.ptr + z64 * DV.sz + hk.to(tl.int64) * DV.sh + kr[:, None] * DV.sn + offs_dv[None, :] * DV.sd,
        dv.to(DV.ptr.dtype.element_ty),
        mask=n_ok[:, None] & (offs_dv[None, :] < t.HEAD_DV),
    )


@triton.jit
def _dq_tiles(dq, pdp, q, do, lse2, delta, k_base, v_base, b_base, db_base, start_n, end_n, offs_m, K, V, L, S, offset,
              z, h, hk, bh, alibi2, scale, sc, mods, bm_row, win, drop, t: tl.constexpr, BIAS_GRAD: tl.constexpr,
              MASKED: tl.constexpr):  # fmt: skip
    offs_dk = tl.arange(0, t.BLOCK_DK)
    offs_dv = tl.arange(0, t.BLOCK_DV)
    for n0 in range(start_n, end_n, t.BLOCK_N):
        state = 1  # the block mask's state of this tile (see the forward)
        run = True
        if mods.HAS_BLOCK_MASK:
            state = tl.load(mods.bm + bm_row + n0 // mods.BM_BLOCK).to(tl.int32)
            run = state != 0
        if run:
            offs_n = tl.multiple_of(n0, t.BLOCK_N) + tl.arange(0, t.BLOCK_N)
            k = _load_rows(
                k_base, z, hk, n0, offs_n, offs_dk, K.sn, K.sd, S, t.HEAD_DK, t.BLOCK_N, t.BLOCK_DK, t.USE_TMA
            )
            v = _load_rows(
                v_base, z, hk, n0, offs_n, offs_dv, V.sn, V.sd, S, t.HEAD_DV, t.BLOCK_N, t.BLOCK_DV, t.USE_TMA
            )
            qk = tl.dot(q, tl.trans(k), input_precision=t.INPUT_PRECISION)
            s, dmod = _logits(qk, sc, mods, b_base, alibi2, scale, z, h, offs_m[:, None], offs_n[None, :], L, S, offset,
                              win, state, MASKED)  # fmt: skip
            p = tl.math.exp2(s - lse2[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=t.INPUT_PRECISION)
            if drop.ON:
                keep = _dropout_keep(drop, bh, offs_m[:, None], offs_n[None, :])
                dp = tl.where(keep, dp * (1.0 / (1.0 - drop.p)), 0.0)
            if sc.HAS_SINKS:  # sum_j P dP = dO . O from the unrounded output, for the sinks' gradient
                pdp += tl.sum(p * dp, 1)
            ds = p * (dp - delta[:, None])
            if BIAS_GRAD:  # dS of the logits after soft-capping and the score function: the bias is added after them
                tl.store(db_base + offs_m[:, None] * S + offs_n[None, :], ds, mask=(offs_m[:, None] < L) & (offs_n < S))
            if sc.HAS_SOFTCAP or mods.HAS_SCORE_MOD:
                ds = ds * dmod
            dq += tl.dot(ds.to(k.dtype), k, input_precision=t.INPUT_PRECISION)
    return dq, pdp


@triton.jit
def _attention_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, DB, PDP, H, L, S, scale, sc, mods, win, drop, rows,
                             t: tl.constexpr, BIAS_GRAD: tl.constexpr):  # fmt: skip
    """Grid ``(cdiv(L, BLOCK_M), Z * H)``: dQ of one query tile; DB, when BIAS_GRAD, is a zeroed
    contiguous (Z, H, L, S) float32 buffer that receives dS on the visible tiles (not with VARLEN). With
    sinks, PDP (laid out as LSE) receives each row's sum of P dP in float32: dO . O without the output's
    rounding to its dtype, for the sinks' gradient."""
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
    m_ok = offs_m < L
    z64 = z.to(tl.int64)
    qr = q_row0 + offs_m
    q = tl.load(
        Q.ptr + z64 * Q.sz + h.to(tl.int64) * Q.sh + qr[:, None] * Q.sn + offs_dk[None, :] * Q.sd,
        mask=m_ok[:, None] & (offs_dk[None, :] < t.HEAD_DK),
        other=0.0,
    )
    do = tl.load(
        DO.ptr + z64 * DO.sz + h.to(tl.int64) * DO.sh + qr[:, None] * DO.sn + offs_dv[None, :] * DO.sd,
        mask=m_ok[:, None] & (offs_dv[None, :] < t.HEAD_DV),
        other=0.0,
    )
    row_base = z64 * rows.slse_z + h.to(tl.int64) * rows.slse_h + q_row0
    lse2 = _lse_log2(tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0))
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    if t.USE_TMA:  # K and V are (Z, H_kv, S, E) tensor descriptors, addressed by (z, hk, n, 0)
        k_base = K.ptr
        v_base = V.ptr
    else:
        k_base = K.ptr + z64 * K.sz + hk.to(tl.int64) * K.sh + k_row0 * K.sn
        v_base = V.ptr + z64 * V.sz + hk.to(tl.int64) * V.sh + k_row0 * V.sn
    b_base = sc.bias + z64 * sc.sbz + h.to(tl.int64) * sc.sbh
    db_base = DB + bh.to(tl.int64) * L * S
    dq = tl.zeros([t.BLOCK_M, t.BLOCK_DK], tl.float32)
    pdp = tl.zeros([t.BLOCK_M], tl.float32)
    alibi2 = _alibi2(sc, z, h)
    bm_row = z * mods.sbm_z + h * mods.sbm_h + (start_m // mods.BM_BLOCK) * mods.sbm_m
    lo, full_lo, full_hi, hi = _visible_ranges(
        start_m, t.BLOCK_M, t.BLOCK_N, offset, win.left, win.right, S, win.HAS_LEFT, win.HAS_RIGHT
    )
    if rows.VARLEN:
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
        dq, pdp = _dq_tiles(
            dq, pdp, q, do, lse2, delta, k_base, v_base, b_base, db_base, r_start, r_end, offs_m, K, V, L, S, offset,
            z, h, hk, bh, alibi2, scale, sc, mods, bm_row, win, drop, t, BIAS_GRAD, region != 1,
        )  # fmt: skip
    if sc.HAS_SINKS:
        tl.store(PDP + row_base + offs_m, pdp, mask=m_ok)
    dq *= scale
    tl.store(
        DQ.ptr + z64 * DQ.sz + h.to(tl.int64) * DQ.sh + qr[:, None] * DQ.sn + offs_dk[None, :] * DQ.sd,
        dq.to(DQ.ptr.dtype.element_ty),
        mask=m_ok[:, None] & (offs_dk[None, :] < t.HEAD_DK),
    )
