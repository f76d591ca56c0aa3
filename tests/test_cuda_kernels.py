"""The CUDA C++ kernels, on a GPU through fastattn._C and on the CPU through the host emulation
(fastattn._C_host, csrc/emulate: the same sources built as host C++, every barrier, warp operation, cp.async
wait, bound and shared-memory race checked as they run): attention forward and backward at head dims 64 and 128
in fp16/bf16 with causal masks (both alignments), windows, GQA / MQA, key padding by mask and by lengths,
dropout, ragged and non-contiguous inputs; layer norm / RMSNorm forward and backward (warp-per-row and
block-per-row, deterministic dW/dB); sinusoidal and rotary encodings. Each check also confirms through
fastattn.kernel_log() that the CUDA launchers ran (not a fallback). References in float64; low precision within
2x torch's own error (tests/helpers.py)."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, assert_close, cuda_backend_skip, grad_out, randn, torch_result, torch_rotary

import fastattn
from fastattn import _torch
from fastattn.ops.attention import cuda as attention_cuda
from fastattn.ops.attention.launch import MaskSpec, attention_fwd
from fastattn.ops.attention.reference import attention_reference
from fastattn.ops.posenc.reference import rotary_reference, sinusoidal_table

pytestmark = pytest.mark.skipif(cuda_backend_skip() is not None, reason=str(cuda_backend_skip()))

LOW = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


class _Calls:
    """Counts of the launches so far, ``{"kernel:backend": n}``, read off a fastattn.kernel_log()."""

    def __init__(self, log):
        self.log = log

    def counts(self) -> collections.Counter:
        return collections.Counter(f"{e.kernel}:{e.backend}" for e in self.log)

    def __eq__(self, other) -> bool:
        return self.counts() == other

    def __repr__(self) -> str:
        return repr(dict(self.counts()))


@pytest.fixture
def calls():
    """The launches of the test, so that it can tell that the CUDA kernels ran and nothing else did."""
    with fastattn.kernel_log() as log:
        yield _Calls(log)


def _leaf64(x):
    return x.detach().cpu().double().requires_grad_()


def _visible(L: int, S: int, spec: MaskSpec) -> torch.Tensor:
    """(L, S) bool: query i sees key j under ``spec`` (the rule of fastattn.attention, written out)."""
    i, j = torch.arange(L)[:, None] + spec.offset, torch.arange(S)[None, :]
    keep = torch.ones(L, S, dtype=torch.bool)
    if spec.left is not None:
        keep &= j >= i - spec.left
    if spec.right is not None:
        keep &= j <= i + spec.right
    return keep


def _torch_attention(q, k, v, keep, scale, dout):
    """torch's own SDPA in q's dtype on the GPU with the mask ``keep``, output and gradients. Leading rows that
    see no key (causal with L > S) are left out of torch's call and given 0, fastattn's documented result
    there (torch's fused kernels may give NaN on them)."""
    first = int((~keep.any(-1)).cumprod(0).sum())
    out, grads = torch_result(
        lambda q, k, v: _torch.scaled_dot_product_attention(q, k, v, keep[first:].to(q.device), scale=scale,
                                                            enable_gqa=True),
        [q[:, :, first:], k, v], dout[:, :, first:],
    )  # fmt: skip
    pad = (0, 0, first, 0)
    return torch.nn.functional.pad(out, pad), [torch.nn.functional.pad(grads[0], pad), *grads[1:]]


ATTENTION_CASES = [
    pytest.param((2, 3, 3, 97, 97), {}, id="full-odd"),
    pytest.param((1, 4, 4, 70, 200), {"causal": True}, id="causal-L<S"),
    pytest.param((1, 2, 2, 150, 60), {"causal": True}, id="causal-L>S-empty-rows"),
    pytest.param((1, 4, 2, 128, 128), {"causal": True}, id="causal-gqa"),
    pytest.param((2, 2, 1, 90, 130), {"window": (17, 5)}, id="window-mqa"),
    pytest.param((2, 4, 2, 77, 77), {"causal": True, "layout": "nlhe"}, id="causal-noncontiguous"),
]


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("shape,kw", ATTENTION_CASES)
def test_cuda_attention_matches_reference(shape, kw, head_dim, dtype, calls):
    N, H, HK, L, S = shape
    kw = dict(kw)
    if kw.pop("layout", None) == "nlhe":  # (N, L, H, E) storage seen as (N, H, L, E): no unit row strides
        q = randn(N, L, H, head_dim, dtype=dtype).transpose(1, 2).requires_grad_()
        k, v = (randn(N, S, HK, head_dim, dtype=dtype).transpose(1, 2).requires_grad_() for _ in range(2))
    else:
        q = randn(N, H, L, head_dim, dtype=dtype, requires_grad=True)
        k, v = (randn(N, HK, S, head_dim, dtype=dtype, requires_grad=True) for _ in range(2))
    with fastattn.backend("cuda"):
        out, lse = fastattn.attention(q, k, v, return_lse=True, **kw)
    left, right = kw.get("window", (None, None))
    if kw.get("causal"):
        right = 0
    spec = MaskSpec(offset=S - L, left=left, right=right)
    ref_in = [_leaf64(x) for x in (q, k, v)]
    ref, ref_lse = attention_reference(*ref_in, scale=head_dim**-0.5, mask=spec)
    dout = grad_out(ref.shape, dtype)
    torch_out, torch_grads = _torch_attention(q, k, v, _visible(L, S, spec), head_dim**-0.5, dout)
    assert_close(out, ref, dtype, torch_out, "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert (lse.cpu()[finite] - ref_lse[finite]).abs().max() < 1e-2
    got = torch.autograd.grad(out, (q, k, v), dout.to(DEVICE, dtype))
    want = torch.autograd.grad(ref, ref_in, dout)
    for name, g, w, t in zip("qkv", got, want, torch_grads):
        assert_close(g, w, dtype, t, f"d{name}")
    assert calls == {"attention_forward:cuda": 1, "attention_backward:cuda": 1}


@pytest.mark.parametrize("dtype", LOW)
def test_cuda_sdpa_key_padding_mask(dtype, calls):
    q, k, v = (randn(3, 4, 77, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    lengths = torch.tensor([77, 40, 1], device=DEVICE)
    mask = (torch.arange(77, device=DEVICE)[None, :] < lengths[:, None])[:, None, None, :]
    with fastattn.backend("cuda"):
        out = fastattn.scaled_dot_product_attention(q, k, v, mask)
    ref_in = [_leaf64(x) for x in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, mask.cpu())
    dout = grad_out(ref.shape, dtype)
    torch_out, torch_grads = torch_result(lambda q, k, v: _torch.scaled_dot_product_attention(q, k, v, mask),
                                          [q, k, v], dout)  # fmt: skip
    assert_close(out, ref, dtype, torch_out, "out")
    for name, g, w, t in zip("qkv", torch.autograd.grad(out, (q, k, v), dout.to(DEVICE, dtype)),
                             torch.autograd.grad(ref, ref_in, dout), torch_grads):  # fmt: skip
        assert_close(g, w, dtype, t, f"d{name}")
    assert calls == {"attention_forward:cuda": 1, "attention_backward:cuda": 1}


@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_dropout_equals_triton_dropout(head_dim):
    """Same seed, same kept scores: the CUDA and Triton forward outputs agree to rounding."""
    q, k, v = (randn(1, 2, 100, head_dim, dtype=torch.bfloat16) for _ in range(3))
    spec = MaskSpec(offset=0, right=0)
    cuda_out, cuda_lse = attention_cuda.attention_fwd_cuda(q, k, v, None, 0.1, spec, 0.25, seed=2**40 + 3)
    triton_out, triton_lse = attention_fwd(q, k, v, None, 0.1, spec, 0.25, seed=2**40 + 3)
    assert (cuda_out.float() - triton_out.float()).abs().max() < 3e-2
    assert torch.allclose(cuda_lse, triton_lse, atol=1e-3)


def test_cuda_dropout_backward_uses_the_forward_mask(calls):
    """The backward drops the scores the forward dropped: keep is read off the forward with V = I, then the
    forward and backward with the same seed match the float64 formula with that keep mask."""
    q, k = randn(1, 2, 64, 64, dtype=torch.float16), randn(1, 2, 64, 64, dtype=torch.float16)
    eye = torch.eye(64, device=DEVICE, dtype=torch.float16).expand(1, 2, 64, 64).contiguous()
    v = randn(1, 2, 64, 64, dtype=torch.float16)
    spec = MaskSpec()
    probs, _ = attention_cuda.attention_fwd_cuda(q, k, eye, None, 0.125, spec, 0.3, seed=11)
    keep = (probs != 0).cpu()
    out, lse = attention_cuda.attention_fwd_cuda(q, k, v, None, 0.125, spec, 0.3, seed=11)
    ref_in = [_leaf64(x) for x in (q, k, v)]
    ref, _ = attention_reference(*ref_in, scale=0.125, mask=spec, dropout_p=0.3, keep=keep)
    dout = grad_out(ref.shape, torch.float16)
    grads = attention_cuda.attention_bwd_cuda(dout.to(DEVICE, torch.float16), q, k, v, out, lse, None, 0.125, spec,
                                              0.3, 11)  # fmt: skip
    kept = keep.to(DEVICE)
    # torch's own ops in fp16 with the same kept scores: softmax, the dropout scaling, the product
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    torch_out, torch_grads = torch_result(
        lambda q, k, v: (torch.softmax(q @ k.transpose(-1, -2) * 0.125, -1) * kept / 0.7) @ v, leaves, dout
    )
    assert_close(out, ref, torch.float16, torch_out, "out")
    for name, g, w, t in zip("qkv", grads, torch.autograd.grad(ref, ref_in, dout), torch_grads):
        assert_close(g, w, torch.float16, t, f"d{name}")
    assert calls == {"attention_forward:cuda": 2, "attention_backward:cuda": 1}


@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_key_padding_by_lengths(head_dim, calls):
    """Per-batch key lengths (seqlens_k), a length of 0 included: keys past them take no part; a row that sees
    no key gives 0 and lse = -inf."""
    N, H, L, S = 3, 2, 40, 100
    q, k, v = (randn(N, H, n, head_dim, dtype=torch.bfloat16) for n in (L, S, S))
    lengths = torch.tensor([100, 37, 0], dtype=torch.int32, device=DEVICE)
    spec = MaskSpec(offset=S - L, right=0)
    out, lse = attention_cuda.attention_fwd_cuda(q, k, v, None, head_dim**-0.5, spec, seqlens_k=lengths)
    keep = (torch.arange(S, device=DEVICE)[None, :] < lengths[:, None])[:, None, None, :]
    ref_in = [_leaf64(x) for x in (q, k, v)]
    ref, ref_lse = attention_reference(*ref_in, scale=head_dim**-0.5, mask=spec, bias=keep.cpu())
    dout = grad_out(ref.shape, torch.bfloat16)
    visible = keep & _visible(L, S, spec).to(DEVICE)
    torch_out, torch_grads = torch_result(
        lambda q, k, v: torch.nan_to_num(_torch.scaled_dot_product_attention(q, k, v, visible, scale=head_dim**-0.5)),
        [x.clone().requires_grad_() for x in (q, k, v)], dout,
    )  # fmt: skip
    assert_close(out, ref, torch.bfloat16, torch_out, "out")
    assert torch.equal(torch.isfinite(lse.cpu()), torch.isfinite(ref_lse)) and not torch.isfinite(lse[2]).any()
    grads = attention_cuda.attention_bwd_cuda(dout.to(DEVICE, torch.bfloat16), q, k, v, out, lse, None,
                                              head_dim**-0.5, spec, 0.0, 0, seqlens_k=lengths)  # fmt: skip
    for name, g, w, t in zip("qkv", grads, torch.autograd.grad(ref, ref_in, dout), torch_grads):
        assert_close(g, w, torch.bfloat16, t, f"d{name}")
    assert calls == {"attention_forward:cuda": 1, "attention_backward:cuda": 1}


@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_sdpa_is_causal_is_top_left(head_dim, calls):
    """torch's is_causal aligns the mask top-left (query i sees keys j <= i, also when L < S), fastattn's
    causal bottom-right: the drop-in passes torch's alignment to the CUDA kernels."""
    q = randn(1, 2, 50, head_dim, dtype=torch.float16, requires_grad=True)
    k, v = (randn(1, 2, 120, head_dim, dtype=torch.float16, requires_grad=True) for _ in range(2))
    with fastattn.backend("cuda"):
        out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref_in = [_leaf64(x) for x in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, is_causal=True)
    dout = grad_out(ref.shape, torch.float16)
    torch_out, torch_grads = torch_result(
        lambda q, k, v: _torch.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v], dout
    )
    assert_close(out, ref, torch.float16, torch_out, "out")
    for name, g, w, t in zip("qkv", torch.autograd.grad(out, (q, k, v), dout.to(DEVICE, torch.float16)),
                             torch.autograd.grad(ref, ref_in, dout), torch_grads):  # fmt: skip
        assert_close(g, w, torch.float16, t, f"d{name}")
    assert calls == {"attention_forward:cuda": 1, "attention_backward:cuda": 1}


DTYPES = [pytest.param(torch.float32, id="fp32"), *LOW]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(7, 64), (300, 1024), (33, 1032), (5, 4096), (3, 8192)], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_cuda_norm_forward_backward(rows, hidden, dtype, rms, calls):
    if dtype == torch.float32 and hidden > 4096:
        pytest.skip("fp32 rows above 4096 go to the Triton backward (stated refusal, tested on CPU)")
    x = randn(rows, hidden, dtype=dtype, requires_grad=True)
    w = randn(hidden, dtype=dtype, requires_grad=True)
    b = None if rms else randn(hidden, dtype=dtype, requires_grad=True)
    with fastattn.backend("cuda"):
        y = fastattn.rms_norm(x, (hidden,), w, 1e-5) if rms else fastattn.layer_norm(x, (hidden,), w, b, 1e-5)
    params = [t for t in (x, w, b) if t is not None]
    ref_in = [_leaf64(t) for t in params]

    def norm(x, w, b=None):
        return F.rms_norm(x, (hidden,), w, 1e-5) if rms else F.layer_norm(x, (hidden,), w, b, 1e-5)

    ref = norm(*ref_in)
    dy = grad_out(ref.shape, dtype)
    torch_out, torch_grads = torch_result(norm, params, dy)
    assert_close(y, ref, dtype, torch_out, "y")
    got = torch.autograd.grad(y, params, dy.to(DEVICE, dtype))
    for name, g, want, t in zip(("dx", "dw", "db"), got, torch.autograd.grad(ref, ref_in, dy), torch_grads):
        assert_close(g, want, dtype, t, name)
    assert calls == {"norm_forward:cuda": 1, "norm_backward:cuda": 1}


def test_cuda_norm_weight_gradient_is_deterministic():
    """Bit for bit from run to run: the partial sums of dW go through no atomics (on the CPU at 600 rows, the
    emulator's time being the suite's: still 8 groups of 75 rows)."""
    rows = 4096 if DEVICE.type == "cuda" else 600
    x = randn(rows, 768, dtype=torch.bfloat16, requires_grad=True)
    w = randn(768, dtype=torch.bfloat16, requires_grad=True)
    dy = randn(rows, 768, dtype=torch.bfloat16)
    grads = []
    for _ in range(3):
        with fastattn.backend("cuda"):
            y = fastattn.layer_norm(x, (768,), w)
        grads.append(torch.autograd.grad(y, w, dy)[0])
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[1], grads[2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_sinusoidal_and_rotary(dtype, calls):
    x = randn(2, 3, 50, 64, dtype=dtype)
    with fastattn.backend("cuda"):
        y = fastattn.sinusoidal_encoding(x, offset=1000)
        rq, rk = fastattn.apply_rotary(x, x[:, :1], offset=7, rotary_dim=48)
    xd = x.double().cpu()
    y_ref = xd + sinusoidal_table(torch.arange(1000, 1050), 64)
    pos = torch.arange(7, 57)[None]
    table = sinusoidal_table(torch.arange(1000, 1050), 64)
    assert_close(y, y_ref, dtype, x + table.to(DEVICE, dtype), "sinusoidal")  # torch: the table added in dtype
    pos_d = pos.to(DEVICE)
    assert_close(rq, rotary_reference(xd, pos, 10000.0, False, 48), dtype, torch_rotary(x, pos_d, 48, False),
                 "rotary q")  # fmt: skip
    assert_close(rk, rotary_reference(xd[:, :1], pos, 10000.0, False, 48), dtype,
                 torch_rotary(x[:, :1], pos_d, 48, False), "rotary k")  # fmt: skip
    assert calls == {"sinusoidal_forward:cuda": 1, "rotary_forward:cuda": 2}


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the host emulation's own checks, on CPU tensors")
def test_the_emulation_checks_what_the_launchers_register(monkeypatch):
    """The launchers register the bytes of each tensor a kernel may touch: with the output registered 16 bytes
    short, the kernel's last stores land outside it and the launch raises, naming the buffer; the emulator's
    counts show that it ran the barriers, warp operations and copies of a real launch."""
    from fastattn.ops import cuda_ext

    host = cuda_ext.ext(torch.device("cpu"))
    q, k, v = (randn(1, 2, 64, 64, dtype=torch.float16) for _ in range(3))
    before = host.stats()
    attention_cuda.attention_fwd_cuda(q, k, v, None, 0.125, MaskSpec())
    after = host.stats()
    for what in ("barriers", "warp_collectives", "cp_async_landed", "shared_accesses", "global_accesses"):
        assert after.get(what, 0) > before.get(what, 0), what
    real = cuda_ext.launch

    def short_output(t, name, *args, reads=None, writes=None):
        return real(t, name, *args, reads=reads, writes={**writes, "out": writes["out"].flatten()[:-8]})

    monkeypatch.setattr(cuda_ext, "launch", short_output)
    with pytest.raises(host.EmulationError, match="out-of-bounds global write .* beyond the end of out"):
        attention_cuda.attention_fwd_cuda(q, k, v, None, 0.125, MaskSpec())
