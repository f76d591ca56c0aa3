"""Positional encodings: the sinusoidal encoding of the original Transformer and rotary embeddings (RoPE),
computed in the kernels (no table read from memory)."""

from __future__ import annotations

from numbers import Integral

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops.posenc.function import rotary_forward, sinusoidal_forward


def _check_offset(api: str, offset) -> int:
    if isinstance(offset, bool) or not isinstance(offset, Integral) or offset < 0:
        raise ValueError(f"{api}: offset must be a non-negative int, got {offset!r}")
    return int(offset)


def sinusoidal_encoding(x: torch.Tensor, offset: int = 0, scale: float = 1.0) -> torch.Tensor:
    """``x * scale + PE`` for x ``(..., L, d_model)``, positions ``offset .. offset + L - 1`` along dim -2, with
    PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)) (odd d_model: the last
    column is a sine). Angles are exact to fp32 rounding at any position (formed in fp64, reduced mod 2π)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.dtype.is_floating_point:
        raise ValueError(f"sinusoidal_encoding: x must be a floating tensor (..., L, d_model), got {x!r:.80}")
    return sinusoidal_forward(x, _check_offset("sinusoidal_encoding", offset), float(scale), 10000.0)


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the sinusoidal encoding to ``(..., L, d_model)`` inputs, then dropout (training only)."""

    def __init__(self, d_model: int, dropout: float = 0.0):
        super().__init__()
        self.d_model, self.dropout = d_model, dropout

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"SinusoidalPositionalEncoding: expected last dim {self.d_model}, got {tuple(x.shape)}")
        return F.dropout(sinusoidal_encoding(x, offset), self.dropout, self.training)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, dropout={self.dropout}"


def _positions(api: str, positions, q: torch.Tensor) -> torch.Tensor | None:
    if positions is None:
        return None
    N, _, L, _ = q.shape
    if not isinstance(positions, torch.Tensor) or positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise ValueError(f"{api}: positions must be an integer tensor of shape (L,) or (N, L)")
    if positions.device != q.device:
        raise ValueError(f"{api}: positions is on {positions.device}, q on {q.device}")
    if tuple(positions.shape) not in ((L,), (N, L)):
        raise ValueError(f"{api}: positions must have shape ({L},) or ({N}, {L}), got {tuple(positions.shape)}")
    return positions.reshape(-1, L).to(torch.int64).contiguous()


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    offset: int = 0,
    positions: torch.Tensor | None = None,
    base: float = 10000.0,
    interleaved: bool = False,
    rotary_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embeddings for q ``(N, H, L, E)`` and k ``(N, H_kv, L, E)`` (the SDPA layout), positions along
    dim -2: ``offset + l``, or ``positions`` ``(L,)`` / ``(N, L)``. GPT-NeoX half-split pairs (j, j + r/2) or,
    with ``interleaved``, GPT-J pairs (2j, 2j + 1); pair j turns by ``pos / base^(2j/r)``, r = ``rotary_dim``
    (default E; columns past it are unchanged). Returns the rotated ``(q, k)``; differentiable."""
    api = "apply_rotary"
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.dtype.is_floating_point:
            raise ValueError(f"{api}: {name} must be a floating tensor (N, H, L, E)")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{api}: q {tuple(q.shape)} and k {tuple(k.shape)} must share N, L and E")
    E = q.shape[-1]
    rot = E if rotary_dim is None else rotary_dim
    if isinstance(rot, bool) or not isinstance(rot, Integral) or rot <= 0 or rot % 2 or rot > E:
        raise ValueError(f"{api}: rotary_dim must be an even int in [2, {E}], got {rotary_dim!r}")
    pos = _positions(api, positions, q)
    offset = _check_offset(api, offset)
    return rotary_forward(q, k, pos, offset, float(base), bool(interleaved), int(rot))


class RotaryEmbedding(nn.Module):
    """Rotary embeddings as a module: ``forward(q, k, offset=0, positions=None) -> (q, k)``. Holds no
    tables: angles are computed in the kernel."""

    def __init__(self, dim: int, base: float = 10000.0, interleaved: bool = False):
        super().__init__()
        self.dim, self.base, self.interleaved = dim, base, interleaved

    def forward(self, q, k, offset: int = 0, positions: torch.Tensor | None = None):
        return apply_rotary(
            q, k, offset=offset, positions=positions, base=self.base, interleaved=self.interleaved,
            rotary_dim=self.dim,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base}, interleaved={self.interleaved}"


def alibi_slopes(num_heads: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """The standard ALiBi slopes (Press et al.), float32 ``(num_heads,)`` on ``device`` (default: torch's
    default device, as ``torch.tensor``): for a power of two n, ``2^(-8i/n)`` for i = 1..n; otherwise those of
    the power of two below, then every other slope of twice that."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, Integral) or num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads must be a positive int, got {num_heads!r}")

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

    low = 2 ** (int(num_heads).bit_length() - 1)
    slopes = geometric(low) + geometric(2 * low)[0::2][: num_heads - low]
    return torch.tensor(slopes, dtype=torch.float32, device=device)
