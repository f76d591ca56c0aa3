"""The Gluon attention kernels (fastattn.backend("gluon")), run by the Gluon emulator on the CPU (and by the
GPU on sm_90): every case they take, forward and backward, against float64 within the low-precision rule of
tests/helpers.py against torch's own SDPA on the same inputs; kernel_log shows the Gluon kernels ran (at head
dim 256 the backward is the Triton one, with a one-time warning). Planted synchronization bugs (a dropped
mbarrier wait) are caught by the emulator."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from helpers import DEVICE, assert_close, grad_out, randn, reference, torch_sdpa

import fastattn
from fastattn import _torch

pytest.importorskip("triton.experimental.gluon")

if DEVICE.type == "cuda" and torch.cuda.get_device_capability(DEVICE)[0] != 9:
    pytest.skip("the Gluon kernels are written for sm_90", allow_module_level=True)


def _run(q, k, v, **kw):
    with fastattn.backend("gluon"), fastattn.kernel_log() as log:
        out, lse = fastattn.attention(q, k, v, return_lse=True, **kw)
    assert log == [("attention_fwd", "attention_fwd_gluon_kernel", "gluon")], log
    return out, lse


CASES = [
    # (N, H, H_kv, L, S, E), attention() keywords
    pytest.param((1, 2, 2, 128, 128, 64), {}, id="d64"),
    pytest.param((1, 2, 1, 100, 257, 128), {"causal": True}, id="d128-causal-bottom-right-ragged-gqa"),
    pytest.param((2, 1, 1, 70, 33, 256), {"causal": True}, id="d256-causal-L>S-empty-rows"),
    pytest.param((1, 4, 1, 96, 200, 64), {"window": (40, 8)}, id="d64-window-mqa"),
    pytest.param((1, 2, 2, 190, 190, 128), {"window": (31, None)}, id="d128-window-left"),
    pytest.param((1, 2, 1, 129, 300, 64), {"window": (None, 20)}, id="d64-window-right-ragged"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape,kw", CASES)
def test_gluon_forward_and_backward(shape, kw, dtype):
    N, H, HK, L, S, E = shape
    q = randn(N, H, L, E, dtype=dtype, requires_grad=True)
    k, v = randn(N, HK, S, E, dtype=dtype, requires_grad=True), randn(N, HK, S, E, dtype=dtype, requires_grad=True)
    out, lse = _run(q, k, v, **kw)
    left, right = kw.get("window", (None, None))
    if kw.get("causal"):
        right = 0
    ref_in = [x.detach().double().cpu().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = reference(*ref_in, offset=S - L, left=left, right=right)
    # torch's own SDPA in this dtype with the same visibility: the yardstick of the low-precision rule.
    i, j = torch.arange(L)[:, None] + S - L, torch.arange(S)[None, :]
    keep = torch.ones(L, S, dtype=torch.bool)
    keep &= (j >= i - left) if left is not None else keep
    keep &= (j <= i + right) if right is not None else keep
    leaves = [x.detach().cpu().requires_grad_() for x in (q, k, v)]
    theirs = torch_sdpa(*leaves, keep, enable_gqa=True)
    theirs = torch.where(keep.any(-1)[:, None], theirs, 0.0)  # rows with no visible key: 0, as documented
    assert_close(out, ref, dtype, theirs, "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert ((lse.cpu()[finite].double() - ref_lse[finite]).abs().max() < 1e-4).item()
    dout = grad_out(ref.shape, dtype)
    with fastattn.kernel_log() as log, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # head dim 256: the one-time step down to Triton
        got = torch.autograd.grad(out, (q, k, v), dout.to(DEVICE, dtype))
    bwd = "attention_bwd_gluon_kernel" if E <= 128 else "_attention_bwd_dkdv_kernel"
    assert bwd in [e.kernel for e in log], log
    want = torch.autograd.grad(ref, ref_in, dout)
    mine = torch.autograd.grad(theirs, leaves, dout.to(dtype))
    for name, g, w, t in zip("qkv", got, want, mine):
        assert_close(g, w, dtype, t, f"d{name}")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="not taken by the dispatch yet: checked in the emulator only")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_head_dim_256_backward_in_the_emulator(causal):
    """The SPLIT_D backward (d=256: the consumers split dK/dV columns and exchange partial S^T / dP^T through
    shared memory), launched directly: the dispatch does not take it yet (it spills 2 words on sm_90)."""
    from fastattn.ops.attention.gluon import attention_bwd_gluon, attention_fwd_gluon
    from fastattn.ops.attention.spec import MaskSpec

    L, S = 40, 70
    q, k, v = randn(1, 2, L, 256, dtype=torch.bfloat16), *(randn(1, 1, S, 256, dtype=torch.bfloat16) for _ in "kv")
    mask = MaskSpec(S - L, None, 0 if causal else None)
    out, lse = attention_fwd_gluon(q, k, v, 256**-0.5, mask)
    dout = grad_out(out.shape, torch.bfloat16)
    got = attention_bwd_gluon(dout.to(torch.bfloat16), q, k, v, out, lse, 256**-0.5, mask)
    ref_in = [x.double().requires_grad_() for x in (q, k, v)]
    ref, _ = reference(*ref_in, offset=S - L, right=mask.right)
    want = torch.autograd.grad(ref, ref_in, dout)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    keep = torch.ones(L, S, dtype=torch.bool) if not causal else torch.ones(L, S, dtype=torch.bool).tril(S - L)
    mine = torch.autograd.grad(torch_sdpa(*leaves, keep, enable_gqa=True), leaves, dout.to(torch.bfloat16))
    for name, g, w, t in zip("qkv", got, want, mine):
        assert_close(g, w, torch.bfloat16, t, f"d{name}")


def test_sdpa_drop_in_takes_the_gluon_kernel():
    q, k, v = (randn(2, 2, 65, 128, dtype=torch.bfloat16) for _ in range(3))
    with fastattn.backend("gluon"), fastattn.kernel_log() as log:
        out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)  # top-left, as torch's
    assert log == [("attention_fwd", "attention_fwd_gluon_kernel", "gluon")]
    ref = _torch.scaled_dot_product_attention(*(x.double().cpu() for x in (q, k, v)), is_causal=True)
    assert_close(out, ref, torch.bfloat16, _torch.scaled_dot_product_attention(q, k, v, is_causal=True), "out")


@pytest.mark.parametrize(
    "dtype,E,why",
    [(torch.float32, 64, "float16 and bfloat16"), (torch.bfloat16, 96, "head dims (64, 128, 256)")],
    ids=["fp32", "d96"],
)
def test_cases_it_does_not_take_step_down_with_the_reason(dtype, E, why):
    q = randn(1, 2, 40, E, dtype=dtype)
    with fastattn.backend("gluon"), fastattn.kernel_log() as log, pytest.warns(RuntimeWarning, match=re.escape(why)):
        fastattn._backend._warned.clear()
        fastattn.scaled_dot_product_attention(q, q, q)
    assert [e.backend for e in log] == ["triton"]


def _barrier_line(name: str, kernel: str) -> int:
    """The source line of ``kernel`` (module fastattn.ops.attention.<kernel>) that allocates barrier array
    ``name`` (the emulator names barriers by the line that allocates them)."""
    import importlib

    src = importlib.import_module(f"fastattn.ops.attention.{kernel}")
    lines = open(src.__file__).read().splitlines()
    return next(i + 1 for i, line in enumerate(lines) if line.strip().startswith(f"{name} = gl.allocate_shared"))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the emulator's check: on a GPU a skipped wait is a silent race")
@pytest.mark.parametrize(
    "kernel,barrier",
    [("gluon_fwd", b) for b in ("q_ready", "k_ready", "v_ready", "kv_empty")]
    + [("gluon_bwd", b) for b in ("kv_ready", "qdo_ready", "qdo_empty")],
)
def test_a_skipped_wait_is_caught(monkeypatch, kernel, barrier):
    """Drop the first wait on one of the kernel's barrier arrays that orders something (not the free pass of
    a fresh ring): the emulator reports the race (or the deadlock that follows), whether or not this run's
    interleaving happened to have the data in place: the accesses are no longer ordered."""
    from fastattn.testing import DeadlockError, RaceError, gluon_emulator

    real, skipped = gluon_emulator._MBARRIER.wait, []
    where = f"{kernel}.py:{_barrier_line(barrier, kernel)}["

    def wait(bar, phase, pred=True, deps=()):
        b = gluon_emulator._barrier(bar)
        free_pass = b.completed == 0 and int(phase) & 1 == 1  # the first pass over a ring waits on nothing
        if not skipped and where in b.name and not free_pass:
            skipped.append(b.name)
            return None
        return real(bar, phase, pred, deps)

    monkeypatch.setattr(gluon_emulator._MBARRIER, "wait", wait)
    q = randn(1, 1, 128, 64, dtype=torch.bfloat16, requires_grad=True)
    k, v = (randn(1, 1, 640, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    with pytest.raises((RaceError, DeadlockError)):
        with fastattn.backend("gluon"):
            out = fastattn.attention(q, k, v)
            out.backward(torch.randn_like(out))  # (out.sum()'s stride-0 gradient would go to Triton)
    assert skipped, "no wait on that barrier was dropped"


def test_info_reports_the_gluon_backend():
    report = fastattn.info()["gluon_backend"]
    assert report["usable"] is True, report  # here: the emulator on the CPU, or an sm_90 GPU (module skip)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the emulator's check: on a GPU a skipped wait is a silent race")
def test_a_skipped_exchange_wait_is_caught(monkeypatch):
    """The d=256 backward's consumers hand partial sums over on the xchg barriers: drop the first of those
    waits and the emulator reports the read of the other consumer's partial as unordered."""
    from fastattn.ops.attention.gluon import attention_bwd_gluon, attention_fwd_gluon
    from fastattn.ops.attention.spec import MaskSpec
    from fastattn.testing import DeadlockError, RaceError, gluon_emulator

    real, skipped = gluon_emulator._MBARRIER.wait, []
    where = f"gluon_bwd.py:{_barrier_line('xchg', 'gluon_bwd')}["

    def wait(bar, phase, pred=True, deps=()):
        if not skipped and where in gluon_emulator._barrier(bar).name:
            skipped.append(1)
            return None
        return real(bar, phase, pred, deps)

    q, k, v = (randn(1, 1, 32, 256, dtype=torch.bfloat16) for _ in range(3))
    out, lse = attention_fwd_gluon(q, k, v, 0.0625, MaskSpec())
    monkeypatch.setattr(gluon_emulator._MBARRIER, "wait", wait)
    with pytest.raises((RaceError, DeadlockError), match="xs|shared buffer"):
        attention_bwd_gluon(torch.randn_like(q), q, k, v, out, lse, 0.0625, MaskSpec())
    assert skipped


