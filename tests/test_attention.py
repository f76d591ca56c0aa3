"""Correctness of fastattn.scaled_dot_product_attention and fastattn.attention, forward and backward, on the
Triton path (interpreter on CPU machines) and the PyTorch path, against float64 references."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_close, grad_out, randn, reference, rel_err, torch_result

import fastattn
from fastattn import _torch

# Backends whose result is fastattn's own code: "torch" is listed only where fastattn's PyTorch path is its own
# code (the native entry's reference implementation); the drop-in's "torch" path is torch's SDPA itself, whose
# dispatch is tested in test_backend.py rather than compared with torch.
KERNELS = ["triton", "cuda"]
OWN_CODE = ["triton", "cuda", "torch"]


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, [x for x in inputs if x is not None and x.requires_grad], dout)


def _leaf(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A fresh leaf copy (upcast to ``dtype`` when given), so each path gets its own gradients."""
    return x.detach().to(dtype or x.dtype).requires_grad_(x.requires_grad)


def _check_sdpa(q, k, v, mask=None, is_causal=False, enable_gqa=False, scale=None, backend="triton"):
    """fastattn's SDPA against torch's SDPA in float64, outputs and gradients, within the rule of
    tests/helpers.py against torch's own SDPA in q's dtype on the same inputs."""
    dtype = q.dtype
    with fastattn.backend(backend):
        out = fastattn.scaled_dot_product_attention(
            q, k, v, mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
        )
    assert out.dtype == dtype and out.device == q.device
    ref_in = [_leaf(x, torch.float64).cpu() if x is not None else None for x in (q, k, v)]
    ref_mask = None if mask is None else (mask.cpu() if mask.dtype == torch.bool else mask.double().cpu())
    ref_causal = is_causal
    if mask is not None and is_causal:
        # torch's float64 (math) SDPA refuses mask + is_causal; its CPU kernel applies both: spell that out.
        tril = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        ref_mask = ref_mask & tril if ref_mask.dtype == torch.bool else ref_mask.masked_fill(~tril, float("-inf"))
        ref_causal = False
    ref = _torch.scaled_dot_product_attention(
        *ref_in, ref_mask, is_causal=ref_causal, scale=scale, enable_gqa=enable_gqa
    )
    dout = grad_out(ref.shape, dtype)
    torch_mask = None if ref_mask is None else ref_mask.to(dtype if ref_mask.is_floating_point() else torch.bool)
    torch_out, torch_grads = torch_result(
        lambda q, k, v: _torch.scaled_dot_product_attention(
            q, k, v, torch_mask, is_causal=ref_causal, scale=scale, enable_gqa=enable_gqa
        ),
        [x.cpu() for x in (q, k, v)],
        dout,
    )
    assert out.shape == ref.shape
    assert_close(out, ref, dtype, torch_out, "out")
    got = _grads(out, (q, k, v), dout.to(device=q.device, dtype=dtype))
    want = _grads(ref, ref_in, dout)
    for name, g, w, t in zip("qkv", got, want, torch_grads):
        assert_close(g, w, dtype, t, f"d{name}")


