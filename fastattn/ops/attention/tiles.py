"""Tile-level helpers shared by the attention forward and backward kernels.

Visibility rule (one rule for causal, sliding window and SDPA's top-left causal): query ``i`` sees key
``j`` iff ``i + offset - left <= j <= i + offset + right`` (a side without a limit is skipped), with
``0 <= i < L`` and ``0 <= j < S``. ``offset`` is ``S - L`` for bottom-right alignment and 0 for top-left.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _visible_ranges(
    start,
    BLOCK_OUTER: tl.constexpr,
    BLOCK_INNER: tl.constexpr,
    offset,
    left,
    right,
    limit,
    HAS_LEFT: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
):
    """For outer indices ``[start, start + BLOCK_OUTER)``, the inner tiles to visit, as three ranges.

    Returns ``lo, full_lo, full_hi, hi``: tiles in ``[lo, full_lo)`` and ``[full_hi, hi)`` need the
    element mask, tiles in ``[full_lo, full_hi)`` are visible to every outer index (no mask), and tiles
    outside ``[lo, hi)`` are invisible to all of them and are never loaded (block skipping).
    """
    lower = 0
    if HAS_LEFT:
        lower = tl.maximum(start + offset - left, 0)
    upper = limit
    if HAS_RIGHT:
        upper = tl.minimum(start + BLOCK_OUTER + offset + right, limit)
    lo = (lower // BLOCK_INNER) * BLOCK_INNER
    hi = tl.maximum(upper, lo)
    hi_tiles = tl.cdiv(hi, BLOCK_INNER) * BLOCK_INNER

    full_lo = lo
    if HAS_LEFT:
        first_all = tl.maximum(start + BLOCK_OUTER - 1 + offset - left, 0)
        full_lo = tl.cdiv(first_all, BLOCK_INNER) * BLOCK_INNER
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi_tiles)

    cap = limit
    if HAS_RIGHT:
        cap = tl.minimum(start + offset + right + 1, limit)
    full_hi = (tl.maximum(cap, 0) // BLOCK_INNER) * BLOCK_INNER
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi_tiles)
    return lo, full_lo, full_hi, hi


@triton.jit
def _sequence(rows, z, L, S, offset):
    """Rows of sequence ``z``: ``(L, S, offset, q_row0, k_row0)``. Without ``rows.VARLEN`` the batch's (rows
    start at 0 past the batch stride). With it, ``rows.seq`` is int32 (Z, 5): first query row, query count,
    first key row, key count, and an alignment added to ``offset`` (``S_z - L_z`` for bottom-right alignment)
    of each sequence: packed batches, per-sequence key lengths of a cache, or a split of the keys."""
    q_row0 = (z * 0).to(tl.int64)
    k_row0 = q_row0
    if rows.VARLEN:
        q_row0 = tl.load(rows.seq + z * 5).to(tl.int64)
        L = tl.load(rows.seq + z * 5 + 1)
        k_row0 = tl.load(rows.seq + z * 5 + 2).to(tl.int64)
        S = tl.load(rows.seq + z * 5 + 3)
        offset = offset + tl.load(rows.seq + z * 5 + 4)
    return L, S, offset, q_row0, k_row0


@triton.jit
def _clip_to_split(split, split_len, lo, full_lo, full_hi, hi):
    """The key ranges of one split ``[split * split_len, (split + 1) * split_len)`` of the keys (flash-decoding:
    several programs per row block, merged afterwards by log-sum-exp); split_len is a multiple of the tile."""
    s0 = split * split_len
    lo2 = tl.maximum(lo, s0)
    hi2 = tl.maximum(tl.minimum(hi, s0 + split_len), lo2)
    full_lo2 = tl.minimum(tl.maximum(full_lo, lo2), hi2)
    full_hi2 = tl.minimum(tl.maximum(full_hi, full_lo2), hi2)
    return lo2, full_lo2, full_hi2, hi2


@triton.jit
def _skip_if_past(start, length, lo, full_lo, full_hi, hi):
    """Empty ranges for a program whose tile starts past its sequence (varlen grids cover the longest one)."""
    past = start >= length
    return lo, tl.where(past, lo, full_lo), tl.where(past, lo, full_hi), tl.where(past, lo, hi)


@triton.jit
def _visible(i, j, L, S, offset, win):
    """Element mask of the visibility rule ``win`` (its offset replaced by ``offset``, which varlen sequences
    shift); ``i`` and ``j`` broadcast against each other."""
    ok = (i < L) & (j < S)
    if win.HAS_LEFT:
        ok = ok & (j >= i + offset - win.left)
    if win.HAS_RIGHT:
        ok = ok & (j <= i + offset + win.right)
    return ok


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^2x + 1) through exp2 (no libdevice under the interpreter); saturates to +-1, no NaN.
    return 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def _alibi2(sc, z, h):
    """ALiBi slope of head (z, h) in log2 units (0 without ALiBi)."""
    a = 0.0
    if sc.HAS_ALIBI:
        a = tl.load(sc.alibi + z * sc.sal_z + h * sc.sal_h) * LOG2E
    return a


@triton.jit
def _sink2(sc, h):
    """Sink logit of query head h in log2 units (-inf without sinks: no extra term)."""
    t = float("-inf")
    if sc.HAS_SINKS:
        t = tl.load(sc.sinks + h) * LOG2E
    return t


@triton.jit
def _user_score(mods, s, z, h, i, j):
    """The ScoreMod's new score and its derivative by the score (natural-log units)."""
    if mods.HAS_SCORE_AUX:
        g = mods.SCORE_GRAD(s, z, h, i, j, mods.score_aux)
        s = mods.SCORE_FN(s, z, h, i, j, mods.score_aux)
    else:
        g = mods.SCORE_GRAD(s, z, h, i, j)
        s = mods.SCORE_FN(s, z, h, i, j)
    return s, g


