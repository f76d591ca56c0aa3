"""User score and mask functions (fastattn.mods) in the Triton kernels (interpreter on CPU machines), against
their definitions applied in float64: each shipped example, with and without a block mask (equal bits), the
block mask's tile states and its skipping of empty tiles, and what is refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import DEVICE, assert_close, grad_out, randn

import fastattn
from fastattn.examples import masks

pytestmark = pytest.mark.skipif(
    DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="user functions run in the Triton kernels: on the CPU only under TRITON_INTERPRET=1",
)


def _formula(q, k, v, keep=None, score=None, causal=False):
    """float64 attention with a (N|1, H|1, L, S) bool ``keep`` and an elementwise ``score`` function."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if score is not None:
        s = score(s)
    L, S = q.shape[-2], k.shape[-2]
    if causal:
        keep = torch.ones(L, S, dtype=torch.bool).tril(S - L) & (True if keep is None else keep)
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


def _positions(L):
    return torch.arange(L)[:, None], torch.arange(L)[None, :]


def _case(name, N, L):
    """(MaskMod, float64 keep mask (N|1, 1, L, L)) of a shipped example."""
    i, j = _positions(L)
    if name == "document":  # three documents; boundaries inside and on tile edges
        doc = torch.tensor([0] * 128 + [1] * 75 + [2] * (L - 203), dtype=torch.int32)
        return fastattn.MaskMod(masks.document, aux=doc.to(DEVICE)), (doc[:, None] == doc[None, :])[None, None]
    if name == "prefix_lm":
        prefix = torch.tensor([5, 140][:N], dtype=torch.int32)
        keep = (j[None] < prefix[:, None, None]) | (j <= i)[None]
        return fastattn.MaskMod(masks.prefix_lm, aux=prefix.to(DEVICE)), keep[:, None]
    keep = (j <= i) & ((i - j < 64) | (j < 4))
    return fastattn.MaskMod(masks.sliding_window_with_sinks), keep[None, None]


