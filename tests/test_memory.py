"""Attention memory is O(L): on the kernels (Triton interpreter here; the PyTorch path, which builds the
score matrix, is not allowed) no tensor of L x S scores is ever allocated, forward or backward, and the bytes
allocated grow linearly with the sequence length."""

from __future__ import annotations

import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fastattn


class _Allocations(TorchDispatchMode):
    """Records the element count of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.sizes += [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out


def _allocations(L: int) -> _Allocations:
    q, k, v = (torch.randn(1, 2, L, 16, requires_grad=True) for _ in range(3))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"fastattn\.")  # a step down to the PyTorch path: fail here
        with fastattn.backend("triton"), _Allocations() as record:
            out = fastattn.attention(q, k, v, causal=True)
            out.backward(torch.ones_like(out))
    return record


def test_no_score_matrix_and_linear_growth():
    small, large = _allocations(128), _allocations(256)
    for L, record in ((128, small), (256, large)):
        assert max(record.sizes) < L * L, f"a tensor of {max(record.sizes)} elements at L = {L}"
    growth = sum(large.sizes) / sum(small.sizes)
    assert growth < 2.2, f"allocated elements grew {growth:.2f}x for 2x the length"
