"""Bad input: a clear error before any kernel runs, naming the argument; the drop-in raises torch's class."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, randn

import fastattn
import fastattn.ops.attention.launch as attention_launch


@pytest.fixture(autouse=True)
def no_kernel(monkeypatch):
    """Any launch fails the test: the errors below must come from the checks, before a kernel."""

    def launched(*args, **kwargs):
        raise AssertionError("a kernel ran before the input was rejected")

    monkeypatch.setattr(attention_launch, "attention_fwd", launched)


def _qkv(L=5, S=6, E=8, H=2, dtype=torch.float32):
    return randn(1, H, L, E, dtype=dtype), randn(1, H, S, E, dtype=dtype), randn(1, H, S, E, dtype=dtype)


def _sdpa_cases():
    q, k, v = _qkv()
    mask_ok = torch.ones(5, 6, dtype=torch.bool, device=DEVICE)
    return {
        "dtype-mismatch": ((q, k.double(), v), {}, "dtype"),
        "int-dtype": ((q.long(), k.long(), v.long()), {}, "floating"),
        "rank-1": ((q[0, 0, 0], k[0, 0, 0], v[0, 0, 0]), {}, "2-D"),
        "head-dim-mismatch": ((randn(1, 2, 5, 16), k, v), {}, "head dim"),
        "heads-without-gqa": ((randn(1, 4, 5, 8), k, v), {}, "enable_gqa"),
        "gqa-not-divisible": ((randn(1, 3, 5, 8), k, v), {"enable_gqa": True}, "divide"),
        "mask-int": ((q, k, v, mask_ok.int()), {}, "attn_mask dtype"),
        "mask-fp16-for-fp32": ((q, k, v, mask_ok.half()), {}, "attn_mask dtype"),
        "mask-not-broadcast": ((q, k, v, mask_ok[:, :4]), {}, "broadcast"),
        "mask-wrong-batch": ((q, k, v, mask_ok.expand(3, 2, 5, 6)), {}, "broadcast"),
        "mask-1d": ((q, k, v, mask_ok[0]), {}, "2-D"),
        "dropout-above-1": ((q, k, v), {"dropout_p": 1.5}, "dropout_p"),
        "dropout-negative": ((q, k, v), {"dropout_p": -0.1}, "dropout_p"),
        "query-not-tensor": (([1.0], k, v), {}, "query"),
        "mask-not-tensor": ((q, k, v, [1.0]), {}, "attn_mask"),
        "scale-positional": ((q, k, v, None, 0.0, False, 0.5), {}, "positional"),
        "scale-string": ((q, k, v), {"scale": "x"}, "scale"),
    }


@pytest.mark.parametrize("case", list(_sdpa_cases()))
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_sdpa_raises_torch_class(case, backend):
    args, kwargs, words = _sdpa_cases()[case]
    cpu_args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises(Exception) as torch_exc:
        F.scaled_dot_product_attention(*cpu_args, **kwargs)
    with fastattn.backend(backend), pytest.raises(torch_exc.type) as ours:
        fastattn.scaled_dot_product_attention(*args, **kwargs)
    assert words in str(ours.value), str(ours.value)


def test_sdpa_key_value_length_mismatch():
    q, k, _ = _qkv()
    with pytest.raises(RuntimeError, match=r"key and value must have the same length.*\(1, 2, 6, 8\)"):
        fastattn.scaled_dot_product_attention(q, k, randn(1, 2, 7, 8))


def test_sdpa_device_mismatch():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="one device"):
        fastattn.scaled_dot_product_attention(q, k.to("meta"), v)


def test_sdpa_shapes_named_in_message():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match=r"query \(1, 2, 5, 8\).*key \(1, 2, 6, 8\)"):
        fastattn.scaled_dot_product_attention(q, k, v.double())
    with pytest.raises(RuntimeError, match=r"attn_mask of shape \(5, 4\).*\(1, 2, 5, 6\)"):
        fastattn.scaled_dot_product_attention(q, k, v, torch.ones(5, 4, dtype=torch.bool, device=DEVICE))


def _native_cases():
    q, k, v = _qkv()
    return {
        "3d": ((q[0], k[0], v[0]), {}, "4-D"),
        "batch-mismatch": ((q, randn(2, 2, 6, 8), randn(2, 2, 6, 8)), {}, "batch"),
        "heads-not-dividing": ((randn(1, 3, 5, 8), k, v), {}, "heads"),
        "kv-heads-differ": ((q, k, randn(1, 1, 6, 8)), {}, "heads"),
        "empty": ((randn(1, 2, 0, 8), k, v), {}, "empty"),
        "dtype": ((q.half(), k, v), {}, "dtype"),
        "head-dim": ((randn(1, 2, 5, 4), k, v), {}, "head dim"),
        "dropout-1": ((q, k, v), {"dropout_p": 1.0}, "dropout_p"),
        "window-not-pair": ((q, k, v), {"window": 3}, "window"),
        "window-negative": ((q, k, v), {"window": (-1, 2)}, "window left"),
        "bias-bool": ((q, k, v), {"bias": torch.ones(5, 6, dtype=torch.bool, device=DEVICE)}, "bias dtype"),
        "bias-not-broadcast": ((q, k, v), {"bias": randn(5, 7)}, "broadcast"),
    }


@pytest.mark.parametrize("case", list(_native_cases()))
def test_native_raises_value_error(case):
    args, kwargs, words = _native_cases()[case]
    with fastattn.backend("triton"), pytest.raises(ValueError, match=words):
        fastattn.attention(*args, **kwargs)


def test_native_positional_options_rejected():
    q, k, v = _qkv()
    with pytest.raises(TypeError):
        fastattn.attention(q, k, v, True)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the torch-accepted oddities below are checked on the CPU")
def test_sdpa_accepts_what_torch_accepts():
    """Inputs torch's SDPA takes (empty tensors, p = 1, broadcast batch) run through torch and agree."""
    q, k, v = _qkv()
    for args, kwargs in [
        ((randn(1, 2, 0, 8), k, v), {}),
        ((q, randn(1, 2, 0, 8), randn(1, 2, 0, 8)), {}),
        ((randn(3, 2, 5, 8), k, v), {}),
    ]:
        torch.testing.assert_close(
            fastattn.scaled_dot_product_attention(*args, **kwargs), F.scaled_dot_product_attention(*args, **kwargs)
        )
