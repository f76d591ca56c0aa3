"""Attention memory is O(L): on the kernels (Triton interpreter here; the PyTorch path, which builds the
score matrix, is not allowed) no tensor of L x S scores is ever allocated, forward or backward, and the bytes
allocated grow linearly with the sequence length.

What each test can see: the dispatch-mode test records every tensor torch allocates (the launchers' outputs and
buffers, autograd's), on the CPU and on a GPU alike, but not memory a kernel might take for itself on a GPU
(Triton's scratch allocator), which the interpreter does not model; the GPU test reads the CUDA allocator's peak,
which counts everything."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import DEVICE
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
    q, k, v = (torch.randn(1, 2, L, 16, device=DEVICE, requires_grad=True) for _ in range(3))
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


def _peak_bytes(L: int) -> int:
    q, k, v = (torch.randn(1, 8, L, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with fastattn.backend("triton"):
        out = fastattn.attention(q, k, v, causal=True)
        out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the CUDA allocator's peak needs a GPU (the test above runs here)")
def test_peak_gpu_memory_grows_linearly():
    """On a GPU, the allocator's peak (kernels' own memory included) over forward and backward: far below one
    L x S score matrix, and about twice for twice the length."""
    for L in (8192, 16384):  # tune first: the autotuner's trials (and do_bench's cache flush) are not the op's
        _peak_bytes(L)
    small, large = _peak_bytes(8192), _peak_bytes(16384)
    scores = 8 * 16384 * 16384 * 2  # one bf16 score matrix at the larger length
    assert large < scores / 8, f"peak {large} bytes; one score matrix is {scores}"
    assert large / small < 2.2, f"peak memory grew {large / small:.2f}x for 2x the length"
