"""Triton kernels of layer norm and RMSNorm, forward and backward, with the fused residual add (and dropout).

One program normalizes one row. Rows that fit one tile (``NUM_CHUNKS == 1``) are read once and written once;
wider rows are walked in ``NUM_CHUNKS`` tiles, three times forward (mean, variance, output: the re-reads come
from L2) so that the statistics stay two-pass exact. Statistics (mean, rstd) are fp32 whatever the data
dtype. The backward writes dx and, per program, fp32 partial sums of dw and db over its rows into a
``(programs, N)`` buffer that the launcher sums: no atomics, so the result is the same on every run.

``add`` variants: ``s = dropout(x) + residual`` is normalized and also written out (``S``), for pre-norm
blocks; dropout draws Philox bits by (row, column) from a seed, the same in forward and backward.
"""

import triton
import triton.language as tl


@triton.jit
def _dropout_keep(seed, row, cols, dropout_p):
    return tl.rand(seed, row.to(tl.int64) * 2**32 + cols) >= dropout_p  # counter (row, col): any size


@triton.jit
def _load_sum(X, R, row, cols, mask, seed, dropout_p, HAS_RES: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """``dropout(x) + residual`` of one tile, in fp32."""
    x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        x = tl.where(_dropout_keep(seed, row, cols, dropout_p), x / (1.0 - dropout_p), 0.0)
    if HAS_RES:
        x += tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _norm_fwd_kernel(
    X, R, W, B, Y, S, MEAN, RSTD,
    stride_x, stride_r, stride_y, stride_s, N, eps, dropout_p, seed,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    x_row = X + row.to(tl.int64) * stride_x
    r_row = R + row.to(tl.int64) * stride_r
    s_row = S + row.to(tl.int64) * stride_s
    y_row = Y + row.to(tl.int64) * stride_y
    fused = HAS_RES or HAS_DROPOUT
    cols = tl.arange(0, BLOCK)
    if NUM_CHUNKS == 1:
        mask = cols < N
        x = _load_sum(x_row, r_row, row, cols, mask, seed, dropout_p, HAS_RES, HAS_DROPOUT)
        if fused:
            tl.store(s_row + cols, x.to(S.dtype.element_ty), mask=mask)
        mean = 0.0
        if not IS_RMS:
            mean = tl.sum(x, 0) / N
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / N + eps)
        y = xc * rstd
        if HAS_W:
            y *= tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # Wide rows: the fused sum is written in the first walk and re-read from there afterwards.
        src = s_row if fused else x_row
        total = tl.zeros([BLOCK], tl.float32)
        for c in range(NUM_CHUNKS):
            cc = c * BLOCK + cols
            x = _load_sum(x_row, r_row, row, cc, cc < N, seed, dropout_p, HAS_RES, HAS_DROPOUT)
            if fused:
                tl.store(s_row + cc, x.to(S.dtype.element_ty), mask=cc < N)
            total += x
        mean = 0.0
        if not IS_RMS:
            mean = tl.sum(total, 0) / N
        sq = tl.zeros([BLOCK], tl.float32)
        for c in range(NUM_CHUNKS):
            cc = c * BLOCK + cols
            xc = tl.where(cc < N, tl.load(src + cc, mask=cc < N, other=0.0).to(tl.float32) - mean, 0.0)
            sq += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(sq, 0) / N + eps)
        for c in range(NUM_CHUNKS):
            cc = c * BLOCK + cols
            mask = cc < N
            y = (tl.load(src + cc, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
            if HAS_W:
                y *= tl.load(W + cc, mask=mask, other=0.0).to(tl.float32)
            if HAS_B:
                y += tl.load(B + cc, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + cc, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _norm_bwd_tile(S, W, DY, cc, mask, mean, rstd, HAS_W: tl.constexpr):
    """x̂ and w·dy of one tile, fp32."""
    xhat = (tl.load(S + cc, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
    dy = tl.load(DY + cc, mask=mask, other=0.0).to(tl.float32)
    wdy = dy
    if HAS_W:
        wdy = dy * tl.load(W + cc, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, xhat, 0.0), dy, wdy


@triton.jit
def _norm_bwd_kernel(
    S, W, DY, DS_OUT, DX, DR, DW, DB, MEAN, RSTD,
    stride_s, stride_dy, stride_dso, stride_dx, stride_dr, M, N, rows_per_program, dropout_p, seed,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DS_OUT: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr,
):  # fmt: skip
    """Rows ``[pid * rows_per_program, ...)``. ``S`` is the normalized input (x, or the fused sum). For the
    fused add, ``DS_OUT`` is the gradient reaching the sum output; ``DR`` (residual's gradient) gets
    ``dS`` and ``DX`` gets dropout's backward of it. ``DW``/``DB``: this program's fp32 partial sums."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    dw_acc = tl.zeros([BLOCK], tl.float32)
    db_acc = tl.zeros([BLOCK], tl.float32)
    dw_row = DW + pid.to(tl.int64) * N
    db_row = DB + pid.to(tl.int64) * N
    for i in range(rows_per_program):
        row = pid * rows_per_program + i
        if row < M:  # the last program's share can be short
            s_row = S + row.to(tl.int64) * stride_s
            dy_row = DY + row.to(tl.int64) * stride_dy
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            # c1 = mean(x̂ · w·dy), c2 = mean(w·dy): the two row reductions of the normalization's backward.
            c1 = 0.0
            c2 = 0.0
            for c in range(NUM_CHUNKS):
                cc = c * BLOCK + cols
                xhat, dy, wdy = _norm_bwd_tile(s_row, W, dy_row, cc, cc < N, mean, rstd, HAS_W)
                c1 += tl.sum(xhat * wdy, 0)
                c2 += tl.sum(wdy, 0)
            c1 = c1 / N
            c2 = c2 / N
            for c in range(NUM_CHUNKS):
                cc = c * BLOCK + cols
                mask = cc < N
                xhat, dy, wdy = _norm_bwd_tile(s_row, W, dy_row, cc, mask, mean, rstd, HAS_W)
                if IS_RMS:
                    ds = (wdy - xhat * c1) * rstd
                else:
                    ds = (wdy - (xhat * c1 + c2)) * rstd
                if HAS_DS_OUT:
                    ds += tl.load(DS_OUT + row.to(tl.int64) * stride_dso + cc, mask=mask, other=0.0).to(tl.float32)
                if HAS_RES:
                    tl.store(DR + row.to(tl.int64) * stride_dr + cc, ds.to(DR.dtype.element_ty), mask=mask)
                if HAS_DROPOUT:
                    ds = tl.where(_dropout_keep(seed, row, cc, dropout_p), ds / (1.0 - dropout_p), 0.0)
                tl.store(DX + row.to(tl.int64) * stride_dx + cc, ds.to(DX.dtype.element_ty), mask=mask)
                if NUM_CHUNKS == 1:
                    dw_acc += dy * xhat
                    db_acc += dy
                else:  # a wide row's partials do not fit in registers: keep them in this program's buffer row
                    if HAS_W:
                        tl.store(dw_row + cc, tl.load(dw_row + cc, mask=mask, other=0.0) + dy * xhat, mask=mask)
                    if HAS_B:
                        tl.store(db_row + cc, tl.load(db_row + cc, mask=mask, other=0.0) + dy, mask=mask)
    if NUM_CHUNKS == 1:
        if HAS_W:
            tl.store(dw_row + cols, dw_acc, mask=cols < N)
        if HAS_B:
            tl.store(db_row + cols, db_acc, mask=cols < N)
