"""Backend selection: the context manager, FASTATTN_BACKEND, auto's choice, and one-time refusal warnings."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import DEVICE, randn

import fastattn
import fastattn._backend as backend_mod
import fastattn.ops.attention.launch as attention_launch


def test_context_manager_nests_and_restores(monkeypatch):
    monkeypatch.delenv("FASTATTN_BACKEND", raising=False)
    assert fastattn.current_backend() == "auto"
    with fastattn.backend("torch"):
        assert fastattn.current_backend() == "torch"
        with fastattn.backend("triton"):
            assert fastattn.current_backend() == "triton"
        assert fastattn.current_backend() == "torch"
    assert fastattn.current_backend() == "auto"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("FASTATTN_BACKEND", "torch")
    assert fastattn.current_backend() == "torch"
    monkeypatch.setenv("FASTATTN_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="FASTATTN_BACKEND"):
        fastattn.current_backend()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend"), fastattn.backend("tpu"):
        pass


def _count_kernel_calls(monkeypatch):
    calls = []
    real = attention_launch.attention_fwd

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_launch, "attention_fwd", counting)
    return calls


def test_auto_takes_triton_on_cuda_and_torch_on_cpu(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    q, k, v = (randn(1, 1, 8, 16) for _ in range(3))
    with fastattn.backend("auto"):
        fastattn.scaled_dot_product_attention(q, k, v)
    assert len(calls) == (1 if DEVICE.type == "cuda" else 0)
    with fastattn.backend("triton"):
        fastattn.scaled_dot_product_attention(q, k, v)
    assert len(calls) == (2 if DEVICE.type == "cuda" else 1)


def test_refused_case_warns_once_and_runs_torch(monkeypatch):
    monkeypatch.setattr(backend_mod, "_warned", set())
    calls = _count_kernel_calls(monkeypatch)
    q, k, v = (randn(1, 1, 8, 16, dtype=torch.float64) for _ in range(3))
    with fastattn.backend("triton"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out1 = fastattn.attention(q, k, v)
        fastattn.attention(q, k, v)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "float64" in msgs[0], msgs
    assert calls == []
    ref = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v
    torch.testing.assert_close(out1, ref)


def test_triton_without_cuda_or_interpreter_warns(monkeypatch):
    monkeypatch.setattr(backend_mod, "_warned", set())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = (torch.randn(1, 1, 8, 16) for _ in range(3))
    with fastattn.backend("triton"), pytest.warns(RuntimeWarning, match="TRITON_INTERPRET"):
        fastattn.attention(q, k, v)


def test_torch_backend_hands_the_drop_in_to_torchs_own_sdpa(monkeypatch):
    """Under "torch" (and "auto" on the CPU) the drop-in is torch's SDPA itself, called with the caller's
    arguments: comparing its numbers with torch's would compare torch with itself, so the dispatch is what is
    checked here."""
    from fastattn import _torch

    seen = []
    monkeypatch.setattr(_torch, "scaled_dot_product_attention", lambda *a, **k: seen.append((a, k)) or "torch")
    q, k, v = randn(1, 4, 8, 16), randn(1, 2, 9, 16), randn(1, 2, 9, 16)
    mask = torch.ones(8, 9, dtype=torch.bool, device=DEVICE)
    with fastattn.backend("torch"):
        got = fastattn.scaled_dot_product_attention(q, k, v, mask, 0.25, True, scale=0.5, enable_gqa=True)
    assert got == "torch" and len(seen) == 1
    args, kwargs = seen[0]
    assert all(a is b for a, b in zip(args[:4], (q, k, v, mask))) and args[4:] == (0.25, True)
    assert kwargs == {"scale": 0.5, "enable_gqa": True}
