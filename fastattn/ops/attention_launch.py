"""Launchers of the Triton attention kernels: allocate outputs, pick a config, set the grid.

Inputs arrive canonical (see ``fastattn.ops.attention_function``): q ``(Z, H, L, E)``, k ``(Z, H_kv, S, E)``,
v ``(Z, H_kv, S, Ev)`` with any strides, and an optional ``bias`` already expanded (a view, broadcast strides
of 0) to ``(Z, H, L, S)``, float (added to the scaled scores) or bool (True = take part).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from .._backend import interpreting
from .._kernel_log import record
from .attention_bwd_kernel import (
    _attention_bwd_dkdv_kernel,
    _attention_bwd_dq_kernel,
    _attention_bwd_preprocess_kernel,
)
from .attention_configs import (
    dkdv_configs,
    dq_configs,
    fwd_configs,
    pick,
    rotary_fwd_configs,
    tma_dkdv_configs,
    tma_dq_configs,
    tma_fwd_configs,
    varlen_configs,
)
from .attention_fwd_kernel import _attention_fwd_kernel

if interpreting():
    from ._interpreter import patch_bf16

    patch_bf16()


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


def _seq_args(varlen: Varlen | None, q: torch.Tensor, H: int, L: int) -> dict:
    if varlen is None:
        return dict(SEQ=q, slse_z=H * L, slse_h=L, VARLEN=False)
    return dict(SEQ=varlen.seq, slse_z=varlen.lse_strides[0], slse_h=varlen.lse_strides[1], VARLEN=True)


def _split_args(varlen: Varlen | None, q: torch.Tensor, k: torch.Tensor) -> dict:
    """Key splits and paging of the forward kernel (off without ``varlen``)."""
    args = dict(split_len=0, so_split=0, slse_split=0, SPLIT=False, BT=q, sbt=0, PAGE=1, PAGED=False)
    if varlen is not None and varlen.splits > 1:
        so, sl = varlen.split_strides
        args.update(split_len=varlen.split_len, so_split=so, slse_split=sl, SPLIT=True)
    if varlen is not None and varlen.block_table is not None:
        args.update(BT=varlen.block_table, sbt=varlen.block_table.stride(0), PAGE=k.shape[2], PAGED=True)
    return args


def _block_d(e: int) -> int:
    # tl.dot needs K >= 16, and tiles are powers of two: head dim 80 runs in a 128-wide tile, masked.
    return max(16, triton.next_power_of_2(e))


def _rotary_tables(rotary: RotarySpec, L: int, S: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin of the rotary angles, (positions, dim/2), angles formed in fp64. Row r is position
    ``rotary.offset + min(0, S - L) + r``: queries before key 0 (L > S) have negative positions."""
    from .posenc_function import inv_freq  # posenc_function builds on this module

    first = rotary.offset + min(0, S - L)
    pos = torch.arange(first, rotary.offset + S, device=device, dtype=torch.float64)
    angles = pos[:, None] * inv_freq(rotary.dim // 2, rotary.dim, rotary.base, device)[None, :]
    return angles.cos().float().contiguous(), angles.sin().float().contiguous()


def _tma_ok(*tensors: torch.Tensor) -> bool:
    """Whether K/V can go through tensor descriptors: a Hopper-class GPU (or the interpreter), 16-bit data,
    unit last stride, 16-byte aligned base and strides (the copy engine's rules)."""
    if not interpreting():
        if not tensors[0].is_cuda or torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
            return False
    for t in tensors:
        size = t.element_size()
        if size != 2 or t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        # Broadcast (stride-0) dims, as in the dO of out.sum().backward(), are not for the copy engine.
        if any(st == 0 or st * size % 16 for st in t.stride()[:-1]):
            return False
    return True


def _descriptor(t: torch.Tensor, rows: int):
    """A (Z, H, N, E) descriptor whose loads give ``rows`` rows of one head, head dim padded to the tile."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, _block_d(t.shape[-1])])


def _with_descriptors(tma: list, pointer: list) -> list:
    """Candidates to try: where descriptors apply, those plus the default pointer config and the last
    (smallest) one, the fallback for shared memory; each candidate costs a compile when a shape is tuned."""
    if not tma:
        return pointer
    return tma + [pointer[0]] + ([pointer[-1]] if len(pointer) > 1 else [])


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _new(shape, dtype, device) -> torch.Tensor:
    """An output buffer; NaN-poisoned under FASTATTN_POISON=1 so tests catch elements never written."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("FASTATTN_POISON") == "1":
        out.fill_(float("nan"))
    return out


def _bias_args(bias: torch.Tensor | None, q: torch.Tensor):
    if bias is None:
        return q, (0, 0, 0, 0), 0
    return bias, tuple(bias.stride()), 2 if bias.dtype == torch.bool else 1


def _flags(mask: MaskSpec, dropout_p: float, alibi: torch.Tensor | None) -> dict:
    return dict(
        HAS_LEFT=mask.left is not None, HAS_RIGHT=mask.right is not None, HAS_DROPOUT=dropout_p > 0.0,
        HAS_ALIBI=alibi is not None,
    )  # fmt: skip


def _alibi_args(alibi: torch.Tensor | None, q: torch.Tensor) -> tuple:
    """(pointer, batch stride, head stride) of float32 ALiBi slopes shaped (H,) or (Z, H)."""
    if alibi is None:
        return q, 0, 0
    return (alibi, 0, alibi.stride(0)) if alibi.dim() == 1 else (alibi, alibi.stride(0), alibi.stride(1))


def _tune_key(kind, q, k, v, bias_mode, flags) -> tuple:
    bucket = (triton.next_power_of_2(q.shape[2]), triton.next_power_of_2(k.shape[2]))
    return (kind, q.dtype, q.shape[-1], v.shape[-1], q.shape[1] // k.shape[1], bias_mode, *flags.values(), *bucket)


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    mask: MaskSpec,
    dropout_p: float = 0.0,
    seed: int = 0,
    philox_offset: int = 0,
    alibi: torch.Tensor | None = None,
    rotary: RotarySpec | None = None,
    varlen: Varlen | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``out (Z, H, L, Ev)`` in q's dtype and ``lse (Z, H, L)`` float32 (natural log). ``alibi``:
    float32 slopes (H,) or (Z, H), adding ``-slope * |i + offset - j|`` to the scores. ``rotary``: q and k
    are turned by rotary embeddings inside the kernel (key j at ``rotary.offset + j``). ``varlen``: per-sequence
    rows (L, S: the longest); then ``out`` (a view) and ``lse`` (addressed by ``varlen.lse_strides``) are given."""
    Z, H, L, E = q.shape
    S, EV = k.shape[2], v.shape[-1]
    out = _new((Z, H, L, EV), q.dtype, q.device) if out is None else out
    lse = _new((Z, H, L), torch.float32, q.device) if lse is None else lse
    b, sb, bias_mode = _bias_args(bias, q)
    flags = _flags(mask, dropout_p, alibi)

    # Rotary loads each pair partner by permuted pointers; VARLEN rows are not a descriptor's 4-D box.
    tma = rotary is None and varlen is None and _tma_ok(k, v)
    rot_args = (q, q, 0, 0)
    if rotary is not None:
        # The kernel indexes table rows: key j is row j + max(0, L - S), query i row i + S - L + the same.
        rot_args = (*_rotary_tables(rotary, L, S, q.device), rotary.dim, max(0, L - S))

    def launch(cfg):
        grid = (triton.cdiv(L, cfg.block_m), Z * H, 1 if varlen is None else varlen.splits)
        kk, vv = (_descriptor(k, cfg.block_n), _descriptor(v, cfg.block_n)) if cfg.tma else (k, v)
        record("attention_fwd", "_attention_fwd_kernel", "triton")
        _attention_fwd_kernel[grid](
            q,
            kk,
            vv,
            b,
            out,
            lse,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *sb,
            *out.stride(),
            H,
            L,
            S,
            scale,
            mask.offset,
            mask.left or 0,
            mask.right or 0,
            dropout_p,
            seed,
            philox_offset,
            *_alibi_args(alibi, q),
            *rot_args,
            **_seq_args(varlen, q, H, L),
            **_split_args(varlen, q, k),
            GROUP=H // k.shape[1],
            HEAD_DK=E,
            HEAD_DV=EV,
            BLOCK_DK=_block_d(E),
            BLOCK_DV=_block_d(EV),
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BIAS_MODE=bias_mode,
            INPUT_PRECISION=_input_precision(q.dtype),
            USE_TMA=cfg.tma,
            HAS_ROTARY=rotary is not None,
            ROT_INTERLEAVED=rotary is not None and rotary.interleaved,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            **flags,
        )

    bd, size = _block_d(max(E, EV)), q.element_size()
    if varlen is not None:
        candidates = varlen_configs("fwd", bd, size)
    elif rotary is not None:
        candidates = rotary_fwd_configs(bd, size)
    else:
        candidates = _with_descriptors(tma_fwd_configs(bd, size) if tma else [], fwd_configs(bd, size))
    key = _tune_key("fwd", q, k, v, bias_mode, flags) + (tma, rotary is not None, varlen is not None)
    cfg = pick(key, candidates, launch, q.device)
    launch(cfg)
    return out, lse


def rowsum_do_o(out: torch.Tensor, do: torch.Tensor, shape, seq: dict) -> torch.Tensor:
    """delta = rowsum(dO * O), float32 of the LSE's ``shape``: the backward's pre-kernel (Triton's, also for the
    Gluon backward). ``seq``: the ``_seq_args`` of the launch."""
    Z, H, L, EV = out.shape
    delta = _new(shape, torch.float32, out.device)
    record("attention_bwd", "_attention_bwd_preprocess_kernel", "triton")
    _attention_bwd_preprocess_kernel[(triton.cdiv(L, 64), Z * H)](
        out, do, delta, *out.stride(), *do.stride(), H, L, HEAD_DV=EV, BLOCK_M=64, BLOCK_DV=_block_d(EV), **seq
    )  # fmt: skip
    return delta


def attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    mask: MaskSpec,
    dropout_p: float = 0.0,
    seed: int = 0,
    philox_offset: int = 0,
    bias_grad: bool = False,
    alibi: torch.Tensor | None = None,
    varlen: Varlen | None = None,
    grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns ``dq, dk, dv`` (shapes and dtypes of q, k, v) and, when ``bias_grad``, the score gradient
    ``dS`` as a float32 ``(Z, H, L, S)`` tensor (to be summed over the bias's broadcast dimensions).
    ``varlen``: as in the forward; ``grads`` are then the (dq, dk, dv) views to write."""
    Z, H, L, E = q.shape
    HK, S, EV = k.shape[1], k.shape[2], v.shape[-1]
    bd_k, bd_v = _block_d(E), _block_d(EV)
    seq = _seq_args(varlen, q, H, L)
    delta = rowsum_do_o(out, do, lse.shape, seq)
    if grads is None:
        grads = _new(q.shape, q.dtype, q.device), _new(k.shape, k.dtype, k.device), _new(v.shape, v.dtype, v.device)
    dq, dk, dv = grads
    # dS is written only on visible tiles; the skipped ones must read as 0.
    db = torch.zeros((Z, H, L, S), dtype=torch.float32, device=q.device) if bias_grad else q
    b, sb, bias_mode = _bias_args(bias, q)
    flags = _flags(mask, dropout_p, alibi)
    common = dict(
        GROUP=H // HK,
        HEAD_DK=E,
        HEAD_DV=EV,
        BLOCK_DK=bd_k,
        BLOCK_DV=bd_v,
        BIAS_MODE=bias_mode,
        INPUT_PRECISION=_input_precision(q.dtype),
        **flags,
        **seq,
    )
    runtime = (H, L, S, scale, mask.offset, mask.left or 0, mask.right or 0, dropout_p, seed, philox_offset)
    runtime += _alibi_args(alibi, q)

    def launch_dkdv(cfg):
        qq, dd = (_descriptor(q, cfg.block_m), _descriptor(do, cfg.block_m)) if cfg.tma else (q, do)
        record("attention_bwd", "_attention_bwd_dkdv_kernel", "triton")
        _attention_bwd_dkdv_kernel[(triton.cdiv(S, cfg.block_n), Z * HK)](
            qq,
            k,
            v,
            b,
            dd,
            lse,
            delta,
            dk,
            dv,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *sb,
            *do.stride(),
            *dk.stride(),
            *dv.stride(),
            *runtime,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            USE_TMA=cfg.tma,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            **common,
        )

    def launch_dq(cfg):
        kk, vv = (_descriptor(k, cfg.block_n), _descriptor(v, cfg.block_n)) if cfg.tma else (k, v)
        record("attention_bwd", "_attention_bwd_dq_kernel", "triton")
        _attention_bwd_dq_kernel[(triton.cdiv(L, cfg.block_m), Z * H)](
            q,
            kk,
            vv,
            b,
            do,
            lse,
            delta,
            dq,
            db,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *sb,
            *do.stride(),
            *dq.stride(),
            *runtime,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            BIAS_GRAD=bias_grad,
            USE_TMA=cfg.tma,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
            **common,
        )

    bd, size = max(bd_k, bd_v), q.element_size()
    tma_qdo, tma_kv = varlen is None and _tma_ok(q, do), varlen is None and _tma_ok(k, v)
    dkdv_candidates = _with_descriptors(tma_dkdv_configs(bd, size) if tma_qdo else [], dkdv_configs(bd, size))
    dq_candidates = _with_descriptors(tma_dq_configs(bd, size) if tma_kv else [], dq_configs(bd, size))
    if varlen is not None:
        dkdv_candidates, dq_candidates = varlen_configs("dkdv", bd, size), varlen_configs("dq", bd, size)
    vl = varlen is not None
    dkdv_key = _tune_key("dkdv", q, k, v, bias_mode, flags) + (tma_qdo, vl)
    launch_dkdv(pick(dkdv_key, dkdv_candidates, launch_dkdv, q.device))
    launch_dq(
        pick(_tune_key("dq", q, k, v, bias_mode, flags) + (tma_kv, bias_grad, vl), dq_candidates, launch_dq, q.device)
    )
    return dq, dk, dv, (db if bias_grad else None)