def test_gluon_path_compiles_whole():
    """Under torch.compile(fullgraph=True) the Gluon choice is made from shapes and dtypes while tracing (the
    data layout is read when the op runs), with no graph break; the compiled call runs the Gluon kernel."""
    q, k, v = (randn(1, 2, 64, 64, dtype=torch.bfloat16) for _ in range(3))

    def fn(q, k, v):
        return fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)

    torch._dynamo.reset()
    with fastattn.backend("gluon"):
        explanation = torch._dynamo.explain(fn)(q, k, v)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        with fastattn.kernel_log() as log:
            out = compiled(q, k, v)
        want = fn(q, k, v)
    assert ("attention_fwd", "attention_fwd_gluon_kernel", "gluon") in log
    assert torch.equal(out, want)  # the same kernel on the same inputs, compiled or not
    ref = _torch.scaled_dot_product_attention(*(x.double().cpu() for x in (q, k, v)), is_causal=True)
    assert_close(out, ref, torch.bfloat16, _torch.scaled_dot_product_attention(q, k, v, is_causal=True), "out")


def test_a_layout_the_copy_engine_cannot_take_steps_down_when_the_op_runs():
    q = randn(1, 4, 40, 64, dtype=torch.bfloat16)
    kv = randn(1, 1, 40, 64, dtype=torch.bfloat16).expand(1, 4, 40, 64)  # stride 0 along the heads
    fastattn._backend._warned.clear()
    with fastattn.backend("gluon"), fastattn.kernel_log() as log, pytest.warns(RuntimeWarning, match="copy engine"):
        out = fastattn.scaled_dot_product_attention(q, kv, kv)
    assert [e.backend for e in log] == ["triton"]
    ref = _torch.scaled_dot_product_attention(q.double(), kv.double(), kv.double())
    assert_close(out, ref, torch.bfloat16, _torch.scaled_dot_product_attention(q, kv, kv), "out")
