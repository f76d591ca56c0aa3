"""Launchers of the norm kernels: rows are the flattened leading dims, ``N`` the normalized size."""

from __future__ import annotations

import torch
import triton

from ..._backend import interpreting
from ..._kernel_log import record
from .._interpreter import patch_if_interpreting
from ..common import new_buffer as _new
from ..common import rows2d as _rows
from .kernels import _norm_bwd_kernel, _norm_fwd_kernel

patch_if_interpreting()

# Widest row kept in registers in one tile; wider rows are walked in tiles of this size.
MAX_TILE = 8192
# Under the interpreter rows wider than this are walked in tiles, which keeps the suite fast and runs the tiled
# path on small rows; the tests raise it to MAX_TILE to run the single-tile path of the GPU's widths too.
INTERPRETER_TILE = 256


def _tile(n: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(n), INTERPRETER_TILE if interpreting() else MAX_TILE)
    return block, triton.cdiv(n, block)


def _warps(block: int) -> int:
    # 16-byte accesses: 8 bf16 per thread; enough warps that a tile is one vector per thread or a few.
    return max(1, min(16, block // 256))


def norm_fwd(
    x: torch.Tensor,
    n: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    is_rms: bool,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Normalizes rows of ``n`` elements (the trailing dims). Returns ``y`` (shape and dtype of x), the fused
    sum ``s`` (when residual or dropout; else None), and fp32 ``mean``, ``rstd`` per row."""
    x2 = _rows(x, n)
    m = x2.shape[0]
    r2 = _rows(residual, n) if residual is not None else x2
    fused = residual is not None or dropout_p > 0.0
    y = _new(x2.shape, x.dtype, x.device)
    s = _new(x2.shape, x.dtype, x.device) if fused else y
    mean = _new((m,), torch.float32, x.device)
    rstd = _new((m,), torch.float32, x.device)
    block, chunks = _tile(n)
    if m > 0:
        record("norm_fwd", "_norm_fwd_kernel", "triton")
        _norm_fwd_kernel[(m,)](
            x2, r2, x2 if weight is None else weight, x2 if bias is None else bias, y, s, mean, rstd,
            x2.stride(0), r2.stride(0), y.stride(0), s.stride(0), n, eps, dropout_p, seed,
            IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None,
            HAS_DROPOUT=dropout_p > 0.0, BLOCK=block, NUM_CHUNKS=chunks, num_warps=_warps(block),
        )  # fmt: skip
    return y.view(x.shape), (s.view(x.shape) if fused else None), mean, rstd


def norm_bwd(
    dy: torch.Tensor,
    s: torch.Tensor,
    n: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    is_rms: bool,
    ds_out: torch.Tensor | None = None,
    has_residual: bool = False,
    dropout_p: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Returns ``dx``, ``dresidual`` (when ``has_residual``), ``dweight``, ``dbias`` (fp32 sums, cast to the
    parameters' dtypes). ``s`` is what the forward normalized (x, or the fused sum)."""
    s2, dy2 = _rows(s, n), _rows(dy, n)
    m = s2.shape[0]
    dso = _rows(ds_out, n) if ds_out is not None else dy2
    dx = _new(s2.shape, s.dtype, s.device)
    dr = _new(s2.shape, s.dtype, s.device) if has_residual else dx
    block, chunks = _tile(n)
    sms = 8 if interpreting() or not s.is_cuda else torch.cuda.get_device_properties(s.device).multi_processor_count
    programs = max(1, min(m, 4 * sms))
    rows_per_program = triton.cdiv(max(m, 1), programs)
    programs = triton.cdiv(max(m, 1), rows_per_program)
    # Wide rows accumulate dw/db in the buffer itself, so it must start at 0; narrow rows overwrite it.
    alloc = torch.zeros if chunks > 1 or m == 0 else torch.empty
    dw = alloc((programs, n), dtype=torch.float32, device=s.device) if weight is not None else None
    db = alloc((programs, n), dtype=torch.float32, device=s.device) if bias is not None else None
    if m > 0:
        record("norm_bwd", "_norm_bwd_kernel", "triton")
        _norm_bwd_kernel[(programs,)](
            s2, s2 if weight is None else weight, dy2, dso, dx, dr, s2 if dw is None else dw,
            s2 if db is None else db, mean, rstd, s2.stride(0), dy2.stride(0), dso.stride(0), dx.stride(0),
            dr.stride(0), m, n, rows_per_program, dropout_p, seed, IS_RMS=is_rms, HAS_W=weight is not None,
            HAS_B=bias is not None, HAS_DS_OUT=ds_out is not None, HAS_RES=has_residual,
            HAS_DROPOUT=dropout_p > 0.0, BLOCK=block, NUM_CHUNKS=chunks, num_warps=_warps(block),
        )  # fmt: skip
    dweight = None if dw is None else dw.sum(0).to(weight.dtype)
    dbias = None if db is None else db.sum(0).to(bias.dtype)
    return dx.view(s.shape), (dr.view(s.shape) if has_residual else None), dweight, dbias
