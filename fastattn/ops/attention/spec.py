"""The attention ops' host-side descriptions of a case: visibility (``MaskSpec``), fused rotary embeddings
(``RotarySpec``) and per-sequence rows (``Varlen``). Imports no triton."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RotarySpec:
    """Rotary embeddings applied inside the attention kernel (see ``fastattn.RotaryEmbedding``)."""

    dim: int  # rotated columns (even, <= head dim)
    base: float = 10000.0
    interleaved: bool = False  # GPT-J pairs (2j, 2j+1); else GPT-NeoX pairs (j, j + dim/2)
    offset: int = 0  # position of key 0; query i sits at offset + i + (S - L)


@dataclass(frozen=True)
class MaskSpec:
    """Everything that decides which scores take part, besides the bias/mask tensor."""

    offset: int = 0  # query i is aligned with key i + offset (S - L: bottom-right; 0: top-left)
    left: int | None = None  # keys j >= i + offset - left take part; None: no limit
    right: int | None = None  # keys j <= i + offset + right take part; None: no limit


@dataclass(frozen=True)
class Varlen:
    """Per-sequence rows for the kernels' VARLEN mode: ``seq`` int32 (Z, 4) holds each sequence's first query
    row, query count, first key row and key count (see ``attention_tiles._sequence``); ``lse_strides`` are the
    (sequence, head) strides of the LSE / delta buffers."""

    seq: torch.Tensor
    lse_strides: tuple[int, int]
    splits: int = 1  # flash-decoding: key splits, each writing its own partial output (forward only)
    split_len: int = 0
    split_strides: tuple[int, int] = (0, 0)  # of the output and LSE buffers, per split
    block_table: torch.Tensor | None = None  # paged K/V (pages, H_kv, page_size, E): int32 (Z, max_pages)