@triton.jit
def _user_mask(mods, z, h, i, j):
    if mods.HAS_MASK_AUX:
        ok = mods.MASK_FN(z, h, i, j, mods.mask_aux)
    else:
        ok = mods.MASK_FN(z, h, i, j)
    return ok


@triton.jit
def _tile_state(mods, row_base, block_col):
    """The block mask's state of a tile (0 empty: skip it, 1 partial, 2 full); 1 without a block mask."""
    state = 1
    if mods.HAS_BLOCK_MASK:
        state = tl.load(mods.bm + row_base + block_col).to(tl.int32)
    return state


@triton.jit
def _logits(qk, sc, mods, b_base, alibi2, scale, z, h, i, j, L, S, offset, win, state, MASKED: tl.constexpr):
    """The log2-domain logits of a tile of products q·k (rows ``i``, keys ``j``, broadcasting: the dK/dV
    kernel passes the transposed tile), the one place the forward and both backward kernels modify scores:
    scale, soft-capping ``c tanh(s / c)``, the user's score function, bias or bool mask (at
    ``b_base + i * sbm + j * sbn``), ALiBi, the visibility rule, the user's mask function (on tiles the block
    mask calls partial, ``state == 1``). Returns ``(s, dmod)``: d(modified)/d(scaled) score, the backward's
    chain factor (1.0 without soft-capping or score function)."""
    dmod = 1.0
    if sc.HAS_SOFTCAP or mods.HAS_SCORE_MOD:
        s = qk * scale
        if sc.HAS_SOFTCAP:
            t = _tanh(s / sc.softcap)
            s = t * sc.softcap
            dmod = 1.0 - t * t
        if mods.HAS_SCORE_MOD:  # indices clamped: lanes past the ends are masked below, but must not read past aux
            s, g = _user_score(mods, s, z, h, tl.minimum(i, L - 1), tl.minimum(j, S - 1))
            dmod = dmod * g
        s = s * LOG2E
    else:
        s = qk * (scale * LOG2E)
    if sc.BIAS_MODE != 0:
        b_ptrs = b_base + i * sc.sbm + j * sc.sbn
        b_ok = (i < L) & (j < S)
        if sc.BIAS_MODE == 1:
            s += tl.load(b_ptrs, mask=b_ok, other=0.0).to(tl.float32) * LOG2E
        else:
            s = tl.where(tl.load(b_ptrs, mask=b_ok, other=0) != 0, s, float("-inf"))
    if sc.HAS_ALIBI:  # -slope * |i + offset - j|, in log2 units like the rest of s
        s -= alibi2 * tl.abs((i + offset - j).to(tl.float32))
    if MASKED:
        s = tl.where(_visible(i, j, L, S, offset, win), s, float("-inf"))
    if mods.HAS_MASK_MOD:
        if state == 1:
            s = tl.where(_user_mask(mods, z, h, tl.minimum(i, L - 1), tl.minimum(j, S - 1)), s, float("-inf"))
    return s, dmod


