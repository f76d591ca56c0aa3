"""The attention kernels' grouped arguments: named tuples that Triton takes as kernel arguments, feature flags
as constexpr fields (so each combination compiles to its own kernel, as separate constexpr arguments did).

- ``Scores``: what turns the products q·k into the logits the softmax sees (scale, soft-capping, the bias or
  bool mask tensor, ALiBi slopes) and the learnable sink logits that join each row's softmax;
- ``Window``: the visibility rule (see ``attention_tiles``);
- ``Dropout``: probability and Philox stream;
- ``Mods``: user score / mask functions (``fastattn.mods``) and the block mask's tile states.

The launchers build them with the functions below; ``fastattn.codegen`` builds their type signatures.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton.language as tl


class Scores(NamedTuple):
    bias: object  # pointer; q itself when BIAS_MODE == 0
    sbz: int
    sbh: int
    sbm: int
    sbn: int
    alibi: object  # float32 slopes (H,) or (Z, H) through sal_z, sal_h; q itself when unused
    sal_z: int
    sal_h: int
    softcap: float  # c of c * tanh(s / c); 0.0 when off
    sinks: object  # float32 (H,) sink logits (natural log units); q itself when unused
    BIAS_MODE: tl.constexpr  # 0 none, 1 float bias added, 2 bool keep-mask
    HAS_ALIBI: tl.constexpr
    HAS_SOFTCAP: tl.constexpr
    HAS_SINKS: tl.constexpr


class Mods(NamedTuple):
    score_aux: object  # the ScoreMod's own tensor; q itself when none
    mask_aux: object
    bm: object  # int8 tile states (B|1, H|1, tiles of L, tiles of S); q itself without a block mask
    sbm_z: int
    sbm_h: int
    sbm_m: int
    SCORE_FN: tl.constexpr  # @triton.jit functions, or None
    SCORE_GRAD: tl.constexpr
    MASK_FN: tl.constexpr
    HAS_SCORE_MOD: tl.constexpr
    HAS_SCORE_AUX: tl.constexpr
    HAS_MASK_MOD: tl.constexpr
    HAS_MASK_AUX: tl.constexpr
    HAS_BLOCK_MASK: tl.constexpr
    BM_BLOCK: tl.constexpr  # the block mask's tile (rows and keys)


class Window(NamedTuple):
    offset: int  # query i is aligned with key i + offset
    left: int
    right: int
    HAS_LEFT: tl.constexpr
    HAS_RIGHT: tl.constexpr


class Dropout(NamedTuple):
    p: float
    seed: int
    philox_offset: int
    ON: tl.constexpr


def scores_arg(
    q: torch.Tensor,
    bias: torch.Tensor | None,
    alibi: torch.Tensor | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> Scores:
    """``bias`` a (Z, H, L, S) view (broadcast strides), float or bool; ``alibi`` float32 (H,) or (Z, H);
    ``sinks`` float32 contiguous (H,)."""
    sb, mode = ((0, 0, 0, 0), 0) if bias is None else (tuple(bias.stride()), 2 if bias.dtype == torch.bool else 1)
    if alibi is None:
        al = (q, 0, 0)
    else:
        al = (alibi, 0, alibi.stride(0)) if alibi.dim() == 1 else (alibi, alibi.stride(0), alibi.stride(1))
    return Scores(
        q if bias is None else bias, *sb, *al, float(softcap or 0.0), q if sinks is None else sinks,
        tl.constexpr(mode), tl.constexpr(alibi is not None), tl.constexpr(softcap is not None),
        tl.constexpr(sinks is not None),
    )  # fmt: skip


def mods_arg(q: torch.Tensor, score_mod=None, mask_mod=None, block_mask=None) -> Mods:
    """``score_mod`` a ``fastattn.ScoreMod``, ``mask_mod`` a ``fastattn.MaskMod``, ``block_mask`` a
    ``fastattn.BlockMask`` (its states broadcast over batch / heads through 0 strides)."""
    c = tl.constexpr
    s_aux = getattr(score_mod, "aux", None)
    m_aux = getattr(mask_mod, "aux", None)
    if block_mask is None:
        bm, sbm, block = q, (0, 0, 0), 1
    else:
        st = block_mask.states
        bm, block = st, block_mask.block
        sbm = tuple(0 if st.shape[d] == 1 else st.stride(d) for d in range(3))
    return Mods(
        q if s_aux is None else s_aux, q if m_aux is None else m_aux, bm, *sbm,
        c(None if score_mod is None else score_mod.fn), c(None if score_mod is None else score_mod.grad),
        c(None if mask_mod is None else mask_mod.fn), c(score_mod is not None), c(s_aux is not None),
        c(mask_mod is not None), c(m_aux is not None), c(block_mask is not None), c(block),
    )  # fmt: skip


def window_arg(offset: int, left: int | None, right: int | None) -> Window:
    return Window(offset, left or 0, right or 0, tl.constexpr(left is not None), tl.constexpr(right is not None))


def dropout_arg(p: float, seed: int, philox_offset: int) -> Dropout:
    return Dropout(float(p), seed, philox_offset, tl.constexpr(p > 0.0))


def flags(sc: Scores, win: Window, drop: Dropout, mods: Mods | None = None) -> tuple:
    """The constexpr fields' values, for the autotuner's keys (user functions as themselves: hashable)."""
    fields = (sc.BIAS_MODE, sc.HAS_ALIBI, sc.HAS_SOFTCAP, sc.HAS_SINKS, win.HAS_LEFT, win.HAS_RIGHT, drop.ON)
    if mods is not None:
        fields += (mods.HAS_SCORE_AUX, mods.HAS_MASK_AUX, mods.HAS_BLOCK_MASK, mods.BM_BLOCK, mods.SCORE_FN)
        fields += (mods.SCORE_GRAD, mods.MASK_FN)
    return tuple(f.value for f in fields)


class Operand(NamedTuple):
    """A (Z, H, N, D) tensor and its strides; a tensor descriptor (TMA) in ``ptr`` where a config takes one."""

    ptr: object
    sz: int
    sh: int
    sn: int
    sd: int


class Rotary(NamedTuple):
    cos: object  # fp32 tables (positions, dim / 2); q itself when off
    sin: object
    dim: int
    offset: int  # table row of key 0
    ON: tl.constexpr
    INTERLEAVED: tl.constexpr


class Rows(NamedTuple):
    """Where each sequence's rows are (see ``attention_tiles._sequence``), key splits and paging."""

    seq: object  # int32 (Z, 5) per-sequence rows when VARLEN; q itself otherwise
    slse_z: int  # LSE / delta strides (sequence, head)
    slse_h: int
    split_len: int
    so_split: int
    slse_split: int
    bt: object  # int32 (Z, max_pages) page table when PAGED; q itself otherwise
    sbt: int
    page: int
    VARLEN: tl.constexpr
    SPLIT: tl.constexpr
    PAGED: tl.constexpr


class Tile(NamedTuple):
    GROUP: tl.constexpr  # query heads per key/value head
    HEAD_DK: tl.constexpr
    HEAD_DV: tl.constexpr
    BLOCK_DK: tl.constexpr
    BLOCK_DV: tl.constexpr
    BLOCK_M: tl.constexpr
    BLOCK_N: tl.constexpr
    INPUT_PRECISION: tl.constexpr
    USE_TMA: tl.constexpr


def operand(t: torch.Tensor, ptr=None) -> Operand:
    return Operand(t if ptr is None else ptr, *t.stride())


def rotary_arg(q: torch.Tensor, tables=None, dim: int = 0, offset: int = 0, interleaved: bool = False) -> Rotary:
    cos, sin = (q, q) if tables is None else tables
    return Rotary(cos, sin, dim, offset, tl.constexpr(tables is not None), tl.constexpr(interleaved))


def tile_arg(group, head_dk, head_dv, block_dk, block_dv, block_m, block_n, precision, tma) -> Tile:
    values = (group, head_dk, head_dv, block_dk, block_dv, block_m, block_n, precision, tma)
    return Tile(*(tl.constexpr(x) for x in values))
