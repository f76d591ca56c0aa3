"""User score and mask functions for :func:`fastattn.attention`, written in Triton, run inside the attention
kernels (no torch.compile), and the tile-level block mask that lets the kernels skip what a mask hides.

- ``score_mod=ScoreMod(fn, grad)``: ``fn(score, b, h, q_idx, kv_idx)`` is a ``@triton.jit`` function returning
  the new score (natural-log units), elementwise; ``grad(score, b, h, q_idx, kv_idx)`` its derivative by
  ``score``, used by the backward. Applied after scaling and soft-capping, before bias and ALiBi.
- ``mask_mod=fn``: ``fn(b, h, q_idx, kv_idx)``, a ``@triton.jit`` function, True where the key takes part;
  combined by logical and with ``causal``, ``window`` and any bias.
- Either may read one tensor of its own (document ids, prefix lengths, ...): ``ScoreMod(fn, grad, aux=t)`` /
  ``MaskMod(fn, aux=t)`` pass ``t`` (a pointer to its first element) as a last argument.
- ``block_mask=create_block_mask(mask_mod, B, H, L, S)``: the mask evaluated once per 128 x 128 tile (empty,
  partial or full, per batch and head; B or H None for "the same for all"): the kernels skip empty tiles and
  drop the element mask on full ones. Without it, ``mask_mod`` is evaluated on every tile (same result).

``b`` and ``h`` are the batch and query-head indices, ``q_idx`` and ``kv_idx`` the 0-based rows of q and k
(int32 tensors of the tile's shape; always within [0, L) and [0, S)). The functions are constexpr arguments of
the kernels: each function compiles its kernels once; other L, S, N, H compile nothing new (beyond the
divisibility-by-16 variants every Triton kernel has).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 128  # the block mask's tile, a multiple of every kernel tile


def _is_jit(fn) -> bool:
    return hasattr(fn, "fn") and hasattr(fn, "arg_names")  # triton.JITFunction (or its interpreted twin)


@dataclass(frozen=True)
class ScoreMod:
    fn: object
    grad: object
    aux: torch.Tensor | None = None

    def __post_init__(self):
        for name in ("fn", "grad"):
            if not _is_jit(getattr(self, name)):
                raise TypeError(f"ScoreMod: {name} must be a @triton.jit function, got {getattr(self, name)!r:.80}")
        want = 6 if self.aux is not None else 5
        for name in ("fn", "grad"):
            got = len(getattr(self, name).arg_names)
            if got != want:
                args = "score, b, h, q_idx, kv_idx" + (", aux" if self.aux is not None else "")
                raise TypeError(f"ScoreMod: {name} must take ({args}), it takes {got} arguments")


@dataclass(frozen=True)
class MaskMod:
    fn: object
    aux: torch.Tensor | None = None

    def __post_init__(self):
        if not _is_jit(self.fn):
            raise TypeError(f"mask_mod must be a @triton.jit function, got {self.fn!r:.80}")
        want = 5 if self.aux is not None else 4
        if len(self.fn.arg_names) != want:
            raise TypeError("mask_mod must take (b, h, q_idx, kv_idx" + (", aux)" if self.aux is not None else ")")
                            + f", it takes {len(self.fn.arg_names)} arguments")  # fmt: skip


def as_mask_mod(mask_mod) -> MaskMod | None:
    if mask_mod is None or isinstance(mask_mod, MaskMod):
        return mask_mod
    return MaskMod(mask_mod)


@dataclass(frozen=True)
class BlockMask:
    """Per-tile states of a mask: int8 ``(B|1, H|1, cdiv(L, 128), cdiv(S, 128))``, 0 empty, 1 partial, 2 full."""

    states: torch.Tensor
    mask_mod: MaskMod
    L: int
    S: int
    block: int = BLOCK

    def sparsity(self) -> float:
        """The share of tiles that are empty (skipped)."""
        return float((self.states == 0).float().mean())


def create_block_mask(mask_mod, B: int | None, H: int | None, L: int, S: int, device=None) -> BlockMask:
    """Evaluate ``mask_mod`` once at tile level (a Triton kernel over every element of each 128 x 128 tile)."""
    mm = as_mask_mod(mask_mod)
    for name, n in (("B", B), ("H", H)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"create_block_mask: {name} must be a positive int or None, got {n!r}")
    for name, n in (("L", L), ("S", S)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"create_block_mask: {name} must be a positive int, got {n!r}")
    if device is None:
        device = mm.aux.device if mm.aux is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from .ops.attention.launch import block_states

    return BlockMask(block_states(mm, B or 1, H or 1, L, S, BLOCK, device), mm, L, S)
