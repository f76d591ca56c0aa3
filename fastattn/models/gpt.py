"""A decoder-only language model: pre-norm blocks (RMSNorm), rotary positions, optional grouped-query
attention, a GELU MLP; greedy generation over a key/value cache; ``impl="fastattn"`` or ``"torch"``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import KVCache
from .layers import Attention, FeedForward, Rotary, check_impl, rms_norm


class Block(nn.Module):
    def __init__(self, d_model, nhead, kv_heads, dim_feedforward, dropout, impl):
        super().__init__()
        self.attn = Attention(d_model, nhead, kv_heads=kv_heads, dropout=dropout, bias=False, impl=impl)
        self.mlp = FeedForward(d_model, dim_feedforward, dropout, activation=F.gelu)
        self.norm1, self.norm2 = rms_norm(d_model, impl), rms_norm(d_model, impl)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, rotary: Rotary, offset: int, cache: KVCache | None, layer: int):
        a = self.attn
        h = self.norm1(x)
        k, v = a.kv(h)
        q, k = rotary(a.q(h), k, offset)
        if cache is not None and a.impl == "fastattn":  # writes k, v into the cache and attends, in one call
            att = a.decode(q, k, v, cache, layer)
        else:
            if cache is not None:
                k, v = cache.update(layer, k, v)
            # Without a cache (or filling an empty one) the scores are causal; a decoding step's queries are the
            # newest positions and see every cached key.
            att = a.attend(q, k, v, causal=offset == 0 and x.shape[1] > 1)
        x = x + self.dropout(att)
        return x + self.dropout(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    """``forward(idx (N, L))`` returns logits ``(N, L, vocab_size)``; ``generate()`` continues greedily.

    ``kv_heads`` < ``nhead`` gives grouped-query attention. The same weights run on ``impl="fastattn"``
    (fastattn's SDPA, RMSNorm and rotary kernels) and ``impl="torch"`` (F.scaled_dot_product_attention,
    nn.RMSNorm, rotate-half RoPE with cos/sin tables)."""

    def __init__(self, d_model: int = 768, nhead: int = 12, num_layers: int = 12, *, vocab_size: int = 32000,
                 kv_heads: int | None = None, dim_feedforward: int | None = None, dropout: float = 0.0,
                 max_len: int = 2048, rope_base: float = 10000.0, impl: str = "fastattn"):  # fmt: skip
        super().__init__()
        self.impl = check_impl(impl)
        self.embedding = nn.Embedding(vocab_size, d_model)
        ff = dim_feedforward or 4 * d_model
        self.blocks = nn.ModuleList(Block(d_model, nhead, kv_heads, ff, dropout, impl) for _ in range(num_layers))
        self.norm = rms_norm(d_model, impl)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.rotary = Rotary(d_model // nhead, max_len, rope_base, impl)
        self.max_len = max_len

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        offset = 0 if cache is None else cache.length
        if offset + idx.shape[1] > self.max_len:
            raise ValueError(f"positions up to {offset + idx.shape[1]} exceed max_len {self.max_len}")
        x = self.embedding(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, self.rotary, offset, cache, i)
        if cache is not None:
            cache.advance(idx.shape[1])
        return self.lm_head(self.norm(x))

    def new_cache(self, batch: int, capacity: int, dtype=None, device=None) -> KVCache:
        a = self.blocks[0].attn
        w = self.embedding.weight
        return KVCache(len(self.blocks), batch, a.kv_heads, capacity, a.head_dim, dtype or w.dtype, device or w.device)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, use_cache: bool = True) -> torch.Tensor:
        """Greedy continuation of ``idx`` (N, L): returns (N, L + max_new_tokens). With ``use_cache`` the
        prompt fills the cache once and each step runs the model on the newest token only."""
        cache = self.new_cache(idx.shape[0], idx.shape[1] + max_new_tokens) if use_cache else None
        out, step_in = idx, idx
        for _ in range(max_new_tokens):
            logits = self(step_in, cache) if use_cache else self(out)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out = torch.cat([out, nxt], 1)
            step_in = nxt
        return out
