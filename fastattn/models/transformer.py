"""The encoder-decoder Transformer of "Attention Is All You Need" (post-norm layers, sinusoidal positions),
batch first, with greedy decoding over a key/value cache; ``impl="fastattn"`` or ``"torch"`` (layers.py)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .cache import KVCache
from .layers import Attention, FeedForward, SinusoidalEmbedding, check_impl, layer_norm


def _keep(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """nn.Transformer's key padding mask (N, S), True = padding, as an SDPA mask (N, 1, 1, S), True = keep."""
    return None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]


def _sdpa_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """nn.Transformer's (L, S) attention mask (bool True = not allowed, or float added) in SDPA's form."""
    if mask is None:
        return None
    return ~mask if mask.dtype == torch.bool else mask


def _additive(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))


def _merge(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """Both SDPA masks at once: bool masks intersect, otherwise they add as floats."""
    if a is None or b is None:
        return a if b is None else b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    return _additive(a) + _additive(b)


class EncoderLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward, dropout, impl):
        super().__init__()
        self.self_attn = Attention(d_model, nhead, dropout=dropout, impl=impl)
        self.ff = FeedForward(d_model, dim_feedforward, dropout)
        self.norm1, self.norm2 = layer_norm(d_model, impl), layer_norm(d_model, impl)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask):
        a = self.self_attn
        x = self.norm1(x + self.dropout(a.attend(a.q(x), *a.kv(x), mask=mask)))
        return self.norm2(x + self.dropout(self.ff(x)))


class DecoderLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward, dropout, impl):
        super().__init__()
        self.self_attn = Attention(d_model, nhead, dropout=dropout, impl=impl)
        self.cross_attn = Attention(d_model, nhead, dropout=dropout, impl=impl)
        self.ff = FeedForward(d_model, dim_feedforward, dropout)
        self.norm1, self.norm2, self.norm3 = (layer_norm(d_model, impl) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, memory_kv, self_mask, causal, memory_mask, cache=None, layer=0):
        a, c = self.self_attn, self.cross_attn
        k, v = a.kv(x)
        if cache is not None and a.impl == "fastattn" and self_mask is None:
            att = a.decode(a.q(x), k, v, cache, layer)  # writes the cache and attends in one call
        else:
            if cache is not None:
                k, v = cache.update(layer, k, v)
            att = a.attend(a.q(x), k, v, mask=self_mask, causal=causal)
        x = self.norm1(x + self.dropout(att))
        x = self.norm2(x + self.dropout(c.attend(c.q(x), *memory_kv, mask=memory_mask)))
        return self.norm3(x + self.dropout(self.ff(x)))


