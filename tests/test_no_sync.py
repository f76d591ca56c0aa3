"""No host reads of device data on the per-call paths of decoding and padded batches: the GPT decode step,
decode_attention (contiguous and paged cache), varlen_attention with its max lengths, and MultiheadAttention
with a key padding mask run under FakeTensorMode (where any read of a value raises) and compile with
torch.compile(fullgraph=True) to the eager result; bad values still fail, by a device-side assert (or, with
check=True, by the old ValueError)."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_close, randn
from torch._subclasses.fake_tensor import FakeTensorMode

import fastattn
from fastattn.models import GPT

BACKENDS = ["torch", "triton"]


def _decode_inputs(paged: bool, device=DEVICE, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    N, H, HK, S, E, page = 2, 4, 2, 48, 16, 16

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    q, k_new, v_new = rnd(N, H, 1, E), rnd(N, HK, 1, E), rnd(N, HK, 1, E)
    lengths = torch.tensor([5, 30], dtype=torch.int32, device=device)
    if not paged:
        return q, rnd(N, HK, S, E), rnd(N, HK, S, E), lengths, k_new, v_new, None
    table = torch.tensor([[3, 0, 5], [1, 4, 2]], dtype=torch.int32, device=device)
    return q, rnd(6, HK, page, E), rnd(6, HK, page, E), lengths, k_new, v_new, table


def _decode(q, kc, vc, lengths, k_new, v_new, table):
    return fastattn.decode_attention(q, kc, vc, lengths, k_new=k_new, v_new=v_new, block_table=table)


def _varlen(q, k, v, cu_q, cu_k):
    return fastattn.varlen_attention(q, k, v, cu_q, cu_k, 7, 9, causal=True)


def _varlen_inputs(device=DEVICE):
    cu_q = torch.tensor([0, 7, 10], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 9, 14], dtype=torch.int32, device=device)
    return (randn(10, 4, 16).to(device), randn(14, 2, 16).to(device), randn(14, 2, 16).to(device), cu_q, cu_k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_per_call_paths_read_no_device_value(backend):
    """Under FakeTensorMode a tensor has no values: a .tolist(), .item(), nonzero() or bool() of one raises.
    Every path below runs to its output shape."""
    # Real tensors the library cached (tables, constants) are taken in as fake ones; values are still unreadable.
    with FakeTensorMode(allow_non_fake_inputs=True), fastattn.backend(backend):
        for paged in (False, True):
            inputs = _decode_inputs(paged, device=torch.device("cpu"))
            assert _decode(*inputs).shape == (2, 4, 1, 16)
        assert _varlen(*_varlen_inputs(torch.device("cpu"))).shape == (10, 4, 16)
        mha = fastattn.MultiheadAttention(32, 4, batch_first=True)
        x = torch.randn(3, 11, 32)
        pad = torch.arange(11)[None, :] >= torch.tensor([11, 3, 0])[:, None]
        out, _ = mha(x, x, x, key_padding_mask=pad, need_weights=False)
        assert out.shape == (3, 11, 32)
        model = GPT(32, 4, 2, vocab_size=50, kv_heads=2, max_len=64)
        cache = model.new_cache(2, 16)
        model(torch.zeros(2, 5, dtype=torch.long), cache)  # prefill
        assert model(torch.zeros(2, 1, dtype=torch.long), cache).shape == (2, 1, 50)  # one decode step


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("paged,backend", [(False, "torch"), (True, "triton"), (False, "triton")],
                         ids=["contiguous-torch", "paged-triton", "contiguous-triton"])  # fmt: skip
def test_a_decode_step_compiles_whole(paged, backend):
    """The step (rotary off, new keys written into the cache in place) compiles with fullgraph=True and gives
    eager's output and eager's cache."""
    eager_in = _decode_inputs(paged)
    compiled_in = [t.clone() if isinstance(t, torch.Tensor) else t for t in eager_in]
    with fastattn.backend(backend):
        want = _decode(*eager_in)
        got = _compiled(_decode)(*compiled_in)
    assert_close(got, want.double(), torch.float32, None, "compiled decode")
    assert torch.equal(compiled_in[1], eager_in[1]) and torch.equal(compiled_in[2], eager_in[2])


@pytest.mark.parametrize("backend", ["triton"])  # the PyTorch path of both runs under FakeTensorMode above
def test_varlen_and_padded_multihead_attention_compile_whole(backend):
    inputs = _varlen_inputs()
    mha = fastattn.MultiheadAttention(32, 4, batch_first=True).to(DEVICE)
    x = randn(3, 11, 32)
    pad = (torch.arange(11)[None, :] >= torch.tensor([11, 3, 1])[:, None]).to(DEVICE)

    def padded(x, pad):
        return mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]

    with fastattn.backend(backend), torch.no_grad():
        assert_close(_compiled(_varlen)(*inputs), _varlen(*inputs).double(), torch.float32, None, "varlen")
        assert_close(_compiled(padded)(x, pad), padded(x, pad).double(), torch.float32, None, "padded MHA")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_values_fail_on_the_device_or_with_check(backend):
    """Out-of-range cache lengths and offsets: the clear ValueError where the values can be read for free (CPU
    tensors, eagerly) or with check=True; else a device-side assert, which a compiled call here shows (on the
    CPU it raises at once; on a GPU it is asynchronous and poisons the context)."""
    q, kc, vc, _, k_new, v_new, _ = _decode_inputs(False)
    bad = torch.tensor([5, 48], dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0, 8, 10], dtype=torch.int32, device=DEVICE)
    q2, k2, v2, _, cu_k = _varlen_inputs()
    with fastattn.backend(backend):
        with pytest.raises(ValueError, match=r"cache_seqlens must be in \[0, 47\]"):
            fastattn.decode_attention(q, kc, vc, bad, k_new=k_new, v_new=v_new, check=True)
        with pytest.raises(ValueError, match="longer than its max_seqlen"):
            fastattn.varlen_attention(q2, k2, v2, cu, cu_k, 7, 9, check=True)
        if DEVICE.type == "cpu":
            with pytest.raises(ValueError, match="cache_seqlens must be in"):
                fastattn.decode_attention(q, kc, vc, bad, k_new=k_new, v_new=v_new)
            with pytest.raises(RuntimeError, match="cache_seqlens must be in"):
                _compiled(_decode)(q, kc, vc, bad, k_new, v_new, None)
            with pytest.raises(RuntimeError, match="cu_seqlens_q must start at 0"):
                _compiled(_varlen)(q2, k2, v2, cu, cu_k)
