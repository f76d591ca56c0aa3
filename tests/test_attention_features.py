"""Logit soft-capping and learnable sinks, on the Triton kernels (interpreter on CPU machines) and the PyTorch
path, against references written here from the formulas in float64: output, LSE and the gradients of q, k, v
and the sinks; with causal, windows, GQA, ragged lengths, varlen and decode."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_close, grad_out, randn

import fastattn
from fastattn import _backend

PATHS = ["triton", "torch"]


def formula(q, k, v, *, offset=0, left=None, right=None, scale=None, softcap=None, sinks=None):
    """``(out, lse)`` from the definitions, in q's dtype (float64 for the reference): scores s = q k^T * scale,
    capped to c tanh(s / c), masked to ``i + offset - left <= j <= i + offset + right``, a softmax over the
    row's scores and its sink logit, the sink's share dropped (it has no value)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    L, S = q.shape[-2], k.shape[-2]
    i, j = torch.arange(L, device=q.device)[:, None] + offset, torch.arange(S, device=q.device)[None, :]
    keep = torch.ones(L, S, dtype=torch.bool, device=q.device)
    if left is not None:
        keep &= j >= i - left
    if right is not None:
        keep &= j <= i + right
    s = s.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype).reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)], -1)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])
    if sinks is not None:
        p = p[..., :-1]
    return p @ v, lse


def _check_lse(lse: torch.Tensor, ref: torch.Tensor) -> None:
    """-inf exactly where the reference has it (rows with no key and no sink), fp32 accuracy elsewhere."""
    lse, ref = lse.cpu(), ref.cpu()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref))
    finite = torch.isfinite(ref)
    assert_close(lse[finite], ref[finite], torch.float32, None, "lse")


def _leaves(*xs, dtype=None):
    return [None if x is None else x.detach().to(dtype or x.dtype).requires_grad_(x.requires_grad) for x in xs]


def _check(q, k, v, sinks=None, *, path, causal=False, window=None, softcap=None, scale=None):
    """fastattn.attention against the float64 formula; in fp16/bf16 within the suite's rule against the same
    formula run in that dtype by PyTorch ops (what eager code, e.g. transformers' eager gpt-oss, computes)."""
    dtype = q.dtype
    with fastattn.backend(path):
        out, lse = fastattn.attention(q, k, v, causal=causal, window=window, softcap=softcap, sinks=sinks,
                                      scale=scale, return_lse=True)  # fmt: skip
    L, S = q.shape[2], k.shape[2]
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0 if right is None else min(right, 0)
    spec = dict(offset=S - L, left=left, right=right, scale=scale, softcap=softcap)
    ref_in = _leaves(q, k, v, sinks, dtype=torch.float64)
    ref, ref_lse = formula(*[x.cpu() if x is not None else None for x in ref_in[:3]],
                           sinks=None if sinks is None else ref_in[3].cpu(), **spec)  # fmt: skip
    low_in = _leaves(q, k, v, sinks)
    low, _ = formula(*low_in[:3], sinks=low_in[3], **spec)
    dout = grad_out(ref.shape, dtype)
    assert_close(out, ref, dtype, low.detach(), "out")
    _check_lse(lse, ref_lse)
    wrt = [x for x in (q, k, v, sinks) if x is not None and x.requires_grad]
    got = torch.autograd.grad(out, wrt, dout.to(DEVICE, dtype))
    want = torch.autograd.grad(ref, [x for x in ref_in if x is not None and x.requires_grad], dout)
    low_g = torch.autograd.grad(low, [x for x in low_in if x is not None and x.requires_grad], dout.to(DEVICE, dtype))
    for name, x, g, w, lg in zip(("dq", "dk", "dv", "dsinks"), wrt, got, want, low_g):
        assert g.dtype == x.dtype and g.shape == w.shape
        assert_close(g, w, dtype, lg, name)
    return out, lse


