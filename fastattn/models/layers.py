"""Building blocks of the reference models, each in two implementations with the same parameters.

``impl="fastattn"`` runs fastattn's ops (its SDPA drop-in, LayerNorm / RMSNorm, fused sinusoidal encoding
and rotary embeddings); ``impl="torch"`` runs stock PyTorch (``F.scaled_dot_product_attention``,
``nn.LayerNorm`` / ``nn.RMSNorm``, a positional-encoding table, rotate-half RoPE with cos/sin tables). The
module trees and state dicts are the same, so one set of weights runs on both.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastattn
from fastattn import _torch
from fastattn.ops.posenc.reference import inv_freq, sinusoidal_table

IMPLS = ("fastattn", "torch")


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def layer_norm(d: int, impl: str) -> nn.Module:
    return fastattn.LayerNorm(d) if impl == "fastattn" else _torch.TorchLayerNorm(d)


def rms_norm(d: int, impl: str) -> nn.Module:
    return fastattn.RMSNorm(d) if impl == "fastattn" else _torch.TorchRMSNorm(d)


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """(N, L, n*E) -> (N, n, L, E)."""
    return x.unflatten(-1, (n, -1)).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections; grouped-query when ``kv_heads < nhead``.

    The caller decides where keys and values come from (self-attention, a memory, a cache): ``q()`` and
    ``kv()`` project, ``attend()`` runs the SDPA of the implementation and the output projection."""

    def __init__(self, d_model: int, nhead: int, *, kv_heads: int | None = None, dropout: float = 0.0,
                 bias: bool = True, impl: str = "fastattn"):  # fmt: skip
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model ({d_model}) must be a multiple of nhead ({nhead})")
        self.nhead, self.kv_heads = nhead, kv_heads or nhead
        if self.nhead % self.kv_heads:
            raise ValueError(f"nhead ({nhead}) must be a multiple of kv_heads ({self.kv_heads})")
        self.head_dim = d_model // nhead
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, self.kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self.dropout = dropout
        self.impl = check_impl(impl)

    def q(self, x: torch.Tensor) -> torch.Tensor:
        return _heads(self.q_proj(x), self.nhead)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _heads(self.k_proj(x), self.kv_heads), _heads(self.v_proj(x), self.kv_heads)

    def attend(self, q, k, v, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """q (N, H, L, E), k/v (N, H_kv, S, E), mask broadcastable to (N, H, L, S) (bool, True = take part);
        ``causal``: top-left (query i sees keys j <= i). Returns (N, L, d_model)."""
        p = self.dropout if self.training else 0.0
        if self.impl == "fastattn" and mask is not None and not causal and mask.dtype == torch.bool:
            # A key padding mask (N, 1, 1, S) that leaves much of the batch empty: packed keys, no padding visited.
            if mask.dim() == 4 and mask.shape[1:3] == (1, 1) and mask.shape[0] == q.shape[0]:
                packed = fastattn.varlen.padded_key_attention(q, k, v, mask[:, 0, 0], p)
                if packed is not None:
                    return self.out_proj(packed.transpose(1, 2).flatten(2))
        sdpa = fastattn.scaled_dot_product_attention if self.impl == "fastattn" else _torch.scaled_dot_product_attention
        out = sdpa(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal, enable_gqa=self.kv_heads != self.nhead)
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def decode(self, q, k_new, v_new, cache, layer: int) -> torch.Tensor:
        """A cached step on fastattn's decode kernel: the new keys/values go into the cache at its current
        length and the queries attend causally to everything cached; returns (N, L, d_model)."""
        if cache.length + q.shape[2] > cache.capacity:
            raise ValueError(f"KVCache: {cache.length + q.shape[2]} positions exceed the capacity {cache.capacity}")
        out = fastattn.decode_attention(q, cache.k[layer], cache.v[layer], cache.lengths, k_new=k_new, v_new=v_new)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int, dropout: float = 0.0, activation=F.relu):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class SinusoidalEmbedding(nn.Module):
    """Token embedding times sqrt(d_model) plus the sinusoidal encoding of positions ``offset + l``: fused in
    one kernel for fastattn, a table (a non-persistent buffer, outside the state dict) for torch."""

    def __init__(self, vocab_size: int, d_model: int, max_len: int, dropout: float, impl: str):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        # Scaled by sqrt(d_model) below, so std d_model^-0.5 keeps embeddings on the scale of the encoding
        # (nn.Embedding's N(0, 1) would drown the positions).
        nn.init.normal_(self.embedding.weight, std=d_model**-0.5)
        self.dropout = nn.Dropout(dropout)
        self.scale, self.max_len, self.impl = math.sqrt(d_model), max_len, check_impl(impl)
        if impl == "torch":
            self.register_buffer("pe", sinusoidal_table(torch.arange(max_len), d_model).float(), persistent=False)

    def forward(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        if offset + tokens.shape[1] > self.max_len:
            raise ValueError(f"positions up to {offset + tokens.shape[1]} exceed max_len {self.max_len}")
        x = self.embedding(tokens)
        if self.impl == "fastattn":
            x = fastattn.sinusoidal_encoding(x, offset=offset, scale=self.scale)
        else:
            x = x * self.scale + self.pe[offset : offset + tokens.shape[1]].to(x.dtype)
        return self.dropout(x)


class Rotary(nn.Module):
    """Rotary embeddings (GPT-NeoX half split) of q and k at positions ``offset + l``: fastattn's kernel, or
    the usual PyTorch form with cached fp32 cos/sin tables and rotate-half."""

    def __init__(self, head_dim: int, max_len: int, base: float, impl: str):
        super().__init__()
        self.base, self.impl = base, check_impl(impl)
        if impl == "torch":
            freq = inv_freq(head_dim // 2, head_dim, base, torch.device("cpu"))
            angles = torch.arange(max_len, dtype=torch.float64)[:, None] * freq
            angles = torch.cat([angles, angles], -1)
            self.register_buffer("cos", angles.cos().float(), persistent=False)
            self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if self.impl == "fastattn":
            return fastattn.apply_rotary(q, k, offset=offset, base=self.base)
        cos = self.cos[offset : offset + q.shape[2]]
        sin = self.sin[offset : offset + q.shape[2]]

        def rotate(t):
            t1, t2 = t.chunk(2, dim=-1)
            return (t.float() * cos + torch.cat([-t2, t1], -1).float() * sin).to(t.dtype)

        return rotate(q), rotate(k)
