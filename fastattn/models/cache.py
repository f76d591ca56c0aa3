"""A key/value cache for autoregressive decoding: preallocated per-layer tensors, filled step by step."""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer, ``(N, H_kv, capacity, E)`` each, valid up to ``length``.

    A decoding step writes each layer's new keys/values with :meth:`update` (which returns everything cached
    for that layer so far, as views), then calls :meth:`advance` once with the number of new positions."""

    def __init__(self, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, dtype, device):
        shape = (batch, kv_heads, capacity, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.capacity = capacity
        self.length = 0
        # The same length on the device, per sequence, as decode_attention takes it; advanced in place, so a
        # captured decode step (CUDA graphs) reads the current value at every replay.
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KVCache: {end} positions exceed the capacity {self.capacity}")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n
        self.lengths += n