_SHAPES = {  # (L, S, H, H_kv, E, causal, window)
    "gqa-ragged": (33, 47, 4, 2, 64, False, None),
    "causal": (64, 64, 2, 2, 64, True, None),
    "window-mqa-L<S": (40, 90, 4, 1, 32, True, (17, None)),
    "causal-L>S-empty-rows": (70, 20, 2, 2, 64, True, None),
}
# Every shape in fp32, bf16 and fp16 on two each (the interpreter's time is the suite's budget).
_LOW = {"bf16": ("gqa-ragged", "causal-L>S-empty-rows"), "fp16": ("causal", "window-mqa-L<S")}
CASES = [
    pytest.param(dt, *shape, id=f"{name}-{dt_id}")
    for name, shape in _SHAPES.items()
    for dt, dt_id in ((torch.float32, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16"))
    if dt_id == "fp32" or name in _LOW[dt_id]
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,L,S,H,HK,E,causal,window", CASES)
def test_softcap(path, dtype, L, S, H, HK, E, causal, window):
    q = (randn(1, H, L, E, dtype=dtype) * 4).requires_grad_()  # scores of tens: the cap bends them
    k, v = randn(1, HK, S, E, dtype=dtype, requires_grad=True), randn(1, HK, S, E, dtype=dtype, requires_grad=True)
    _check(q, k, v, path=path, causal=causal, window=window, softcap=5.0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype,L,S,H,HK,E,causal,window", CASES)
def test_sinks(path, dtype, L, S, H, HK, E, causal, window):
    q, k, v = (randn(1, h, n, E, dtype=dtype, requires_grad=True) for h, n in ((H, L), (HK, S), (HK, S)))
    sinks = (randn(H) * 2).requires_grad_()  # float32 parameters, as models keep them
    _, lse = _check(q, k, v, sinks, path=path, causal=causal, window=window)
    if L > S and causal:  # rows before the first key see only their sink: out 0, lse = the sink
        want = sinks.detach().reshape(1, H, 1).expand(1, H, L - S)
        torch.testing.assert_close(lse[:, :, : L - S].cpu(), want, rtol=1e-6, atol=1e-6)  # log2 round trip


@pytest.mark.parametrize("path", PATHS)
def test_sinks_with_softcap_and_bf16_sinks(path):
    q, k, v = (randn(1, 4, 50, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    sinks = randn(4, dtype=torch.bfloat16, requires_grad=True)
    _check(q, k, v, sinks, path=path, causal=True, window=(8, 0), softcap=3.0)


def test_the_checks_bite():
    """A kernel result compared against the formula without its sink (or cap) fails: the tests above compare
    quantities that these features change."""
    q, k, v = (randn(1, 2, 24, 32) for _ in range(3))
    sinks = torch.zeros(2)  # e^0 = 1 joins every row's sum: a small but real change
    with fastattn.backend("triton"):
        out = fastattn.attention(q, k, v, sinks=sinks)
        capped = fastattn.attention(q * 4, k, v, softcap=5.0)
    plain, _ = formula(q.double(), k.double(), v.double())
    uncapped, _ = formula(q.double() * 4, k.double(), v.double())
    with pytest.raises(AssertionError):
        assert_close(out, plain, torch.float32)
    with pytest.raises(AssertionError):
        assert_close(capped, uncapped, torch.float32)


@pytest.mark.parametrize("path", PATHS)
def test_sinks_with_dropout_rescale_the_same_kept_scores(path):
    """With dropout the kept scores are the same with or without sinks (same seed); the sink only adds to each
    row's normalizer, so out_with = out_without * exp(lse_without - lse_with) row by row."""
    q, k, v = (randn(2, 2, 40, 32) for _ in range(3))
    sinks = randn(2)
    with fastattn.backend(path):
        torch.manual_seed(7)
        out, lse = fastattn.attention(q, k, v, causal=True, dropout_p=0.3, sinks=sinks, return_lse=True)
        torch.manual_seed(7)
        out0, lse0 = fastattn.attention(q, k, v, causal=True, dropout_p=0.3, return_lse=True)
    assert_close(out, out0 * torch.exp(lse0 - lse)[..., None], torch.float32)
    assert_close(lse, torch.logaddexp(lse0, sinks.reshape(1, 2, 1)), torch.float32)


@pytest.mark.parametrize("path", PATHS)
def test_varlen_sinks_and_softcap(path):
    """Packed sequences (one empty of keys) equal the formula sequence by sequence, forward and backward."""
    lens_q, lens_k = [5, 17, 3], [9, 17, 0]
    H, HK, E = 4, 2, 32
    q = randn(sum(lens_q), H, E, requires_grad=True)
    k, v = randn(sum(lens_k), HK, E, requires_grad=True), randn(sum(lens_k), HK, E, requires_grad=True)
    sinks = randn(H, requires_grad=True)
    cu = lambda lens: torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)  # noqa: E731
    with fastattn.backend(path):
        out, lse = fastattn.varlen_attention(q, k, v, cu(lens_q), cu(lens_k), 17, 17, causal=True, softcap=4.0,
                                             sinks=sinks, return_lse=True)  # fmt: skip
    dout = grad_out(out.shape, torch.float32)
    got = torch.autograd.grad(out, (q, k, v, sinks), dout.float())
    ins = _leaves(q, k, v, sinks, dtype=torch.float64)
    outs, lses, r0, c0 = [], [], 0, 0
    for lq, lk in zip(lens_q, lens_k):
        qb, kb, vb = (x[a : a + n].transpose(0, 1)[None] for x, a, n in ((ins[0], r0, lq), (ins[1], c0, lk),
                                                                         (ins[2], c0, lk)))  # fmt: skip
        o, lb = formula(qb, kb, vb, offset=lk - lq, right=0, softcap=4.0, sinks=ins[3])
        outs.append(o[0].transpose(0, 1))
        lses.append(lb[0])
        r0, c0 = r0 + lq, c0 + lk
    ref, ref_lse = torch.cat(outs), torch.cat(lses, 1)
    assert_close(out, ref, torch.float32, None, "out")
    _check_lse(lse, ref_lse)
    want = torch.autograd.grad(ref, ins, dout)
    for name, g, w in zip(("dq", "dk", "dv", "dsinks"), got, want):
        assert_close(g, w, torch.float32, None, name)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("path", PATHS)
def test_decode_sinks_and_softcap(path, splits):
    """decode_attention with sinks (counted once however many key splits) and softcap, GQA, against the
    formula on each sequence's filled cache."""
    N, H, HK, E, S_max = 3, 4, 2, 32, 96
    kc, vc = randn(N, HK, S_max, E), randn(N, HK, S_max, E)
    lengths = torch.tensor([70, 1, 96], dtype=torch.int32, device=DEVICE)
    q, sinks = randn(N, H, 1, E), randn(H)
    with fastattn.backend(path):
        out = fastattn.decode_attention(q, kc, vc, lengths, softcap=6.0, sinks=sinks, num_splits=splits)
    for n, s in enumerate(lengths.tolist()):
        ref, _ = formula(q[n : n + 1].double(), kc[n : n + 1, :, :s].double(), vc[n : n + 1, :, :s].double(),
                         offset=s - 1, right=0, softcap=6.0, sinks=sinks.double())  # fmt: skip
        assert_close(out[n : n + 1], ref, torch.float32, None, f"seq {n}")


def test_bad_softcap_and_sinks_are_named():
    q = randn(1, 2, 8, 16)
    for bad, exc in ((0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), ("3", TypeError)):
        with pytest.raises(exc, match="softcap"):
            fastattn.attention(q, q, q, softcap=bad)
    for bad in (torch.zeros(3), torch.zeros(2, 1), torch.zeros(2, dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"sinks must be a floating tensor of shape \(2,\)"):
            fastattn.attention(q, q, q, sinks=bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gluon_forward_softcap_and_sinks(dtype):
    """The Gluon forward (emulated on the CPU) takes soft-capping and sinks (Gemma 2 / gpt-oss); its backward does
    not yet, so the Triton backward runs from the Gluon forward's output and LSE, with the reason."""
    q = (randn(1, 4, 100, 64, dtype=dtype) * 3).requires_grad_()
    k, v = (randn(1, 2, 130, 64, dtype=dtype, requires_grad=True) for _ in range(2))
    sinks = randn(4, requires_grad=True)
    _backend._warned.clear()
    with fastattn.kernel_log() as log, pytest.warns(RuntimeWarning, match="Gluon backward has no soft-capping"):
        _check(q, k, v, sinks, path="gluon", causal=True, softcap=4.0)
    fwd = [e.kernel for e in log if e.op == "attention_fwd"]
    assert fwd == ["attention_fwd_gluon_kernel"] and "_attention_bwd_dq_kernel" in [e.kernel for e in log]


def test_cuda_refuses_softcap_and_sinks_with_the_reason():
    from fastattn.ops.attention.cuda import cuda_refusal

    q = randn(1, 2, 16, 64, dtype=torch.bfloat16)
    assert "soft-capping" in cuda_refusal(q, q, q, None, 0.1, None, None, softcap=2.0)
    assert "sinks" in cuda_refusal(q, q, q, None, 0.1, None, None, sinks=torch.zeros(2))
