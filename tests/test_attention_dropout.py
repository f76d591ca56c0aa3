"""Dropout inside the kernels: kept fraction, one mask shared by forward and backward, reproducibility."""

from __future__ import annotations

import torch
from helpers import DEVICE, assert_close, randn

import fastattn
from fastattn.ops.attention.reference import attention_reference
from fastattn.ops.attention.spec import MaskSpec

P = 0.3


def _keep_mask(q, k, seed, causal=False):
    """The kernel's keep-mask, read off by attending to an identity value matrix: out = P_dropped / (1 - p)."""
    S = k.shape[-2]
    eye = torch.eye(S, device=DEVICE).expand(k.shape[0], k.shape[1], S, S)
    torch.manual_seed(seed)
    with fastattn.backend("triton"):
        probs = fastattn.attention(q, k, eye, dropout_p=P, causal=causal)
    return probs != 0


def test_kept_fraction():
    q, k = randn(1, 2, 64, 16), randn(1, 2, 64, 16)
    keep = _keep_mask(q, k, seed=1)
    frac = keep.float().mean().item()
    assert abs(frac - (1 - P)) < 0.03, frac  # 8192 draws: 6 standard deviations
    assert not torch.equal(keep[0, 0], keep[0, 1]), "heads must draw different masks"


def test_forward_and_backward_use_the_same_mask():
    q, k = randn(1, 2, 48, 16, requires_grad=True), randn(1, 2, 40, 16, requires_grad=True)
    v = randn(1, 2, 40, 24, requires_grad=True)
    keep = _keep_mask(q.detach(), k.detach(), seed=7, causal=True).cpu()
    torch.manual_seed(7)
    with fastattn.backend("triton"):
        out = fastattn.attention(q, k, v, dropout_p=P, causal=True)
    ref_in = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    ref, _ = attention_reference(
        *ref_in, scale=16**-0.5, mask=MaskSpec(offset=40 - 48, right=0), dropout_p=P, keep=keep
    )
    assert_close(out, ref, torch.float32, None, "out")
    dout = torch.randn(ref.shape, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), dout.to(DEVICE, torch.float32))
    want = torch.autograd.grad(ref, ref_in, dout)
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, torch.float32, None, f"d{name}")


def test_reproducible_from_manual_seed():
    q, k, v = (randn(1, 2, 33, 16) for _ in range(3))
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        with fastattn.backend("triton"):
            outs.append(fastattn.scaled_dot_product_attention(q, k, v, dropout_p=P))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_torch_path_dropout_statistics():
    q, k = randn(1, 2, 64, 16), randn(1, 2, 64, 16)
    eye = torch.eye(64, device=DEVICE).expand(1, 2, 64, 64)
    with fastattn.backend("torch"):
        probs = fastattn.attention(q, k, eye, dropout_p=P)
    assert abs((probs != 0).float().mean().item() - (1 - P)) < 0.03
