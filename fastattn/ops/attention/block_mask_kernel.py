"""Triton kernel that evaluates a user mask function once per block-mask tile (``fastattn.create_block_mask``)."""

import triton
import triton.language as tl

from .tiles import _user_mask


@triton.jit
def _block_states_kernel(OUT, L, S, H, s_row, mods, BLOCK: tl.constexpr):
    """Grid ``(cdiv(L, BLOCK), cdiv(S, BLOCK), Z * H)``: OUT int8 (Z, H, tiles of L, s_row) gets 0 where no
    element of the tile takes part, 2 where all (inside L x S) do, 1 otherwise."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    z = bh // H
    h = bh % H
    i = pid_m * BLOCK + tl.arange(0, BLOCK)[:, None]
    j = pid_n * BLOCK + tl.arange(0, BLOCK)[None, :]
    inside = (i < L) & (j < S)
    keep = _user_mask(mods, z, h, tl.minimum(i, L - 1), tl.minimum(j, S - 1)) & inside
    kept = tl.sum(tl.sum(keep.to(tl.int32), 1), 0)
    total = tl.sum(tl.sum(inside.to(tl.int32), 1), 0)
    state = tl.where(kept == 0, 0, tl.where(kept == total, 2, 1))
    tiles_m = tl.cdiv(L, BLOCK)
    tl.store(OUT + (bh.to(tl.int64) * tiles_m + pid_m) * s_row + pid_n, state.to(tl.int8))