@triton.jit
def _dropout_keep(drop, bh, i, j):
    """Keep-mask of dropout for scores (i, j) of head ``bh``: Philox counters (j, i, bh, offset).

    Counting by coordinates (not a flat index) keeps every counter 32-bit at any size, and the forward and
    both backward kernels draw the same bits for the same element whatever their tiling.
    """
    zero = (i * 0 + j * 0).to(tl.uint32)
    c0 = (j + zero).to(tl.uint32)
    c1 = (i + zero).to(tl.uint32)
    c2 = zero + bh.to(tl.uint32)
    c3 = zero + drop.philox_offset.to(tl.uint32)
    r, _, _, _ = tl.philox(drop.seed, c0, c1, c2, c3)
    return tl.uint_to_uniform_float(r) >= drop.p


@triton.jit
def _load_rows(
    base,
    z,
    h,
    r0,
    offs_r,
    offs_d,
    s_r,
    s_d,
    limit,
    HEAD_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """Rows ``r0 .. r0 + BLOCK_R`` of head (z, h) as a (BLOCK_R, BLOCK_D) tile: from a 4-D tensor descriptor
    (the copy engine zero-fills rows past ``limit`` and columns past the head dim), or through ``base``
    pointers (already offset to the head) with the same zero fill done by masks."""
    if USE_TMA:
        x = base.load([z, h, r0, 0]).reshape(BLOCK_R, BLOCK_D)
    else:
        ok = (offs_r[:, None] < limit) & (offs_d[None, :] < HEAD_D)
        x = tl.load(base + offs_r[:, None] * s_r + offs_d[None, :] * s_d, mask=ok, other=0.0)
    return x


@triton.jit
def _rope_rows(
    base,
    offs_r,
    offs_d,
    s_r,
    s_d,
    limit,
    pos,
    COS,
    SIN,
    rot,
    HEAD_D: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    """Rows ``offs_r`` (through pointers at ``base``) turned by rotary embeddings, as an fp32 (rows, BLOCK_D)
    tile. ``pos`` indexes the fp32 ``COS``/``SIN`` tables (rows of rot/2 pairs, built once per call in fp64:
    tables keep the fp64 angle arithmetic out of the attention loop's registers). Each column's pair partner
    is loaded a second time with permuted column offsets (same cache lines), since registers cannot be
    permuted; columns from ``rot`` on pass through."""
    ok = (offs_r[:, None] < limit) & (offs_d[None, :] < HEAD_D)
    x = tl.load(base + offs_r[:, None] * s_r + offs_d[None, :] * s_d, mask=ok, other=0.0).to(tl.float32)
    half = rot // 2
    in_rot = offs_d < rot
    if INTERLEAVED:  # GPT-J: pairs (2j, 2j + 1)
        partner = offs_d ^ 1
        pair = offs_d // 2
        first = (offs_d % 2) == 0
    else:  # GPT-NeoX: pairs (j, j + rot/2)
        first = offs_d < half
        partner = tl.where(first, offs_d + half, offs_d - half)
        pair = tl.where(first, offs_d, offs_d - half)
    partner = tl.where(in_rot, partner, offs_d)
    xp = tl.load(base + offs_r[:, None] * s_r + partner[None, :] * s_d, mask=ok, other=0.0).to(tl.float32)
    t_ok = (offs_r[:, None] < limit) & in_rot[None, :]
    t_off = pos[:, None] * half + pair[None, :]
    cos = tl.load(COS + t_off, mask=t_ok, other=1.0)
    sin = tl.load(SIN + t_off, mask=t_ok, other=0.0)
    sign = tl.where(first, -1.0, 1.0)
    return x * cos + sign[None, :] * xp * sin
