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
    :func:`rotary_reference`), cached per (rot, base, device) and grown by doubling."""

    def make(size):
        a = _angles(torch.arange(size, device=device), rot // 2, rot, base)
        return a.cos().float(), a.sin().float()

    return _cached((rot, float(base), device), end, make)


def _cached(key, end: int, make) -> tuple[torch.Tensor, ...]:
    """Tables of positions 0.. grown by doubling (at least ``end`` rows) and cached under ``key``; none kept
    from tracing or FakeTensorMode (see :func:`inv_freq`)."""
    tables = _TABLES.get(key)
    if tables is None or tables[0].shape[0] < end:
        tables = make(max(256, 1 << max(end - 1, 1).bit_length()))
        if not isinstance(tables[0], FakeTensor) and not torch.compiler.is_compiling() and len(_TABLES) < 32:
            _TABLES[key] = tables
    return tables


def rotary_full_tables(rot: int, base: float, device, end: int, interleaved: bool):
    """float32 ``(cos, signed sin)`` ``(>= end, rot)`` laid out as the pairs are: ``x * cos + swap(x) * sin``
    turns every pair (swap exchanges the two members of each pair); the PyTorch path's form, two products."""

    def make(size):
        cos, sin = rotary_tables(rot, base, device, size)
        cos, sin = cos[:size], sin[:size]
        if interleaved:
            return cos.repeat_interleave(2, -1), torch.stack([-sin, sin], -1).flatten(-2)
        return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)

    return _cached(("full", rot, float(base), device, interleaved), end, make)


def rotate_full(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x (N, H, L, E) turned over all E columns by :func:`rotary_full_tables` rows (L, E), in float32."""
    xf = x.float()
    if interleaved:
        swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        swapped = torch.cat([xf[..., half:], xf[..., :half]], -1)
    return torch.addcmul(xf * cos, swapped, sin).to(x.dtype)


def sinusoidal_cached(d: int, base: float, device, end: int) -> torch.Tensor:
    """float32 :func:`sinusoidal_table` of positions 0.. (>= end rows), cached: the PyTorch path's table."""
    make = lambda size: (sinusoidal_table(torch.arange(size, device=device), d, base).float(),)  # noqa: E731
    return _cached(("sinusoidal", d, float(base), device), end, make)[0]


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
