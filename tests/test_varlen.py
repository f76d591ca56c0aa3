"""Packed variable-length attention against per-sequence float64 references (lengths 0 and 1 included), on the
Triton kernels (interpreter here) and the PyTorch path; clear errors for bad cu_seqlens; unpad / pad."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_close, reference

import fastattn


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


CASES = [
    pytest.param([5, 0, 17, 1], [9, 3, 17, 0], {}, id="full-with-empty"),
    pytest.param([7, 1, 20], [7, 30, 20], {"causal": True}, id="causal"),
    pytest.param([12, 33], [40, 33], {"window": (5, 2)}, id="window"),
]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("len_q,len_k,kw", CASES)
def test_varlen_equals_attention_per_sequence(len_q, len_k, kw, backend):
    gen = torch.Generator().manual_seed(sum(len_q))
    H, HK, E = 4, 2, 16
    tq, tk = sum(len_q), sum(len_k)
    q = torch.randn(tq, H, E, generator=gen).to(DEVICE).requires_grad_()
    k = torch.randn(tk, HK, E, generator=gen).to(DEVICE).requires_grad_()
    v = torch.randn(tk, HK, 24, generator=gen).to(DEVICE).requires_grad_()
    with fastattn.backend(backend):
        out, lse = fastattn.varlen_attention(q, k, v, _cu(len_q), _cu(len_k), max(len_q), max(len_k),
                                             return_lse=True, **kw)  # fmt: skip
    assert out.shape == (tq, H, 24) and lse.shape == (H, tq)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), dout.to(DEVICE, torch.float32))
    left, right = kw.get("window", (None, None))
    if kw.get("causal"):
        right = 0
    ref_in = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    cq, ck = _cu(len_q).tolist(), _cu(len_k).tolist()
    refs, ref_lses = [], []
    for b in range(len(len_q)):
        if len_q[b] == 0:
            continue
        qb, kb, vb = (t[lo:hi].transpose(0, 1)[None] for t, lo, hi in
                      zip(ref_in, (cq[b], ck[b], ck[b]), (cq[b + 1], ck[b + 1], ck[b + 1])))  # fmt: skip
        if len_k[b] == 0:
            refs.append(torch.zeros(len_q[b], H, 24, dtype=torch.float64) + 0 * qb.sum())
            ref_lses.append(torch.full((H, len_q[b]), float("-inf"), dtype=torch.float64))
            continue
        o, l_ = reference(qb, kb, vb, offset=len_k[b] - len_q[b], left=left, right=right)
        refs.append(o[0].transpose(0, 1))
        ref_lses.append(l_[0].double())
    ref = torch.cat(refs, 0)
    assert_close(out, ref, torch.float32, None, "out")
    ref_lse = torch.cat(ref_lses, 1)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert (lse.cpu()[finite].double() - ref_lse[finite]).abs().max() < 1e-4
    want = torch.autograd.grad(ref, ref_in, dout)
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, torch.float32, None, f"d{name}")


def test_bad_cu_seqlens_are_refused_before_any_kernel():
    q = torch.randn(10, 2, 16, device=DEVICE)
    good = _cu([4, 6])
    bad = [
        (torch.tensor([0, 6, 4, 10], dtype=torch.int32, device=DEVICE), "never decrease"),
        (good.long(), "int32"),
        (torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE), "total length 10"),
        (torch.tensor([1, 4, 10], dtype=torch.int32, device=DEVICE), "start at 0"),
    ]
    for cu, message in bad:  # the values with check=True (by default a device-side assert: tests/test_no_sync)
        with pytest.raises(ValueError, match=message):
            fastattn.varlen_attention(q, q, q, cu, cu, 10, 10, check=True)
    with pytest.raises(ValueError, match="same number of sequences"):
        fastattn.varlen_attention(q, q, q, good, _cu([10]), 10, 10)
    with pytest.raises(ValueError, match="longer than its max_seqlen"):
        fastattn.varlen_attention(q, q, q, good, good, 5, 10, check=True)
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        fastattn.varlen_attention(q, q, q, [0, 4, 10], good, 10, 10)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_unpad_varlen_pad_equals_padded_attention(backend):
    gen = torch.Generator().manual_seed(3)
    N, L, H, E = 3, 13, 2, 16
    x = torch.randn(N, L, 3, H, E, generator=gen).to(DEVICE)
    lengths = torch.tensor([13, 6, 1])
    padding = (torch.arange(L)[None, :] >= lengths[:, None]).to(DEVICE)
    packed, indices, cu, longest = fastattn.unpad(x, padding)
    assert packed.shape == (int(lengths.sum()), 3, H, E) and cu.tolist() == [0, 13, 19, 20] and longest == 13
    with fastattn.backend(backend):
        out = fastattn.varlen_attention(packed[:, 0], packed[:, 1], packed[:, 2], cu, cu, longest, longest)
    padded = fastattn.pad(out, indices, N, L)
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=~padding[:, None, None, :]
    ).transpose(1, 2)
    keep = ~padding
    assert_close(padded[keep], ref[keep], torch.float32, None, "valid rows")
    assert (padded[padding] == 0).all()


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_packs_keys_when_padding_dominates(batch_first, monkeypatch):
    """fastattn.MultiheadAttention with a key padding mask that leaves most of the batch empty runs on packed
    keys and still equals torch's module, outputs and gradients; a sequence with no keys included."""
    import fastattn.multihead_attention as mha_module

    packed = []
    original = mha_module.padded_key_attention

    def counting(*args):
        out = original(*args)
        packed.append(out is not None)
        return out

    monkeypatch.setattr(mha_module, "padded_key_attention", counting)
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first).to(DEVICE)
    ours = fastattn.MultiheadAttention(32, 4, batch_first=batch_first).to(DEVICE)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 11, 32, device=DEVICE)
    x = x if batch_first else x.transpose(0, 1)
    pad = torch.arange(11, device=DEVICE)[None, :] >= torch.tensor([11, 3, 0], device=DEVICE)[:, None]
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with fastattn.backend("triton"):
        out, _ = ours(xa, xa, xa, key_padding_mask=pad, need_weights=False)
    want, _ = ref(xb, xb, xb, key_padding_mask=pad, need_weights=False)
    assert packed == [True]
    b = 2 if batch_first else 1  # torch's module gives NaN rows for a sequence without keys; we give 0 there
    keep = torch.ones_like(out, dtype=torch.bool)
    keep.select(0 if batch_first else 1, b).fill_(False)
    assert_close(out[keep], want[keep].double(), torch.float32, None, "out")
    dy = torch.randn_like(want).masked_fill(~keep, 0.0)
    with fastattn.backend("triton"):
        (g,) = torch.autograd.grad(out, xa, dy)
    (gw,) = torch.autograd.grad(want, xb, dy)
    assert_close(g, gw.double(), torch.float32, None, "dx")


