"""Triton kernels of the positional encodings: the sinusoidal table added on the fly, and rotary embeddings.

Angles are ``pos * base^(-2i/d)``. In fp32 that product loses ~pos·6e-8 radians (0.06 at a million), so it
is formed in fp64 and reduced modulo 2π there; sin/cos then run in fp32 on an argument in [-π, π], exact to
fp32 rounding at any position. The frequencies ``base^(-2i/d)`` come as a small fp64 vector (d/2 values,
cache-resident; a scalar argument would be fp32). One program takes ``BLOCK_R`` rows of one tensor.
"""

import triton
import triton.language as tl

TWO_OVER_PI = tl.constexpr(0.6366197723675814)
# π/2 in two parts (the first with zeros in its low bits), so that k·π/2 is exact in fp64 for large k.
HALF_PI_HI = tl.constexpr(1.5707963267341256)
HALF_PI_LO = tl.constexpr(6.077100506506192e-11)


@triton.jit
def _sincos(pos, pair, FREQ, pair_ok):
    """``sin`` and ``cos`` (fp32) of ``pos · FREQ[pair]`` (pos, pair int tensors broadcast).

    The angle is formed in fp64 and reduced there to r in [-π/4, π/4] plus a quadrant; short Taylor series
    then give sin r, cos r to a few fp32 ulp. Plain arithmetic: no libdevice slow path (its Payne-Hanek
    reduction keeps an array in local memory), and the interpreter runs the same code."""
    a = pos.to(tl.float64) * tl.load(FREQ + pair, mask=pair_ok, other=0.0)
    k = tl.floor(a * TWO_OVER_PI + 0.5)
    r = (a - k * HALF_PI_HI - k * HALF_PI_LO).to(tl.float32)
    quadrant = (k - 4.0 * tl.floor(k * 0.25)).to(tl.int32)  # k mod 4, also for negative k
    r2 = r * r
    s = r * (1.0 + r2 * (-1.0 / 6 + r2 * (1.0 / 120 + r2 * (-1.0 / 5040 + r2 * (1.0 / 362880)))))
    c = 1.0 + r2 * (-0.5 + r2 * (1.0 / 24 + r2 * (-1.0 / 720 + r2 * (1.0 / 40320 + r2 * (-1.0 / 3628800)))))
    sin = tl.where(quadrant == 0, s, tl.where(quadrant == 1, c, tl.where(quadrant == 2, -s, -c)))
    cos = tl.where(quadrant == 0, c, tl.where(quadrant == 1, -s, tl.where(quadrant == 2, -c, s)))
    return sin, cos


@triton.jit
def _sinusoidal_kernel(
    X, Y, FREQ, stride_x, stride_y, rows, L, D, offset, scale,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Y[r, c] = X[r, c] * scale + PE(offset + r % L, c): sin on even columns, cos on odd ones.
    Grid (row tiles, column tiles)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (r[:, None] < rows) & (c[None, :] < D)
    x = tl.load(X + r[:, None].to(tl.int64) * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    pos = (r % L + offset)[:, None]
    sin, cos = _sincos(pos, (c // 2)[None, :], FREQ, (c < D)[None, :])
    pe = tl.where((c % 2 == 0)[None, :], sin, cos)
    tl.store(Y + r[:, None].to(tl.int64) * stride_y + c[None, :], (x * scale + pe).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    X, Y, POS, FREQ, stride_xr, stride_yr, stride_pn, rows, H, L, E, ROT, offset, sign,
    HAS_POS: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_E: tl.constexpr,
):  # fmt: skip
    """Rows r of (N·H·L, E); pair j < ROT/2 of a row rotates by ``sign · angle(pos, j)``: (x[j], x[j + ROT/2])
    (GPT-NeoX) or (x[2j], x[2j+1]) (GPT-J, ``INTERLEAVED``); columns from ROT on are copied."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = r < rows
    l_idx = r % L
    if HAS_POS:  # POS is (N or 1, L) int64: stride_pn = 0 when shared by the batch
        n_idx = r // (H * L)
        pos = tl.load(POS + n_idx.to(tl.int64) * stride_pn + l_idx, mask=row_ok, other=0)
    else:
        pos = l_idx + offset
    j = tl.arange(0, BLOCK_P)
    half = ROT // 2
    sin, cos = _sincos(pos[:, None], j[None, :], FREQ, (j < half)[None, :])
    sin = sin * sign
    if INTERLEAVED:
        c1, c2 = 2 * j, 2 * j + 1
    else:
        c1, c2 = j, j + half
    pm = row_ok[:, None] & (j[None, :] < half)
    x_row = X + r[:, None].to(tl.int64) * stride_xr
    y_row = Y + r[:, None].to(tl.int64) * stride_yr
    x1 = tl.load(x_row + c1[None, :], mask=pm, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + c2[None, :], mask=pm, other=0.0).to(tl.float32)
    tl.store(y_row + c1[None, :], (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=pm)
    tl.store(y_row + c2[None, :], (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=pm)
    if BLOCK_E > 0:  # the columns past the rotary part pass through
        e = ROT + tl.arange(0, BLOCK_E)
        em = row_ok[:, None] & (e[None, :] < E)
        tl.store(y_row + e[None, :], tl.load(x_row + e[None, :], mask=em, other=0.0), mask=em)
