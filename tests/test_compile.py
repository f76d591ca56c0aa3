"""torch.compile, autocast and CUDA graphs. The ops are torch.library custom ops (fake implementations,
registered autograd), so torch.compile(fullgraph=True) traces models built on them without graph breaks,
forward and backward, on the PyTorch path and on the kernels (Triton interpreter here)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from helpers import DEVICE, assert_close, randn

import fastattn
from fastattn.models import GPT

BACKENDS = ["torch", "triton"]


def _explain(fn, *args):
    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args)


def _compiled_matches_eager(fn, inputs, backend: str, compiler: str = "aot_eager"):
    """fullgraph compile (no graph break allowed), then outputs and input gradients equal eager's."""
    torch._dynamo.reset()
    with fastattn.backend(backend):
        explanation = _explain(fn, *inputs)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        compiled = torch.compile(fn, fullgraph=True, backend=compiler)
        out = compiled(*inputs)
        want = fn(*inputs)
    assert_close(out, want.double(), torch.float32, None, "compiled output")
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    dy = torch.randn_like(want)
    with fastattn.backend(backend):
        got = torch.autograd.grad(out, leaves, dy)
        ref = torch.autograd.grad(want, leaves, dy)
    for g, r in zip(got, ref):
        assert_close(g, r.double(), torch.float32, None, "compiled gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_ops_compile_without_graph_breaks(backend):
    q, k, v = (randn(1, 4, 24, 16, requires_grad=True) for _ in range(3))
    bias = randn(24, 24, requires_grad=True)

    def fn(q, k, v, bias):
        a = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
        b = fastattn.attention(q, k[:, :2], v[:, :2], bias=bias, window=(8, 0))
        return a + b

    _compiled_matches_eager(fn, (q, k, v, bias), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_norm_and_encoding_ops_compile_without_graph_breaks(backend):
    x, r = randn(2, 10, 32, requires_grad=True), randn(2, 10, 32, requires_grad=True)
    w, b = randn(32, requires_grad=True), randn(32, requires_grad=True)
    q = randn(2, 4, 10, 16, requires_grad=True)

    def fn(x, r, w, b, q):
        y, s = fastattn.add_layer_norm(x, r, (32,), w, b)
        y = fastattn.rms_norm(fastattn.sinusoidal_encoding(y + s, offset=3), (32,), w)
        qr, kr = fastattn.apply_rotary(q, q, offset=5)
        return y.sum(-1) + (qr * kr).sum((1, 3))

    _compiled_matches_eager(fn, (x, r, w, b, q), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_model_compiles_whole(backend):
    torch.manual_seed(0)
    model = GPT(32, 4, 2, vocab_size=50, kv_heads=2, max_len=32).to(DEVICE)
    idx = torch.randint(0, 50, (2, 12), device=DEVICE)
    with fastattn.backend(backend):
        explanation = _explain(model, idx)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out, want = compiled(idx), model(idx)
        assert_close(out, want.double(), torch.float32, None, "logits")
        compiled(idx).square().mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model(idx).square().mean().backward()
    for g, p in zip(grads, model.parameters()):
        assert_close(g, p.grad.double(), torch.float32, None, "parameter gradient")


def test_inductor_compiles_the_kernel_path():
    """The full compiler (inductor) around the custom ops, not only tracing."""
    q, k, v = (randn(1, 2, 16, 16, requires_grad=True) for _ in range(3))
    _compiled_matches_eager(lambda q, k, v: fastattn.attention(q, k, v, causal=True) * 2, (q, k, v), "triton",
                            compiler="inductor")  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_gives_torchs_dtypes(backend):
    """Under autocast the ops take the dtype torch's own ops take: SDPA in the autocast dtype, norms as
    torch's policy for the device says."""
    device_type = DEVICE.type
    q, k, v = (randn(1, 2, 16, 16) for _ in range(3))
    x, w = randn(4, 32), randn(32)
    with torch.autocast(device_type, dtype=torch.bfloat16), fastattn.backend(backend):
        pairs = [
            (fastattn.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v)),
            (fastattn.attention(q, k, v), F.scaled_dot_product_attention(q, k, v)),
            (fastattn.layer_norm(x, (32,), w), F.layer_norm(x, (32,), w)),
            (fastattn.layer_norm(x.bfloat16(), (32,), w), F.layer_norm(x.bfloat16(), (32,), w)),
            (fastattn.rms_norm(x, (32,), w), F.rms_norm(x, (32,), w)),
        ]
    # float64 references of the same computation on the inputs as each op sees them (SDPA: cast to bf16)
    qd, kd, vd = (t.to(torch.bfloat16).double().cpu() for t in (q, k, v))
    xd, xbd, wd = x.double().cpu(), x.bfloat16().double().cpu(), w.double().cpu()
    sdpa_ref = F.scaled_dot_product_attention(qd, kd, vd)
    refs = [sdpa_ref, sdpa_ref, F.layer_norm(xd, (32,), wd), F.layer_norm(xbd, (32,), wd), F.rms_norm(xd, (32,), wd)]
    for (ours, theirs), ref in zip(pairs, refs):
        assert ours.dtype == theirs.dtype
        assert_close(ours, ref, theirs.dtype, theirs, "autocast result")


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_replays_attention_and_norms(backend):
    q, k, v = (randn(2, 4, 128, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    x, w = randn(256, 512, dtype=torch.bfloat16), randn(512, dtype=torch.bfloat16)

    def step():
        out = fastattn.attention(q, k, v, causal=True)
        out.backward(torch.ones_like(out))
        return out, fastattn.layer_norm(x, (512,), w)

    with fastattn.backend(backend):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside capture: autotuning and first launches happen here
                q.grad = k.grad = v.grad = None
                step()
        torch.cuda.current_stream().wait_stream(stream)
        eager_out, eager_y = (t.clone() for t in step())
        eager_dq = q.grad.clone()
        graph = torch.cuda.CUDAGraph()
        q.grad = k.grad = v.grad = None
        with torch.cuda.graph(graph):
            out, y = step()
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(out, eager_out) and torch.equal(y, eager_y)
    assert torch.allclose(q.grad.float(), eager_dq.float(), atol=1e-2)


@pytest.mark.parametrize("name", ["attention", "attention_sinks", "norm", "sinusoidal", "rotary"])
def test_custom_ops_pass_opcheck(name):
    """torch.library.opcheck: schema, fake implementation against the real one, autograd registration."""
    seed = torch.zeros((), dtype=torch.int64)
    if name.startswith("attention"):
        q, k, v = (randn(1, 2, 12, 16, requires_grad=True) for _ in range(3))
        op = torch.ops.fastattn.attention_fwd.default
        sinks, cap = (randn(2, requires_grad=True), 3.0) if name == "attention_sinks" else (None, None)
        args = (q, k, v, None, None, sinks, None, None, None, seed, 0.25, cap, "", 0, None, 0, 0.0, 0, 10000.0, False,
                0, "triton")  # fmt: skip
    elif name == "norm":
        x, w = randn(6, 32, requires_grad=True), randn(32, requires_grad=True)
        op, args = torch.ops.fastattn.norm_fwd.default, (x, None, w, None, seed, 32, 1e-5, False, 0.0, "triton")
    elif name == "sinusoidal":
        op, args = torch.ops.fastattn.sinusoidal.default, (randn(3, 7, 16, requires_grad=True), 2, 1.5, 1e4, "triton")
    else:
        x = randn(1, 2, 7, 16, requires_grad=True)
        op, args = torch.ops.fastattn.rotary.default, (x, None, 3, 1e4, False, 16, 1.0, "triton")
    torch.library.opcheck(op, args)


def test_autocast_to_float32_keeps_the_parameters(monkeypatch):
    """Where the device's policy runs norms in float32 (CUDA), low-precision inputs go up to float32 and the
    weight and bias come along; the CPU policy never asks for it, so the policy is forced here (inside CPU
    autocast: outside it, the PyTorch path hands the call to torch's op as it is)."""
    from fastattn.ops.norm import function as norm_function

    monkeypatch.setattr(norm_function, "_autocast_dtype", lambda x, shape, is_rms: torch.float32)
    x = randn(6, 32, dtype=torch.bfloat16)
    w, b = randn(32), randn(32)
    for backend in BACKENDS:
        with fastattn.backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
            y = fastattn.layer_norm(x, (32,), w, b)
            r = fastattn.rms_norm(x, (32,), w.bfloat16())
        assert y.dtype == torch.float32 and r.dtype == torch.float32
        assert_close(y, F.layer_norm(x.double(), (32,), w.double(), b.double()), torch.float32, None, "layer norm")
        want = F.rms_norm(x.double(), (32,), w.bfloat16().double(), torch.finfo(torch.float32).eps)
        assert_close(r, want, torch.float32, None, "rms norm")
