"""The CUDA C++ kernels on a GPU (skipped elsewhere, with the reason): attention forward and backward at head
dims 64 and 128 in fp16/bf16 with causal masks, windows, GQA, key padding and dropout; layer norm / RMSNorm
forward and backward (warp-per-row and block-per-row, deterministic dW/dB); sinusoidal and rotary encodings.
Each check also confirms that the CUDA launcher ran (not a fallback). References in float64; low precision
within 2x torch's own error (tests/helpers.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, assert_close, cuda_backend_skip, grad_out, randn, torch_result, torch_rotary

import fastattn
from fastattn import _torch
from fastattn.ops.attention import cuda as attention_cuda
from fastattn.ops.attention.launch import MaskSpec, attention_fwd
from fastattn.ops.attention.reference import attention_reference
from fastattn.ops.norm import cuda as norm_cuda
from fastattn.ops.posenc import cuda as posenc_cuda
from fastattn.ops.posenc.reference import rotary_reference, sinusoidal_table

pytestmark = pytest.mark.skipif(cuda_backend_skip() is not None, reason=str(cuda_backend_skip()))

LOW = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


@pytest.fixture
def calls(monkeypatch):
    """Counts calls of the CUDA launchers, so a test can tell that they ran."""
    counts: dict[str, int] = {}

    def counting(module, name):
        fn = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    counting(attention_cuda, "attention_fwd_cuda")
    counting(attention_cuda, "attention_bwd_cuda")
    counting(norm_cuda, "norm_fwd_cuda")
    counting(norm_cuda, "norm_bwd_cuda")
    return counts


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
]


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("shape,kw", ATTENTION_CASES)
def test_cuda_attention_matches_reference(shape, kw, head_dim, dtype, calls):
    N, H, HK, L, S = shape
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
    assert calls == {"attention_fwd_cuda": 1, "attention_bwd_cuda": 1}


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
    assert calls["attention_fwd_cuda"] == 1 and calls["attention_bwd_cuda"] == 1


@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_dropout_equals_triton_dropout(head_dim):
    """Same seed, same kept scores: the CUDA and Triton forward outputs agree to rounding."""
    q, k, v = (randn(2, 2, 100, head_dim, dtype=torch.bfloat16) for _ in range(3))
    spec = MaskSpec(offset=0, right=0)
    cuda_out, cuda_lse = attention_cuda.attention_fwd_cuda(q, k, v, None, 0.1, spec, 0.25, seed=2**40 + 3)
    triton_out, triton_lse = attention_fwd(q, k, v, None, 0.1, spec, 0.25, seed=2**40 + 3)
    assert (cuda_out.float() - triton_out.float()).abs().max() < 3e-2
    assert torch.allclose(cuda_lse, triton_lse, atol=1e-3)


def test_cuda_dropout_backward_uses_the_forward_mask(calls):
    """dV of dropout attention must equal (P * keep / (1 - p))^T dO, with keep read off through V = I."""
    q, k = randn(1, 2, 64, 64, dtype=torch.float16), randn(1, 2, 64, 64, dtype=torch.float16)
    eye = torch.eye(64, device=DEVICE, dtype=torch.float16).expand(1, 2, 64, 64).contiguous()
    spec = MaskSpec()
    probs, _ = attention_cuda.attention_fwd_cuda(q, k, eye, None, 0.125, spec, 0.3, seed=11)
    keep = (probs != 0).cpu()
    v = randn(1, 2, 64, 64, dtype=torch.float16, requires_grad=True)
    qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    out = attention_cuda.CudaAttention.apply(qq, kk, v, None, 0.125, spec, 0.3, 11)[0]
    ref_in = [_leaf64(x) for x in (qq, kk, v)]
    ref, _ = attention_reference(*ref_in, scale=0.125, mask=spec, dropout_p=0.3, keep=keep)
    dout = grad_out(ref.shape, torch.float16)
    kept = keep.to(DEVICE)
    # torch's own ops in fp16 with the same kept scores: softmax, the dropout scaling, the product
    torch_out, torch_grads = torch_result(
        lambda q, k, v: (torch.softmax(q @ k.transpose(-1, -2) * 0.125, -1) * kept / 0.7) @ v, [qq, kk, v], dout
    )
    assert_close(out, ref, torch.float16, torch_out, "out")
    for name, g, w, t in zip("qkv", torch.autograd.grad(out, (qq, kk, v), dout.to(DEVICE, torch.float16)),
                             torch.autograd.grad(ref, ref_in, dout), torch_grads):  # fmt: skip
        assert_close(g, w, torch.float16, t, f"d{name}")


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
    assert calls == {"norm_fwd_cuda": 1, "norm_bwd_cuda": 1}


def test_cuda_norm_weight_gradient_is_deterministic():
    x = randn(4096, 768, dtype=torch.bfloat16, requires_grad=True)
    w = randn(768, dtype=torch.bfloat16, requires_grad=True)
    dy = randn(4096, 768, dtype=torch.bfloat16)
    grads = []
    for _ in range(3):
        with fastattn.backend("cuda"):
            y = fastattn.layer_norm(x, (768,), w)
        grads.append(torch.autograd.grad(y, w, dy)[0])
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[1], grads[2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_sinusoidal_and_rotary(dtype, monkeypatch):
    ran = []
    for name in ("sinusoidal_fwd_cuda", "rotary_fwd_cuda"):
        fn = getattr(posenc_cuda, name)
        monkeypatch.setattr(posenc_cuda, name, lambda *a, _fn=fn, _n=name: ran.append(_n) or _fn(*a))
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
    assert set(ran) == {"sinusoidal_fwd_cuda", "rotary_fwd_cuda"}