SDPA_CASES = [
    pytest.param((2, 3, 37, 37, 32, 32), {}, id="square-odd"),
    pytest.param((1, 2, 29, 61, 64, 64), {}, id="L<S"),
    pytest.param((1, 2, 50, 19, 16, 16), {"is_causal": True}, id="causal-L>S"),
    pytest.param((1, 2, 23, 57, 32, 32), {"is_causal": True}, id="causal-L<S"),
    pytest.param((2, 2, 33, 33, 32, 48), {}, id="Ev!=E"),
    pytest.param((1, 2, 40, 40, 32, 32), {"scale": 0.3}, id="scale"),
]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("shape,kw", SDPA_CASES)
def test_sdpa_matches_torch(shape, kw, backend):
    N, H, L, S, E, EV = shape
    q, k = randn(N, H, L, E, requires_grad=True), randn(N, H, S, E, requires_grad=True)
    v = randn(N, H, S, EV, requires_grad=True)
    _check_sdpa(q, k, v, backend=backend, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sdpa_low_precision(dtype, causal):
    q = randn(1, 2, 45, 64, dtype=dtype, requires_grad=True)
    k, v = randn(1, 2, 70, 64, dtype=dtype, requires_grad=True), randn(1, 2, 70, 64, dtype=dtype, requires_grad=True)
    _check_sdpa(q, k, v, is_causal=causal)


@pytest.mark.parametrize("head_dim", [16, 80, 96, 112, 160, 192, 256])
def test_sdpa_head_dims(head_dim):
    q, k, v = (randn(1, 1, 19, head_dim, requires_grad=True) for _ in range(3))
    _check_sdpa(q, k, v, is_causal=True)


MASKS = [
    pytest.param((37, 45), torch.bool, id="bool-LS"),
    pytest.param((2, 1, 37, 45), torch.bool, id="bool-N1LS"),
    pytest.param((3, 1, 45), torch.bool, id="bool-H1S-keypad"),
    pytest.param((37, 45), torch.float32, id="float-LS"),
    pytest.param((2, 3, 37, 45), torch.float32, id="float-full"),
    pytest.param((1, 3, 1, 45), torch.float32, id="float-1H1S"),
]


@pytest.mark.parametrize("mask_shape,mask_dtype", MASKS)
@pytest.mark.parametrize("is_causal", [False, True], ids=["", "causal"])
def test_sdpa_masks(mask_shape, mask_dtype, is_causal):
    q, k, v = randn(2, 3, 37, 32, requires_grad=True), *(randn(2, 3, 45, 32, requires_grad=True) for _ in range(2))
    if mask_dtype == torch.bool:
        mask = (torch.rand(mask_shape) > 0.3).to(DEVICE)
    else:
        mask = torch.randn(mask_shape).to(DEVICE)
    _check_sdpa(q, k, v, mask, is_causal=is_causal)


def test_sdpa_float_mask_in_low_precision():
    q, k, v = (randn(1, 2, 40, 32, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    _check_sdpa(q, k, v, randn(40, 40, dtype=torch.bfloat16))


@pytest.mark.parametrize("ranks", ["2d", "3d", "5d"])
def test_sdpa_ranks(ranks):
    lead = {"2d": (), "3d": (3,), "5d": (2, 2, 3)}[ranks]
    q, k, v = randn(*lead, 21, 16, requires_grad=True), *(randn(*lead, 30, 16, requires_grad=True) for _ in range(2))
    _check_sdpa(q, k, v, is_causal=True)


@pytest.mark.parametrize("hq,hkv", [(4, 2), (6, 1)], ids=["gqa-4-2", "mqa-6-1"])
def test_sdpa_gqa(hq, hkv):
    q = randn(2, hq, 33, 32, requires_grad=True)
    k, v = randn(2, hkv, 47, 32, requires_grad=True), randn(2, hkv, 47, 32, requires_grad=True)
    _check_sdpa(q, k, v, torch.rand(33, 47).to(DEVICE) > 0.2, enable_gqa=True)


def test_sdpa_fully_masked_rows_match_torch():
    q, k, v = (randn(1, 2, 20, 16, requires_grad=True) for _ in range(3))
    mask = torch.rand(20, 20) > 0.5
    mask[3] = False
    mask[11] = False
    _check_sdpa(q, k, v, mask.to(DEVICE))
    with fastattn.backend("triton"):
        out = fastattn.scaled_dot_product_attention(q, k, v, mask.to(DEVICE))
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))


def test_sdpa_non_contiguous():
    base = randn(2, 41, 3, 3, 32)  # (N, L, 3, H, E) as a fused qkv projection lays it out
    q, k, v = (_leaf(base[:, :, i].transpose(1, 2)) for i in range(3))
    q.requires_grad_()
    k.requires_grad_()
    v.requires_grad_()
    assert not q.is_contiguous()
    _check_sdpa(q, k, v, is_causal=True)


# ---- native API -------------------------------------------------------------------------------------------

NATIVE_CASES = [
    pytest.param((2, 2, 2, 31, 31), {"causal": True}, id="causal-square"),
    pytest.param((1, 2, 2, 17, 45), {"causal": True}, id="causal-kvcache-L<S"),
    pytest.param((1, 2, 2, 45, 17), {"causal": True}, id="causal-L>S-empty-rows"),
    pytest.param((1, 2, 2, 50, 50), {"window": (7, 3)}, id="window-both"),
    pytest.param((1, 2, 2, 40, 60), {"window": (9, None)}, id="window-left"),
    pytest.param((1, 2, 2, 60, 40), {"window": (None, 5)}, id="window-right"),
    pytest.param((1, 4, 2, 35, 35), {"window": (11, 4), "causal": True}, id="window-causal-gqa"),
    pytest.param((1, 2, 2, 33, 41), {}, id="full"),
]


@pytest.mark.parametrize("backend", OWN_CODE)
@pytest.mark.parametrize("shape,kw", NATIVE_CASES)
def test_attention_native(shape, kw, backend):
    N, H, HK, L, S = shape
    E = 32
    q = randn(N, H, L, E, requires_grad=True)
    k, v = randn(N, HK, S, E, requires_grad=True), randn(N, HK, S, E, requires_grad=True)
    with fastattn.backend(backend):
        out, lse = fastattn.attention(q, k, v, return_lse=True, **kw)
    left, right = kw.get("window", (None, None))
    if kw.get("causal"):
        right = 0 if right is None else min(right, 0)
    ref_in = [_leaf(x, torch.float64).cpu() for x in (q, k, v)]
    ref, ref_lse = reference(*ref_in, offset=S - L, left=left, right=right)
    finite = torch.isfinite(ref_lse)
    ref = torch.where(finite[..., None], ref, 0.0)  # rows with no visible key give 0 (documented)
    assert_close(out, ref, torch.float32, None, "out")
    assert torch.equal(torch.isfinite(lse.cpu()), finite), "rows with no visible key must give lse = -inf"
    assert rel_err(lse.cpu()[finite], ref_lse.double()[finite]) < 1e-5
    dout = torch.randn(ref.shape, dtype=torch.float64)
    for name, g, w in zip("qkv", _grads(out, (q, k, v), dout.to(DEVICE, torch.float32)), _grads(ref, ref_in, dout)):
        assert_close(g, w, torch.float32, None, f"d{name}")


@pytest.mark.parametrize("bias_shape", [(2, 3, 29, 43), (1, 3, 29, 43), (29, 43), (2, 1, 1, 43)], ids=str)
@pytest.mark.parametrize("backend", OWN_CODE)
def test_attention_bias_gradient(bias_shape, backend):
    q = randn(2, 3, 29, 32, requires_grad=True)
    k, v = randn(2, 3, 43, 32, requires_grad=True), randn(2, 3, 43, 32, requires_grad=True)
    bias = randn(*bias_shape, requires_grad=True)
    with fastattn.backend(backend):
        out = fastattn.attention(q, k, v, bias=bias, causal=True)
    ref_in = [_leaf(x, torch.float64).cpu() for x in (q, k, v, bias)]
    ref, _ = reference(*ref_in[:3], offset=43 - 29, right=0, bias=ref_in[3])
    assert_close(out, ref, torch.float32, None, "out")
    dout = torch.randn(ref.shape, dtype=torch.float64)
    got = _grads(out, (q, k, v, bias), dout.to(DEVICE))
    want = _grads(ref, ref_in, dout)
    for name, g, w in zip(["dq", "dk", "dv", "dbias"], got, want):
        assert g.shape == w.shape
        assert_close(g, w, torch.float32, None, name)


def test_attention_lse_merges_partial_results():
    """Attention over keys [0, S) equals the LSE-weighted merge of attention over two halves."""
    q, k, v = randn(1, 2, 24, 32), randn(1, 2, 50, 32), randn(1, 2, 50, 32)
    with fastattn.backend("triton"):
        full = fastattn.attention(q, k, v)
        o1, l1 = fastattn.attention(q, k[:, :, :20], v[:, :, :20], return_lse=True)
        o2, l2 = fastattn.attention(q, k[:, :, 20:], v[:, :, 20:], return_lse=True)
    lse = torch.logaddexp(l1, l2)
    merged = o1 * torch.exp(l1 - lse)[..., None] + o2 * torch.exp(l2 - lse)[..., None]
    assert rel_err(merged, full) < 1e-5


def test_triton_and_torch_paths_agree_in_bf16():
    q, k, v = (randn(2, 2, 40, 64, dtype=torch.bfloat16) for _ in range(3))
    with fastattn.backend("triton"):
        a = fastattn.attention(q, k, v, causal=True)
    with fastattn.backend("torch"):
        b = fastattn.attention(q, k, v, causal=True)
    assert rel_err(a, b) < 1e-2


def test_nan_propagates_on_triton_path():
    q, k, v = (randn(1, 1, 16, 16) for _ in range(3))
    v[0, 0, 3, 2] = float("nan")
    with fastattn.backend("triton"):
        out = fastattn.attention(q, k, v)
    assert torch.isnan(out[0, 0, :, 2]).all()


@pytest.mark.parametrize("tma", [True, False], ids=["descriptors", "pointers"])
def test_descriptor_and_pointer_loads(monkeypatch, tma):
    """Both ways the kernels load tiles: tensor descriptors (16-bit, aligned; the copy engine on Hopper) and
    pointers with masks. Head dim 80 and ragged lengths make the descriptors' zero fill do real work."""
    import fastattn.ops.attention.launch as launch

    made = []
    real = launch._descriptor
    monkeypatch.setattr(launch, "_descriptor", lambda t, rows: made.append(rows) or real(t, rows))
    if not tma:
        monkeypatch.setattr(launch, "_tma_ok", lambda *tensors: False)
    if tma and DEVICE.type == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors need sm_90+")
    q = randn(1, 2, 37, 80, dtype=torch.bfloat16, requires_grad=True)
    k, v = (randn(1, 2, 45, 80, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    _check_sdpa(q, k, v, is_causal=True)
    assert bool(made) == tma


@pytest.mark.parametrize("backend", OWN_CODE)
@pytest.mark.parametrize(
    "shape,slopes_shape,causal",
    [((2, 4, 4, 29, 29), "H", True), ((2, 4, 2, 21, 37), "NH", False), ((1, 2, 1, 40, 17), "H", True)],
    ids=["causal-H", "gqa-NH-L<S", "mqa-L>S-causal"],
)
def test_attention_alibi(shape, slopes_shape, causal, backend):
    """ALiBi in the kernel equals the same bias written out: -slope[h] * |i + S - L - j|."""
    N, H, HK, L, S = shape
    q = randn(N, H, L, 32, requires_grad=True)
    k, v = randn(N, HK, S, 32, requires_grad=True), randn(N, HK, S, 32, requires_grad=True)
    slopes = fastattn.alibi_slopes(H) if slopes_shape == "H" else torch.rand(N, H) * 0.5
    with fastattn.backend(backend):
        out = fastattn.attention(q, k, v, causal=causal, alibi_slopes=slopes.to(DEVICE))
    i, j = torch.arange(L)[:, None], torch.arange(S)[None, :]
    bias = -slopes.double().reshape(-1, H, 1, 1) * (i + S - L - j).abs()
    ref_in = [_leaf(x, torch.float64).cpu() for x in (q, k, v)]
    ref, lse = reference(*ref_in, offset=S - L, right=0 if causal else None, bias=bias)
    ref = torch.where(torch.isfinite(lse)[..., None], ref, 0.0)
    assert_close(out, ref, torch.float32, None, "out")
    dout = torch.randn(ref.shape, dtype=torch.float64)
    for name, g, w in zip("qkv", _grads(out, (q, k, v), dout.to(DEVICE, torch.float32)), _grads(ref, ref_in, dout)):
        assert_close(g, w, torch.float32, None, f"d{name}")


def test_alibi_slopes_and_errors():
    torch.testing.assert_close(fastattn.alibi_slopes(4), torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]))
    assert fastattn.alibi_slopes(6).shape == (6,)
    q, k, v = (randn(1, 4, 8, 16) for _ in range(3))
    with pytest.raises(ValueError, match="alibi_slopes"):
        fastattn.attention(q, k, v, alibi_slopes=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="num_heads"):
        fastattn.alibi_slopes(0)
