"""Sinusoidal encoding and rotary embeddings against the formulas, written out here in float64."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import BACKENDS, DEVICE, assert_close, formula_rotary, grad_out, randn, torch_result, torch_rotary

import fastattn
from fastattn import _torch

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]  # fmt: skip


def formula_pe(positions: list[int], d: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)), element by element."""
    pe = torch.empty(len(positions), d, dtype=torch.float64)
    for r, pos in enumerate(positions):
        for c in range(d):
            angle = pos / 10000 ** ((c - c % 2) / d)
            pe[r, c] = math.sin(angle) if c % 2 == 0 else math.cos(angle)
    return pe


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,offset", [((1, 1), 0), ((7, 3), 5), ((2, 9, 13), 0), ((3, 40), 123)], ids=str)
def test_sinusoidal_matches_formula(shape, offset, dtype, backend):
    x = randn(*shape, dtype=dtype, requires_grad=True)
    with fastattn.backend(backend):
        y = fastattn.sinusoidal_encoding(x, offset=offset, scale=1.5)
    L, d = shape[-2], shape[-1]
    ref = x.detach().cpu().double() * 1.5 + formula_pe(list(range(offset, offset + L)), d)
    torch_out = (x.detach().cpu() * 1.5 + formula_pe(list(range(offset, offset + L)), d).to(dtype)).to(dtype)
    assert y.dtype == dtype
    assert_close(y, ref, dtype, torch_out, "out")
    dy = randn(*shape, dtype=dtype)
    (dx,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(dx, dy * 1.5)


def test_sinusoidal_exact_at_a_million_positions():
    """fp32 angles would be off by up to 0.06 rad at pos 1e6; the kernel's are exact to fp32 rounding."""
    x = torch.zeros(4, 64, device=DEVICE)
    with fastattn.backend("triton"):
        pe = fastattn.sinusoidal_encoding(x, offset=1_000_000)
    want = formula_pe(list(range(1_000_000, 1_000_004)), 64)
    assert (pe.cpu().double() - want).abs().max().item() < 1e-6


def test_sinusoidal_module():
    m = fastattn.SinusoidalPositionalEncoding(12, dropout=0.5)
    x = randn(2, 5, 12)
    m.eval()
    with fastattn.backend("triton"):
        torch.testing.assert_close(m(x, offset=3), fastattn.sinusoidal_encoding(x, offset=3))
        m.train()
        assert (m(x) == 0).any()
    with pytest.raises(ValueError, match="last dim"):
        m(randn(2, 5, 11))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "gptj"])
@pytest.mark.parametrize(
    "rot,pos_kind", [(None, "offset"), (8, "offset"), (None, "positions-L"), (6, "positions-NL")], ids=str
)
def test_rotary_matches_formula(rot, pos_kind, interleaved, dtype, backend):
    N, H, HK, L, E = 2, 4, 2, 11, 16
    q, k = randn(N, H, L, E, dtype=dtype, requires_grad=True), randn(N, HK, L, E, dtype=dtype, requires_grad=True)
    kw = {"interleaved": interleaved, "rotary_dim": rot}
    if pos_kind == "offset":
        kw["offset"] = 7
        pos = torch.arange(7, 7 + L)[None]
    elif pos_kind == "positions-L":
        pos = torch.randint(0, 5000, (L,))
        kw["positions"] = pos.to(DEVICE)
        pos = pos[None]
    else:
        pos = torch.randint(0, 5000, (N, L))
        kw["positions"] = pos.to(DEVICE)
    with fastattn.backend(backend):
        qr, kr = fastattn.apply_rotary(q, k, **kw)
    r = E if rot is None else rot

    def torch_own(x, pos):  # low precision only: fp32 keeps its fixed bound (torch's fp32 angles drift at 5000)
        return None if dtype == torch.float32 else torch_rotary(x.detach().cpu(), pos, r, interleaved)

    for name, got, src in (("q", qr, q), ("k", kr, k)):
        want = formula_rotary(src.detach().cpu(), pos, r, interleaved)
        assert_close(got, want, dtype, torch_own(src, pos), name)
    # The rotation is orthogonal: the gradient is the opposite rotation of the incoming one.
    dq = randn(N, H, L, E, dtype=dtype)
    (g,) = torch.autograd.grad(qr, q, dq)
    want = formula_rotary(dq.cpu(), -pos, r, interleaved)
    assert_close(g, want, dtype, torch_own(dq, -pos), "dq")


