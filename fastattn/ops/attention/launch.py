"""Launchers of the Triton attention kernels: allocate outputs, pick a config, set the grid.

Inputs arrive canonical (see ``fastattn.ops.attention.function``): q ``(Z, H, L, E)``, k ``(Z, H_kv, S, E)``,
v ``(Z, H_kv, S, Ev)`` with any strides, and an optional ``bias`` already expanded (a view, broadcast strides
of 0) to ``(Z, H, L, S)``, float (added to the scaled scores) or bool (True = take part).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._backend import interpreting
from ..._kernel_log import record
from .._interpreter import patch_if_interpreting
from ..common import new_buffer as _new
from .args import (
    Dropout,
    Mods,
    Rows,
    Scores,
    Tile,
    Window,
    dropout_arg,
    flags,
    mods_arg,
    operand,
    rotary_arg,
    scores_arg,
    tile_arg,
    window_arg,
)
from .bwd_kernel import (
    _attention_bwd_dkdv_kernel,
    _attention_bwd_dq_kernel,
    _attention_bwd_preprocess_kernel,
)
from .configs import (
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
from .fwd_kernel import _attention_fwd_kernel
from .spec import MaskSpec, RotarySpec, Varlen

patch_if_interpreting()


def _rows(varlen: Varlen | None, q: torch.Tensor, H: int, L: int, k: torch.Tensor | None = None) -> Rows:
    """Per-sequence rows, key splits and paging of the kernels (all off without ``varlen``)."""
    if varlen is None:
        return Rows(q, H * L, L, 0, 0, 0, q, 0, 1, tl.constexpr(False), tl.constexpr(False), tl.constexpr(False))
    split = varlen.splits > 1
    so, sl = varlen.split_strides if split else (0, 0)
    bt = varlen.block_table
    return Rows(
        varlen.seq, *varlen.lse_strides, varlen.split_len if split else 0, so, sl,
        q if bt is None else bt, 0 if bt is None else bt.stride(0), 1 if bt is None else k.shape[2],
        tl.constexpr(True), tl.constexpr(split), tl.constexpr(bt is not None),
    )  # fmt: skip


def _block_d(e: int) -> int:
    # tl.dot needs K >= 16, and tiles are powers of two: head dim 80 runs in a 128-wide tile, masked.
    return max(16, triton.next_power_of_2(e))


def _rotary_tables(rotary: RotarySpec, L: int, S: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin of the rotary angles, (positions, dim/2), angles formed in fp64. Row r is position
    ``rotary.offset + min(0, S - L) + r``: queries before key 0 (L > S) have negative positions."""
    from ..posenc.reference import inv_freq

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