def test_unpad_refuses_a_mask_of_the_wrong_shape_or_dtype():
    x = torch.zeros(2, 5, 4, device=DEVICE)
    with pytest.raises(ValueError, match="key_padding_mask must be bool of shape"):
        fastattn.unpad(x, torch.zeros(2, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="key_padding_mask must be bool"):
        fastattn.unpad(x, torch.zeros(2, 5, device=DEVICE))


def test_varlen_dropout_one_mask_for_forward_and_backward():
    """Dropout in the VARLEN mode: the kept fraction is 1 - p, and the backward uses the forward's mask (read
    off through an identity value matrix per sequence, then checked against a float64 reference with that mask,
    outputs and gradients)."""
    from fastattn.ops.attention.reference import attention_reference
    from fastattn.ops.attention.spec import MaskSpec

    p, H, E, lens = 0.3, 2, 16, [37, 1, 50]
    gen = torch.Generator().manual_seed(11)
    total, longest, cu = sum(lens), max(lens), _cu(lens)
    q, k = (torch.randn(total, H, E, generator=gen).to(DEVICE) for _ in range(2))
    v = torch.randn(total, H, 24, generator=gen).to(DEVICE)
    starts = [0, *torch.tensor(lens).cumsum(0).tolist()]
    eye = torch.zeros(total, H, longest, device=DEVICE)
    for b, n in enumerate(lens):
        eye[starts[b] : starts[b] + n] = torch.eye(n, longest, device=DEVICE)[:, None, :]
    with fastattn.backend("triton"):
        torch.manual_seed(5)
        probs = fastattn.varlen_attention(q, k, eye, cu, cu, longest, longest, causal=True, dropout_p=p)
        torch.manual_seed(5)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fastattn.varlen_attention(*leaves, cu, cu, longest, longest, causal=True, dropout_p=p)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, dout.to(DEVICE, torch.float32))
    ref_in = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    refs, kept, visible = [], 0, 0
    for b, n in enumerate(lens):
        rows = slice(starts[b], starts[b] + n)
        keep = (probs[rows, :, :n] != 0).cpu().permute(1, 0, 2)[None]  # (1, H, n, n)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        kept, visible = kept + int(keep.sum()), visible + H * int(causal.sum())
        qb, kb, vb = (t[rows].transpose(0, 1)[None] for t in ref_in)
        o, _ = attention_reference(qb, kb, vb, scale=E**-0.5, mask=MaskSpec(0, None, 0), dropout_p=p, keep=keep)
        refs.append(o[0].transpose(0, 1))
    assert abs(kept / visible - (1 - p)) < 0.05, kept / visible
    ref = torch.cat(refs)
    assert_close(out, ref, torch.float32, None, "out")
    for name, g, w in zip("qkv", got, torch.autograd.grad(ref, ref_in, dout)):
        assert_close(g, w, torch.float32, None, f"d{name}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_loose_max_seqlen_is_a_bound_not_a_shape(backend):
    """max_seqlen above every length (a model's context size, far above the batch's totals) and a numpy
    integer: the same result as the tight bound."""
    import numpy as np

    q, k, v = (torch.randn(10, 2, 16, device=DEVICE) for _ in range(3))
    cu = _cu([4, 6])
    with fastattn.backend(backend):
        tight = fastattn.varlen_attention(q, k, v, cu, cu, 6, 6, causal=True)
        loose = fastattn.varlen_attention(q, k, v, cu, cu, 4096, np.int64(4096), causal=True)
    assert_close(loose, tight.double(), torch.float32, None, "the loose bound's result")
