"""Deterministic backward under ``torch.use_deterministic_algorithms(True)``: the same bits run after run.

On the CPU the Triton interpreter runs a grid's programs one after another, so a run-twice test cannot catch an
order-dependent reduction here; what makes the Triton backward order-independent on a GPU is that it has no
atomics, which ``test_codegen`` checks in the compiled sm_90 kernels (atomics == 0). The backends whose
backward adds dQ with atomics (Gluon, CUDA) step down to the Triton backward in this mode, with the reason.
"""

from __future__ import annotations

import pytest
import torch
from helpers import randn

import fastattn
from fastattn import _backend


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def _grads(backend: str, dtype, **kw):
    q, k, v = (randn(1, 2, 40, 32, dtype=dtype, requires_grad=True) for _ in range(3))
    sinks = randn(2, requires_grad=True)
    dout = randn(1, 2, 40, 32, dtype=dtype)
    runs = []
    for _ in range(2):
        with fastattn.backend(backend):
            torch.manual_seed(5)  # the dropout seed
            out = fastattn.attention(q, k, v, sinks=sinks, **kw)
            runs.append(torch.autograd.grad(out, (q, k, v, sinks), dout))
    return runs


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_is_bitwise_repeatable(deterministic, backend, dtype):
    kw = dict(causal=True, softcap=20.0, dropout_p=0.2, window=(25, None))
    first, second = _grads(backend, dtype, **kw)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_atomic_backward_steps_down_to_triton(deterministic):
    """The Gluon backward's dQ uses atomics: in deterministic mode the Triton backward runs, with a one-time
    warning that says why, and the gradients are the Triton backward's bits."""
    q, k, v = (randn(1, 2, 64, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    _backend._warned.clear()
    with fastattn.backend("gluon"), fastattn.kernel_log() as log:
        out = fastattn.attention(q, k, v, causal=True)
        with pytest.warns(RuntimeWarning, match="not bit-reproducible"):
            grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert [e.backend for e in log if e.op == "attention_fwd"] == ["gluon"]
    assert {e.kernel for e in log if e.op == "attention_bwd"} == {
        "_attention_bwd_preprocess_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"
    }  # fmt: skip
    with fastattn.backend("gluon"):
        out2 = fastattn.attention(q, k, v, causal=True)
        again = torch.autograd.grad(out2, (q, k, v), torch.ones_like(out2))
    assert all(torch.equal(a, b) for a, b in zip(grads, again))