def test_rotary_module_and_errors():
    q, k = randn(1, 2, 5, 8), randn(1, 2, 5, 8)
    m = fastattn.RotaryEmbedding(8, interleaved=True)
    with fastattn.backend("triton"):
        a = m(q, k, offset=2)
        b = fastattn.apply_rotary(q, k, offset=2, interleaved=True)
    torch.testing.assert_close(a, b)
    for kw, words in [
        ({"rotary_dim": 7}, "rotary_dim"),
        ({"rotary_dim": 10}, "rotary_dim"),
        ({"positions": torch.zeros(4, dtype=torch.long, device=DEVICE)}, "positions"),
        ({"positions": torch.zeros(5, device=DEVICE)}, "positions"),
        ({"offset": -1}, "offset"),
    ]:
        with pytest.raises(ValueError, match=words):
            fastattn.apply_rotary(q, k, **kw)
    with pytest.raises(ValueError, match="share"):
        fastattn.apply_rotary(q, randn(1, 2, 6, 8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "L,S,interleaved,dim,dtype",
    [
        (24, 24, False, 32, torch.float32),
        (24, 24, True, 16, torch.bfloat16),
        (10, 30, False, 32, torch.float32),
        (33, 17, True, 24, torch.float32),
    ],
    ids=["neox-square", "gptj-partial-bf16", "neox-kvcache-L<S", "gptj-L>S"],
)
def test_rotary_fused_into_attention(L, S, interleaved, dim, dtype, backend):
    """attention(..., rotary=) equals apply_rotary followed by attention (keys at offset + j, queries at
    offset + i + S - L), forward and backward, with GQA."""
    q = randn(2, 4, L, 32, dtype=dtype, requires_grad=True)
    k, v = (randn(2, 2, S, 32, dtype=dtype, requires_grad=True) for _ in range(2))
    rope = fastattn.RotaryEmbedding(dim, interleaved=interleaved)
    with fastattn.backend(backend):
        out = fastattn.attention(q, k, v, causal=True, rotary=rope, rotary_offset=5)
    leaves = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    pos_q, pos_k = torch.arange(5 + S - L, 5 + S)[None], torch.arange(5, 5 + S)[None]
    keep = torch.ones(L, S, dtype=torch.bool).tril(S - L)  # bottom-right causal
    qr, kr = formula_rotary(leaves[0], pos_q, dim, interleaved), formula_rotary(leaves[1], pos_k, dim, interleaved)
    ref = _torch.scaled_dot_product_attention(qr, kr, leaves[2], keep, enable_gqa=True)
    dout = grad_out(ref.shape, dtype)
    torch_out, torch_grads = torch_result(
        lambda q, k, v: _torch.scaled_dot_product_attention(
            torch_rotary(q, pos_q, dim, interleaved), torch_rotary(k, pos_k, dim, interleaved), v, keep,
            enable_gqa=True,
        ),
        [x.cpu() for x in (q, k, v)],
        dout,
    )  # fmt: skip
    assert_close(out, ref, dtype, torch_out, "out")
    got = torch.autograd.grad(out, (q, k, v), dout.to(DEVICE, dtype))
    want = torch.autograd.grad(ref, leaves, dout)
    for name, g, w, t in zip("qkv", got, want, torch_grads):
        assert_close(g, w, dtype, t, f"d{name}")


def test_rotary_fused_rejects_bad_specs():
    q, k, v = (randn(1, 2, 8, 16) for _ in range(3))
    with pytest.raises(ValueError, match="RotaryEmbedding"):
        fastattn.attention(q, k, v, rotary=32)
    with pytest.raises(ValueError, match="rotary dim"):
        fastattn.attention(q, k, v, rotary=fastattn.RotaryEmbedding(32))
    with pytest.raises(ValueError, match="rotary_offset"):
        fastattn.attention(q, k, v, rotary=fastattn.RotaryEmbedding(16), rotary_offset=-2)