class Transformer(nn.Module):
    """Encoder-decoder Transformer over token ids.

    ``forward(src (N, S), tgt (N, T))`` returns logits ``(N, T, vocab_size)``; the decoder is causal by default
    (``tgt_mask`` adds to that). Masks follow ``nn.Transformer``: ``src_mask``/``tgt_mask`` (S, S)/(T, T), bool
    True = not allowed or float added; ``*_key_padding_mask`` (N, S)/(N, T), True = padding. ``generate()``
    decodes greedily, with a key/value cache by default. The same weights run on ``impl="fastattn"`` and
    ``impl="torch"`` (stock PyTorch SDPA, nn.LayerNorm, a positional-encoding table).
    """

    def __init__(self, d_model: int = 512, nhead: int = 8, num_layers: int = 6, *, vocab_size: int = 32000,
                 num_decoder_layers: int | None = None, dim_feedforward: int | None = None, dropout: float = 0.1,
                 max_len: int = 4096, impl: str = "fastattn"):  # fmt: skip
        super().__init__()
        self.impl = check_impl(impl)
        ff = dim_feedforward or 4 * d_model
        self.embed = SinusoidalEmbedding(vocab_size, d_model, max_len, dropout, impl)
        self.encoder = nn.ModuleList(EncoderLayer(d_model, nhead, ff, dropout, impl) for _ in range(num_layers))
        n_dec = num_layers if num_decoder_layers is None else num_decoder_layers
        self.decoder = nn.ModuleList(DecoderLayer(d_model, nhead, ff, dropout, impl) for _ in range(n_dec))
        self.generator = nn.Linear(d_model, vocab_size)
        self.d_model, self.nhead = d_model, nhead

    def encode(self, src: torch.Tensor, src_mask=None, src_key_padding_mask=None) -> torch.Tensor:
        x = self.embed(src)
        mask = _merge(_sdpa_mask(src_mask), _keep(src_key_padding_mask))
        for layer in self.encoder:
            x = layer(x, mask)
        return x

    def decode(self, tgt, memory, tgt_mask=None, tgt_key_padding_mask=None, memory_key_padding_mask=None,
               cache: KVCache | None = None, memory_kv: list | None = None) -> torch.Tensor:  # fmt: skip
        """Logits for ``tgt`` (N, T). With ``cache``, tgt holds the next positions after those cached."""
        offset = 0 if cache is None else cache.length
        x = self.embed(tgt, offset)
        extra = _merge(_sdpa_mask(tgt_mask), _keep(tgt_key_padding_mask))
        T = tgt.shape[1]
        # A causal rule alone runs as is_causal; with other masks it is spelled out (SDPA takes one or the other).
        causal = offset == 0 and T > 1
        if extra is not None and causal:
            extra, causal = _merge(extra, torch.ones(T, T, dtype=torch.bool, device=tgt.device).tril()), False
        mem_mask = _keep(memory_key_padding_mask)
        for i, layer in enumerate(self.decoder):
            kv = memory_kv[i] if memory_kv is not None else layer.cross_attn.kv(memory)
            x = layer(x, kv, extra, causal, mem_mask, cache, i)
        if cache is not None:
            cache.advance(T)
        return self.generator(x)

    def forward(self, src, tgt, src_mask=None, tgt_mask=None, src_key_padding_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None) -> torch.Tensor:  # fmt: skip
        memory = self.encode(src, src_mask, src_key_padding_mask)
        if memory_key_padding_mask is None:
            memory_key_padding_mask = src_key_padding_mask
        return self.decode(tgt, memory, tgt_mask, tgt_key_padding_mask, memory_key_padding_mask)

    @torch.no_grad()
    def generate(self, src: torch.Tensor, max_new_tokens: int, bos_id: int, eos_id: int | None = None,
                 src_key_padding_mask: torch.Tensor | None = None, use_cache: bool = True) -> torch.Tensor:  # fmt: skip
        """Greedy decoding: (N, <= max_new_tokens) token ids after ``bos_id``; a sequence that has produced
        ``eos_id`` keeps producing it. With ``use_cache`` each step runs the decoder on the new token only."""
        memory = self.encode(src, src_key_padding_mask=src_key_padding_mask)
        N = src.shape[0]
        ys = torch.full((N, 1), bos_id, dtype=torch.long, device=src.device)
        cache = memory_kv = None
        if use_cache:
            a = self.decoder[0].self_attn
            cache = KVCache(len(self.decoder), N, a.kv_heads, max_new_tokens, a.head_dim, memory.dtype, memory.device)
            memory_kv = [layer.cross_attn.kv(memory) for layer in self.decoder]
        done = torch.zeros(N, dtype=torch.bool, device=src.device)
        for _ in range(max_new_tokens):
            if use_cache:
                logits = self.decode(ys[:, -1:], memory, memory_key_padding_mask=src_key_padding_mask, cache=cache,
                                     memory_kv=memory_kv)  # fmt: skip
            else:
                logits = self.decode(ys, memory, memory_key_padding_mask=src_key_padding_mask)
            nxt = logits[:, -1].argmax(-1)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            ys = torch.cat([ys, nxt[:, None]], 1)
            if eos_id is not None and bool(done.all()):
                break
        return ys[:, 1:]
