"""fastattn.kernel_log(): every launch inside it is recorded with its op, kernel and backend."""

from __future__ import annotations

import torch

import fastattn
from fastattn import kernel_log


def test_triton_attention_forward_and_backward_are_logged():
    q, k, v = (torch.randn(1, 2, 16, 16, requires_grad=True) for _ in range(3))
    with fastattn.backend("triton"), kernel_log() as log:
        fastattn.scaled_dot_product_attention(q, k, v).sum().backward()
    assert ("attention_fwd", "_attention_fwd_kernel", "triton") in log
    kernels = [e.kernel for e in log if e.op == "attention_bwd"]
    assert kernels == ["_attention_bwd_preprocess_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"]
    assert all(e.backend == "triton" for e in log)


def test_torch_paths_are_logged_and_logs_nest():
    x = torch.randn(4, 32)
    q = torch.randn(1, 2, 8, 16)
    with fastattn.backend("torch"), kernel_log() as outer:
        fastattn.layer_norm(x, (32,))
        with kernel_log() as inner:
            fastattn.scaled_dot_product_attention(q, q, q)
    assert inner == [("attention_fwd", "scaled_dot_product_attention", "torch")]
    assert outer == [("norm_fwd", "layer_norm", "torch"), *inner]
    assert outer[0].op == "norm_fwd" and outer[0].kernel == "layer_norm" and outer[0].backend == "torch"


def test_nothing_is_logged_outside_a_log():
    with kernel_log() as log:
        pass
    with fastattn.backend("triton"):
        fastattn.rms_norm(torch.randn(2, 16), (16,))
    assert log == []