def _tune_key(kind, q, k, v, sc: Scores, win: Window, drop: Dropout, mods: Mods) -> tuple:
    bucket = (triton.next_power_of_2(q.shape[2]), triton.next_power_of_2(k.shape[2]))
    return (kind, q.dtype, q.shape[-1], v.shape[-1], q.shape[1] // k.shape[1], *flags(sc, win, drop, mods), *bucket)


def _fit_block_mask(candidates: list, mods: Mods) -> list:
    """Configs whose tiles lie inside the block mask's tiles (all do: kernel tiles are at most 128)."""
    if not mods.HAS_BLOCK_MASK.value:
        return candidates
    block = mods.BM_BLOCK.value
    fit = [c for c in candidates if block % c.block_m == 0 and block % c.block_n == 0]
    if not fit:
        raise ValueError(f"no attention config has tiles dividing the block mask's {block}")
    return fit


def block_states(mask_mod, Z: int, H: int, L: int, S: int, block: int, device) -> torch.Tensor:
    """int8 (Z, H, cdiv(L, block), cdiv(S, block)) tile states of ``mask_mod`` (see ``fastattn.mods``)."""
    from .block_mask_kernel import _block_states_kernel

    tiles_m, tiles_n = triton.cdiv(L, block), triton.cdiv(S, block)
    # Rows padded to 16 states: the strides stay multiples of 16 for every L and S, so the kernels that read them
    # are the same compiled kernels for any shape (the JIT keys on ints' divisibility by 16).
    out = torch.zeros((Z, H, tiles_m, triton.cdiv(tiles_n, 16) * 16), dtype=torch.int8, device=device)
    mods = mods_arg(out, mask_mod=mask_mod)
    record("create_block_mask", "_block_states_kernel", "triton")
    _block_states_kernel[(tiles_m, tiles_n, Z * H)](out, L, S, H, out.stride(2), mods, BLOCK=block)
    return out[..., :tiles_n]


def _tile(q, k, v, cfg, tma: bool) -> Tile:
    E, EV = q.shape[-1], v.shape[-1]
    group = q.shape[1] // k.shape[1]
    return tile_arg(group, E, EV, _block_d(E), _block_d(EV), cfg.block_m, cfg.block_n, _input_precision(q.dtype), tma)


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
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    score_mod=None,
    mask_mod=None,
    block_mask=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``out (Z, H, L, Ev)`` in q's dtype and ``lse (Z, H, L)`` float32 (natural log). ``alibi``:
    float32 slopes (H,) or (Z, H), adding ``-slope * |i + offset - j|`` to the scores. ``rotary``: q and k
    are turned by rotary embeddings inside the kernel (key j at ``rotary.offset + j``). ``varlen``: per-sequence
    rows (L, S: the longest); then ``out`` (a view) and ``lse`` (addressed by ``varlen.lse_strides``) are given.
    ``softcap``: scaled scores s become ``softcap * tanh(s / softcap)``. ``sinks``: float32 (H,) logits that
    join each row's softmax without a value (the LSE includes them). ``score_mod``, ``mask_mod``,
    ``block_mask``: ``fastattn.mods``."""
    Z, H, L, E = q.shape
    S, EV = k.shape[2], v.shape[-1]
    out = _new((Z, H, L, EV), q.dtype, q.device) if out is None else out
    lse = _new((Z, H, L), torch.float32, q.device) if lse is None else lse
    sc = scores_arg(q, bias, alibi, softcap, sinks)
    mods = mods_arg(q, score_mod, mask_mod, block_mask)
    win, drop = window_arg(mask.offset, mask.left, mask.right), dropout_arg(dropout_p, seed, philox_offset)
    rows = _rows(varlen, q, H, L, k)

    # Rotary loads each pair partner by permuted pointers; VARLEN rows are not a descriptor's 4-D box.
    tma = rotary is None and varlen is None and _tma_ok(k, v)
    rope = rotary_arg(q)
    if rotary is not None:
        # The kernel indexes table rows: key j is row j + max(0, L - S), query i row i + S - L + the same.
        tables = _rotary_tables(rotary, L, S, q.device)
        rope = rotary_arg(q, tables, rotary.dim, max(0, L - S), rotary.interleaved)

    def launch(cfg):
        grid = (triton.cdiv(L, cfg.block_m), Z * H, 1 if varlen is None else varlen.splits)
        kk, vv = (_descriptor(k, cfg.block_n), _descriptor(v, cfg.block_n)) if cfg.tma else (k, v)
        record("attention_fwd", "_attention_fwd_kernel", "triton")
        _attention_fwd_kernel[grid](
            operand(q), operand(k, kk), operand(v, vv), operand(out), lse, H, L, S, scale, sc, mods, win, drop, rope,
            rows, _tile(q, k, v, cfg, cfg.tma), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    bd, size = _block_d(max(E, EV)), q.element_size()
    if varlen is not None:
        candidates = varlen_configs("fwd", bd, size)
    elif rotary is not None:
        candidates = rotary_fwd_configs(bd, size)
    else:
        candidates = _with_descriptors(tma_fwd_configs(bd, size) if tma else [], fwd_configs(bd, size))
    key = _tune_key("fwd", q, k, v, sc, win, drop, mods) + (tma, rotary is not None, varlen is not None)
    cfg = pick(key, _fit_block_mask(candidates, mods), launch, q.device)
    launch(cfg)
    return out, lse


def rowsum_do_o(out: torch.Tensor, do: torch.Tensor, shape, rows: Rows) -> torch.Tensor:
    """delta = rowsum(dO * O), float32 of the LSE's ``shape``: the backward's pre-kernel (Triton's, also for the
    Gluon backward). ``rows``: the ``_rows`` of the launch."""
    Z, H, L, EV = out.shape
    delta = _new(shape, torch.float32, out.device)
    record("attention_bwd", "_attention_bwd_preprocess_kernel", "triton")
    _attention_bwd_preprocess_kernel[(triton.cdiv(L, 64), Z * H)](
        operand(out), operand(do), delta, H, L, rows, HEAD_DV=EV, BLOCK_M=64, BLOCK_DV=_block_d(EV)
    )
    return delta


def sinks_grad(sinks: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, head_dim: int) -> torch.Tensor:
    """d loss / d sinks: the sink's probability exp(t - lse) times (0 - delta), delta = dO . O = sum_j P dP,
    summed over every row of each head (``head_dim``: the heads' dim of the LSE / delta buffers); a plain
    reduction, so deterministic. The sink has no value, so its dS is P_sink (0 - delta)."""
    shape = [1] * lse.dim()
    shape[head_dim] = -1
    p_sink = torch.exp(sinks.view(shape) - torch.where(torch.isneginf(lse), float("inf"), lse))
    dims = [d for d in range(lse.dim()) if d != head_dim]
    return -(p_sink * delta).sum(dims)


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
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    score_mod=None,
    mask_mod=None,
    block_mask=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Returns ``dq, dk, dv`` (shapes and dtypes of q, k, v), when ``bias_grad`` the score gradient ``dS`` as a
    float32 ``(Z, H, L, S)`` tensor (to be summed over the bias's broadcast dimensions), and with ``sinks``
    their float32 gradient. ``varlen``: as in the forward; ``grads`` are then the (dq, dk, dv) views to write."""
    Z, H, L, E = q.shape
    HK, S, EV = k.shape[1], k.shape[2], v.shape[-1]
    bd_k, bd_v = _block_d(E), _block_d(EV)
    rows = _rows(varlen, q, H, L)
    delta = rowsum_do_o(out, do, lse.shape, rows)
    if grads is None:
        grads = _new(q.shape, q.dtype, q.device), _new(k.shape, k.dtype, k.device), _new(v.shape, v.dtype, v.device)
    dq, dk, dv = grads
    # dS is written only on visible tiles; the skipped ones must read as 0.
    db = torch.zeros((Z, H, L, S), dtype=torch.float32, device=q.device) if bias_grad else q
    sc = scores_arg(q, bias, alibi, softcap, sinks)
    mods = mods_arg(q, score_mod, mask_mod, block_mask)
    win, drop = window_arg(mask.offset, mask.left, mask.right), dropout_arg(dropout_p, seed, philox_offset)
    pdp = lse if sinks is None else _new(lse.shape, torch.float32, q.device)

    def launch_dkdv(cfg):
        qq, dd = (_descriptor(q, cfg.block_m), _descriptor(do, cfg.block_m)) if cfg.tma else (q, do)
        record("attention_bwd", "_attention_bwd_dkdv_kernel", "triton")
        _attention_bwd_dkdv_kernel[(triton.cdiv(S, cfg.block_n), Z * HK)](
            operand(q, qq), operand(k), operand(v), operand(do, dd), lse, delta, operand(dk), operand(dv), H, L, S,
            scale, sc, mods, win, drop, rows, _tile(q, k, v, cfg, cfg.tma), num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )  # fmt: skip

    def launch_dq(cfg):
        kk, vv = (_descriptor(k, cfg.block_n), _descriptor(v, cfg.block_n)) if cfg.tma else (k, v)
        record("attention_bwd", "_attention_bwd_dq_kernel", "triton")
        _attention_bwd_dq_kernel[(triton.cdiv(L, cfg.block_m), Z * H)](
            operand(q), operand(k, kk), operand(v, vv), operand(do), lse, delta, operand(dq), db, pdp, H, L, S,
            scale, sc, mods, win, drop, rows, _tile(q, k, v, cfg, cfg.tma), BIAS_GRAD=bias_grad,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    bd, size = max(bd_k, bd_v), q.element_size()
    tma_qdo, tma_kv = varlen is None and _tma_ok(q, do), varlen is None and _tma_ok(k, v)
    dkdv_candidates = _with_descriptors(tma_dkdv_configs(bd, size) if tma_qdo else [], dkdv_configs(bd, size))
    dq_candidates = _with_descriptors(tma_dq_configs(bd, size) if tma_kv else [], dq_configs(bd, size))
    if varlen is not None:
        dkdv_candidates, dq_candidates = varlen_configs("dkdv", bd, size), varlen_configs("dq", bd, size)
    vl = varlen is not None
    dkdv_key = _tune_key("dkdv", q, k, v, sc, win, drop, mods) + (tma_qdo, vl)
    launch_dkdv(pick(dkdv_key, _fit_block_mask(dkdv_candidates, mods), launch_dkdv, q.device))
    dq_key = _tune_key("dq", q, k, v, sc, win, drop, mods) + (tma_kv, bias_grad, vl)
    launch_dq(pick(dq_key, _fit_block_mask(dq_candidates, mods), launch_dq, q.device))
    dsinks = None if sinks is None else sinks_grad(sinks, lse, pdp, 0 if vl else 1)
    return dq, dk, dv, (db if bias_grad else None), dsinks
