"""Layer norm / RMSNorm (plain and fused with a residual add) against float64 references written out here,
forward and backward, on the Triton path (interpreter on CPU machines) and the PyTorch path."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
from helpers import BACKENDS, DEVICE, assert_close, grad_out, randn, torch_result

import fastattn

# fastattn.layer_norm / rms_norm on the "torch" backend are torch's own ops: testing them would test torch.
# Those cases go; the fused residual variants, whose PyTorch path is fastattn's own code, keep all backends.
KERNELS = ["triton", "cuda"]

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]  # fmt: skip


def ref_layer_norm(x, w, b, eps):
    """The formula, in float64: (x - mean) / sqrt(var + eps) * w + b over the last dim."""
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)
    return y * (1 if w is None else w.double()) + (0 if b is None else b.double())


def ref_rms_norm(x, w, eps):
    x = x.double()
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * (1 if w is None else w.double())


def _leaf(x, dtype=None):
    return x.detach().to(dtype or x.dtype).requires_grad_()


def _check(fn, ref_fn, torch_fn, tensors, dtype):
    """fn(*tensors) against ref_fn on float64 leaves (and torch's own op in dtype), outputs and gradients."""
    out = fn(*tensors)
    ref_in = [_leaf(t.cpu(), torch.float64) for t in tensors]
    ref = ref_fn(*ref_in)
    torch_in = [_leaf(t.cpu()) for t in tensors]
    torch_out = torch_fn(*torch_in)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, torch_out.detach(), "out")
    dy = grad_out(ref.shape, dtype)
    got = torch.autograd.grad(out, tensors, dy.to(DEVICE, dtype))
    want = torch.autograd.grad(ref, ref_in, dy)
    torch_grads = torch.autograd.grad(torch_out, torch_in, dy.to(dtype))
    for i, (g, w, t) in enumerate(zip(got, want, torch_grads)):
        assert g.shape == w.shape
        assert_close(g, w, dtype if i == 0 else tensors[i].dtype, t, f"grad {i}")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 1), (7, 3), (5, 1000), (3, 4097), (33, 64)], ids=str)
def test_layer_norm(rows, hidden, dtype, backend):
    x, w, b = randn(rows, hidden, dtype=dtype), randn(hidden, dtype=dtype), randn(hidden, dtype=dtype)
    tensors = [t.requires_grad_() for t in (x, w, b)]
    with fastattn.backend(backend):
        _check(
            lambda x, w, b: fastattn.layer_norm(x, (hidden,), w, b, 1e-5),
            lambda x, w, b: ref_layer_norm(x, w, b, 1e-5),
            lambda x, w, b: F.layer_norm(x, (hidden,), w, b, 1e-5),
            tensors, dtype,
        )  # fmt: skip


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 1), (7, 3), (5, 1000), (3, 4097)], ids=str)
def test_rms_norm(rows, hidden, dtype, backend):
    x, w = randn(rows, hidden, dtype=dtype), randn(hidden, dtype=dtype)
    eps = torch.finfo(dtype).eps
    with fastattn.backend(backend):
        _check(
            lambda x, w: fastattn.rms_norm(x, (hidden,), w),
            lambda x, w: ref_rms_norm(x, w, eps),
            lambda x, w: F.rms_norm(x, (hidden,), w),
            [x.requires_grad_(), w.requires_grad_()], dtype,
        )  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(3, 257), (2, 1000), (2, 4097), (2, 8192)], ids=str)
def test_single_tile_rows_of_the_gpu_widths(rows, hidden, dtype, monkeypatch):
    """Rows of 257..8192 elements in one tile, as a GPU runs them (the interpreter otherwise walks rows wider
    than 256 in tiles), layer norm and RMSNorm, forward and backward."""
    from fastattn.ops.norm import launch as norm_launch

    monkeypatch.setattr(norm_launch, "INTERPRETER_TILE", norm_launch.MAX_TILE)
    assert norm_launch._tile(hidden) == (triton.next_power_of_2(hidden), 1)
    x, w, b = randn(rows, hidden, dtype=dtype), randn(hidden, dtype=dtype), randn(hidden, dtype=dtype)
    with fastattn.backend("triton"):
        _check(
            lambda x, w, b: fastattn.layer_norm(x, (hidden,), w, b, 1e-5),
            lambda x, w, b: ref_layer_norm(x, w, b, 1e-5),
            lambda x, w, b: F.layer_norm(x, (hidden,), w, b, 1e-5),
            [t.requires_grad_() for t in (x, w, b)], dtype,
        )  # fmt: skip
        _check(
            lambda x, w: fastattn.rms_norm(x, (hidden,), w, 1e-6),
            lambda x, w: ref_rms_norm(x, w, 1e-6),
            lambda x, w: F.rms_norm(x, (hidden,), w, 1e-6),
            [x.detach().requires_grad_(), w.detach().requires_grad_()], dtype,
        )  # fmt: skip