@pytest.mark.parametrize(
    "name,dtype",
    [("document", torch.bfloat16), ("prefix_lm", torch.float32), ("sliding_window_with_sinks", torch.float32)],
    ids=["document-bf16", "prefix_lm-fp32", "sliding_window_with_sinks-fp32"],
)
def test_shipped_masks_match_their_definition(name, dtype):
    """Forward and gradients with a block mask (empty tiles skipped, full ones unmasked) against float64; for
    the document mask also the same bits as the mask alone. 256 positions: 2 x 2 tiles of the block mask."""
    N, L = (2 if name == "prefix_lm" else 1), 256
    mm, keep = _case(name, N, L)
    q, k, v = (randn(N, 1, L, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    dout = grad_out((N, 1, L, 16), dtype)
    bm = fastattn.create_block_mask(mm, N if name == "prefix_lm" else None, None, L, L, device=DEVICE)
    results = []
    # The bit-for-bit comparison with the mask alone on one example (the interpreter's time is the suite's).
    variants = (dict(block_mask=bm), dict(mask_mod=mm)) if name == "document" else (dict(block_mask=bm),)
    with fastattn.backend("triton"):
        for kw in variants:
            out = fastattn.attention(q, k, v, **kw)
            results.append((out, *torch.autograd.grad(out, (q, k, v), dout.to(DEVICE, dtype))))
    for a, b in zip(results[0], results[-1]):
        assert torch.equal(a, b)
    if name == "document":  # the bare function with the block mask: the block mask's aux tensor is taken
        with fastattn.backend("triton"):
            assert torch.equal(fastattn.attention(q, k, v, mask_mod=masks.document, block_mask=bm), results[0][0])
    ref_in = [x.detach().double().cpu().requires_grad_() for x in (q, k, v)]
    ref = _formula(*ref_in, keep)
    low_in = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    low = _formula(*low_in, keep.to(DEVICE))
    assert_close(results[0][0], ref, dtype, low.detach(), "out")
    want = torch.autograd.grad(ref, ref_in, dout)
    low_g = torch.autograd.grad(low, low_in, dout.to(DEVICE, dtype))
    for what, g, w, lg in zip(("dq", "dk", "dv"), results[0][1:], want, low_g):
        assert_close(g, w, dtype, lg, what)


def test_score_mod_tanh_softcap_equals_the_builtin_and_the_formula():
    q, k, v = ((randn(1, 2, 100, 32) * (8 if n == 0 else 1)).requires_grad_() for n in range(3))
    with fastattn.backend("triton"):
        out = fastattn.attention(q, k, v, causal=True, score_mod=masks.TANH_SOFTCAP)
        builtin = fastattn.attention(q, k, v, causal=True, softcap=20.0)
    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = _formula(*ref_in, score=lambda s: 20.0 * torch.tanh(s / 20.0), causal=True)
    assert_close(out, ref, torch.float32, None, "out")
    assert_close(builtin, ref, torch.float32, None, "builtin")
    dout = grad_out(ref.shape, torch.float32)
    got = torch.autograd.grad(out, (q, k, v), dout.float())
    for what, g, w in zip(("dq", "dk", "dv"), got, torch.autograd.grad(ref, ref_in, dout)):
        assert_close(g, w, torch.float32, None, what)


def test_block_mask_states():
    """Causal over 256 x 384: tiles below the diagonal band full, above empty, on it partial."""
    mm = fastattn.MaskMod(masks.causal_document, aux=torch.zeros(384, dtype=torch.int32, device=DEVICE))
    bm = fastattn.create_block_mask(mm, None, None, 256, 384, device=DEVICE)
    assert bm.states.shape == (1, 1, 2, 3) and bm.states.dtype == torch.int8
    assert bm.states[0, 0].tolist() == [[1, 0, 0], [2, 1, 0]]
    assert bm.sparsity() == pytest.approx(0.5)


def test_block_mask_skips_empty_tiles():
    """Values of the second document NaN: rows of the first stay finite only if no kernel visits the tiles
    holding the second document's keys (0 * NaN is NaN); without the block mask they are visited and NaN."""
    L = 256
    doc = torch.tensor([0] * 128 + [1] * 128, dtype=torch.int32, device=DEVICE)
    mm = fastattn.MaskMod(masks.document, aux=doc)
    bm = fastattn.create_block_mask(mm, None, None, L, L, device=DEVICE)
    q, k = randn(1, 1, L, 32), randn(1, 1, L, 32)
    v = randn(1, 1, L, 32)
    v[:, :, 128:] = float("nan")
    with fastattn.backend("triton"):
        skipped = fastattn.attention(q, k, v, block_mask=bm)
        visited = fastattn.attention(q, k, v, mask_mod=mm)
    assert torch.isfinite(skipped[:, :, :128]).all()
    assert torch.isnan(visited[:, :, :128]).any()
    ref = _formula(q.double(), k.double()[:, :, :128], v.double()[:, :, :128])  # the first document alone
    assert_close(skipped[:, :, :128], ref[:, :, :128], torch.float32)


def test_other_shapes_compile_nothing_new():
    """The kernel the JIT would build for a mask function is the same for other N, H, L, S (sizes that are
    multiples of 16 in both: Triton keys its kernels on ints being 1 or multiples of 16, as always)."""
    code = """
import torch
from fastattn.codegen import jit_source
from fastattn.examples import masks
from fastattn.mods import MaskMod
from fastattn.ops.attention import launch
from fastattn.ops.attention.args import dropout_arg, mods_arg, operand, rotary_arg, scores_arg, window_arg
from fastattn.ops.attention.configs import Config

def key(N, H, L):
    q = torch.empty(N, H, L, 64, dtype=torch.bfloat16)
    doc = torch.zeros(L, dtype=torch.int32)
    t = L // 128
    states = torch.zeros(1, 1, t, -(-t // 16) * 16, dtype=torch.int8)[..., :t]  # as create_block_mask pads rows
    bm = type("BM", (), dict(states=states, block=128))()
    mods = mods_arg(q, None, MaskMod(masks.document, aux=doc), bm)
    lse = torch.empty(N, H, L)
    args = [operand(q), operand(q), operand(q), operand(q), lse, H, L, L, 0.1, scores_arg(q, None, None, None, None),
            mods, window_arg(0, None, 0), dropout_arg(0.0, 0, 0), rotary_arg(q), launch._rows(None, q, H, L),
            launch._tile(q, q, q, Config(128, 64, 8, 2), False)]
    src = jit_source(launch._attention_fwd_kernel, args, {}, 90)
    return src.hash()

assert key(2, 16, 1024) == key(3, 32, 2048) == key(1, 48, 512)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_what_is_refused():
    q = randn(1, 2, 16, 32)
    with pytest.raises(TypeError, match="mask_mod must be a @triton.jit function"):
        fastattn.attention(q, q, q, mask_mod=lambda b, h, i, j: i >= j)
    with pytest.raises(TypeError, match=r"mask_mod must take \(b, h, q_idx, kv_idx, aux\)"):
        fastattn.MaskMod(masks.sliding_window_with_sinks, aux=torch.zeros(1))
    with pytest.raises(TypeError, match="score_mod"):
        fastattn.attention(q, q, q, score_mod=masks.tanh_softcap)
    doc = torch.zeros(16, dtype=torch.int32, device=DEVICE)
    bm = fastattn.create_block_mask(fastattn.MaskMod(masks.document, aux=doc), None, None, 16, 16, device=DEVICE)
    with pytest.raises(ValueError, match="another mask function"):
        fastattn.attention(q, q, q, mask_mod=masks.sliding_window_with_sinks, block_mask=bm)
    with pytest.raises(ValueError, match=r"block_mask is for \(B, H, L, S\) = \(1, 1, 16, 16\)"):
        fastattn.attention(randn(1, 2, 32, 32), randn(1, 2, 32, 32), randn(1, 2, 32, 32), block_mask=bm)
    with fastattn.backend("torch"), pytest.raises(ValueError, match="run in the Triton kernels"):
        fastattn.attention(q, q, q, mask_mod=masks.sliding_window_with_sinks)
