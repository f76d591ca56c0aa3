"""PyTorch references of the positional encodings (float64 angles): the tests' references and the PyTorch path.
Imports no triton."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor

_INV_FREQ: dict = {}


def inv_freq(pairs: int, d: int, base: float, device) -> torch.Tensor:
    """float64 ``base^(-2j/d)`` for j < pairs; cached, so that a launch does not first launch its table. Only
    real tables are kept: one made under FakeTensorMode or while torch.compile traces would stand in for the
    real one in every later call."""
    key = (pairs, d, float(base), str(device))
    table = _INV_FREQ.get(key)
    if table is None:
        table = base ** (-2.0 * torch.arange(pairs, dtype=torch.float64, device=device) / d)
        if not isinstance(table, FakeTensor) and not torch.compiler.is_compiling() and len(_INV_FREQ) < 64:
            _INV_FREQ[key] = table
    return table


def _angles(pos: torch.Tensor, pairs: int, d: int, base: float) -> torch.Tensor:
    """float64 ``pos / base^(2j/d)`` for j < pairs, shape pos.shape + (pairs,)."""
    return pos.to(torch.float64)[..., None] * inv_freq(pairs, d, base, pos.device)


def sinusoidal_table(positions: torch.Tensor, d: int, base: float = 10000.0) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / base^(2i/d)), PE(pos, 2i+1) = cos(...), float64, shape positions.shape + (d,)."""
    a = _angles(positions, (d + 1) // 2, d, base)
    pe = torch.stack([a.sin(), a.cos()], dim=-1).flatten(-2)
    return pe[..., :d]


_TABLES: dict = {}


def rotary_tables(rot: int, base: float, device, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 cos and sin ``(>= end, rot/2)`` of the angles at positions 0.. (formed in float64, as
    :func:`rotary_reference`), cached per (rot, base, device) and grown by doubling; none kept from tracing or
    FakeTensorMode (see :func:`inv_freq`)."""
    key = (rot, float(base), str(device))
    tables = _TABLES.get(key)
    if tables is None or tables[0].shape[0] < end:
        size = max(256, 1 << max(end - 1, 1).bit_length())
        a = _angles(torch.arange(size, device=device), rot // 2, rot, base)
        tables = (a.cos().float(), a.sin().float())
        if not isinstance(a, FakeTensor) and not torch.compiler.is_compiling() and len(_TABLES) < 16:
            _TABLES[key] = tables
    return tables


def rotate_pairs(x, cos, sin, interleaved: bool, rot: int, compute_dtype=torch.float32) -> torch.Tensor:
    """x (N, H, L, E) with the pairs of its first ``rot`` columns turned by the angles whose cos and sin are
    given (broadcast against (N, H, L, rot/2)); the other columns pass through."""
    xf = x.to(compute_dtype)
    cos, sin = cos.to(compute_dtype), sin.to(compute_dtype)
    if interleaved:
        x1, x2 = xf[..., 0:rot:2], xf[..., 1:rot:2]
    else:
        x1, x2 = xf[..., : rot // 2], xf[..., rot // 2 : rot]
    y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    rotated = torch.stack([y1, y2], -1).flatten(-2) if interleaved else torch.cat([y1, y2], -1)
    return torch.cat([rotated, xf[..., rot:]], -1).to(x.dtype) if rot < x.shape[-1] else rotated.to(x.dtype)


def rotary_reference(x, pos, base, interleaved, rot, sign=1.0, compute_dtype=torch.float64):
    """Rotate pairs of the first ``rot`` columns of x (N, H, L, E) by ``sign * angle``; pos (N|1, L). Angles
    in float64; the rotation in ``compute_dtype`` (float32 on the PyTorch path, as the kernel)."""
    a = _angles(pos, rot // 2, rot, base)[:, None]  # (N|1, 1, L, rot/2)
    return rotate_pairs(x, a.cos(), a.sin() * sign, interleaved, rot, compute_dtype)