def test_fp32_weights_with_bf16_activations_and_3d_input():
    x = randn(2, 5, 96, dtype=torch.bfloat16).requires_grad_()
    w, b = randn(96).requires_grad_(), randn(96).requires_grad_()
    with fastattn.backend("triton"):
        out = fastattn.layer_norm(x, (96,), w, b)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, w, b)]
    ref = ref_layer_norm(*leaves, 1e-5)
    dy = grad_out(ref.shape, torch.bfloat16)
    # torch's own layer norm takes the same mix (bf16 input, fp32 parameters) on the CPU
    torch_out, torch_grads = torch_result(lambda x, w, b: F.layer_norm(x, (96,), w, b), [x.cpu(), w.cpu(), b.cpu()], dy)
    assert_close(out, ref, torch.bfloat16, torch_out, "out")
    g = torch.autograd.grad(out, (x, w, b), dy.to(DEVICE, torch.bfloat16))
    assert g[1].dtype == torch.float32 and g[2].dtype == torch.float32
    want = torch.autograd.grad(ref, leaves, dy)
    assert_close(g[0], want[0], torch.bfloat16, torch_grads[0], "dx")
    for name, a, b_, t in zip(("dw", "db"), g[1:], want[1:], torch_grads[1:]):
        assert_close(a, b_, torch.float32, t, name)


def test_multi_dim_normalized_shape_and_no_affine():
    x = randn(3, 4, 5).requires_grad_()
    with fastattn.backend("triton"):
        out = fastattn.layer_norm(x, (4, 5))
    ref = ref_layer_norm(x.detach().cpu().reshape(3, 20), None, None, 1e-5).reshape(3, 4, 5)
    assert_close(out, ref, torch.float32, None, "out")


def test_non_contiguous_rows():
    base = randn(6, 2, 40)
    x = base[:, 1]  # rows 80 elements apart
    assert not x.is_contiguous()
    w = randn(40)
    with fastattn.backend("triton"):
        out = fastattn.rms_norm(x, 40, w, 1e-6)
    assert_close(out, ref_rms_norm(x.cpu(), w.cpu(), 1e-6), torch.float32, None, "out")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("hidden", [64, 1000], ids=str)
def test_add_norm(kind, hidden, backend):
    x, r = randn(9, hidden).requires_grad_(), randn(9, hidden).requires_grad_()
    w, b = randn(hidden).requires_grad_(), randn(hidden).requires_grad_()
    with fastattn.backend(backend):
        if kind == "layer":
            y, s = fastattn.add_layer_norm(x, r, (hidden,), w, b, 1e-5)
        else:
            y, s = fastattn.add_rms_norm(x, r, (hidden,), w, 1e-6)
    leaves = [_leaf(t.cpu(), torch.float64) for t in (x, r, w, b)]
    s_ref = leaves[0] + leaves[1]
    y_ref = (
        ref_layer_norm(s_ref, leaves[2], leaves[3], 1e-5) if kind == "layer" else ref_rms_norm(s_ref, leaves[2], 1e-6)
    )
    assert_close(s, s_ref, torch.float32, None, "sum")
    assert_close(y, y_ref, torch.float32, None, "out")
    # Both outputs carry gradient (the sum feeds the next residual in a pre-norm block).
    dy, ds = torch.randn_like(y_ref), torch.randn_like(s_ref)
    inputs = (x, r, w, b) if kind == "layer" else (x, r, w)
    got = torch.autograd.grad((y, s), inputs, (dy.to(DEVICE, torch.float32), ds.to(DEVICE, torch.float32)))
    want = torch.autograd.grad((y_ref, s_ref), leaves[: len(inputs)], (dy, ds))
    for name, g, w_ in zip(["x", "residual", "weight", "bias"], got, want):
        assert_close(g, w_, torch.float32, None, f"grad {name}")


def test_add_norm_dropout_mask_shared_by_forward_and_backward():
    p = 0.25
    x, r = randn(16, 256).requires_grad_(), randn(16, 256)
    torch.manual_seed(5)
    with fastattn.backend("triton"):
        y, s = fastattn.add_layer_norm(x, r, 256, dropout_p=p)
    kept = (s - r).detach() != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.03
    torch.testing.assert_close((s - r)[kept], (x / (1 - p))[kept])
    (dx,) = torch.autograd.grad(s.sum(), x)  # ds = 1: dx = keep / (1 - p)
    torch.testing.assert_close(dx, kept.float() / (1 - p))
    torch.manual_seed(5)
    with fastattn.backend("triton"):
        _, s2 = fastattn.add_layer_norm(x, r, 256, dropout_p=p)
    assert torch.equal(s, s2), "the same seed must give the same mask"
    with fastattn.backend("triton"):
        _, s3 = fastattn.add_layer_norm(x, r, 256, dropout_p=p, training=False)
    torch.testing.assert_close(s3, x + r)


@pytest.mark.skipif(
    DEVICE.type != "cuda",
    reason="cannot fail in the interpreter, which runs programs one after another; on the CPU, "
    "test_codegen.py::test_no_kernel_uses_atomics shows the order cannot matter",
)
def test_weight_gradient_is_deterministic_on_a_gpu():
    """Programs run concurrently on a GPU: the same dW/dB bits on every run (many rows, many programs)."""
    x, w, b = randn(8192, 1024).requires_grad_(), randn(1024).requires_grad_(), randn(1024).requires_grad_()
    dy = randn(8192, 1024)
    with fastattn.backend("triton"):
        g1 = torch.autograd.grad(fastattn.layer_norm(x, 1024, w, b), (w, b), dy)
        g2 = torch.autograd.grad(fastattn.layer_norm(x, 1024, w, b), (w, b), dy)
    assert all(torch.equal(a, c) for a, c in zip(g1, g2))


@pytest.mark.parametrize(
    "cls,kw",
    [
        (nn.LayerNorm, {}),
        (nn.LayerNorm, {"elementwise_affine": False}),
        (nn.LayerNorm, {"bias": False}),
        (nn.RMSNorm, {}),
        (nn.RMSNorm, {"eps": 1e-6}),
        (nn.RMSNorm, {"elementwise_affine": False}),
    ],
    ids=["ln", "ln-no-affine", "ln-no-bias", "rms", "rms-eps", "rms-no-affine"],
)
def test_modules_are_drop_ins(cls, kw):
    ours_cls = fastattn.LayerNorm if cls is nn.LayerNorm else fastattn.RMSNorm
    ref, ours = cls(48, **kw).to(DEVICE), ours_cls(48, **kw).to(DEVICE)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = randn(4, 6, 48)
    with fastattn.backend("triton"):
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_errors_like_torch():
    x = randn(4, 8)
    cases = [(F.layer_norm, fastattn.layer_norm, s) for s in [(7,), (4, 8, 1), (2, 8)]]
    cases += [(F.rms_norm, fastattn.rms_norm, s) for s in [(7,), (4, 8, 1), (2, 8)]]
    for torch_fn, ours, shape in cases:
        with pytest.raises(Exception) as torch_exc:
            torch_fn(x, shape)
        with pytest.raises(torch_exc.type):
            ours(x, shape)
    with pytest.raises(RuntimeError, match="weight"):
        fastattn.layer_norm(x, (8,), randn(7))
    with pytest.raises(ValueError, match="residual"):
        fastattn.add_rms_norm(x, randn(4, 7), 8)
    with pytest.raises(ValueError, match="dropout_p"):
        fastattn.add_layer_norm(x, x, 8, dropout_p=1.0)


def test_widest_rows():
    """Hidden size 65536: rows walked in tiles (three passes forward, per-program dW/dB rows backward)."""
    x, w, b = (t.requires_grad_() for t in (randn(2, 65536), randn(65536), randn(65536)))
    with fastattn.backend("triton"):
        _check(
            lambda x, w, b: fastattn.layer_norm(x, 65536, w, b),
            lambda x, w, b: ref_layer_norm(x, w, b, 1e-5),
            lambda x, w, b: F.layer_norm(x, (65536,), w, b),
            [x, w, b], torch.float32,
        )  # fmt: skip
