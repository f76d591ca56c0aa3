"""What a user meets when fastattn replaces torch's attention: the global drop-in (``F.scaled_dot_product_attention
= fastattn.scaled_dot_product_attention``) keeps torch's own function behind the fallback, torch's ``CausalBias``
runs on the kernels as the matching causal rule, other tensor subclasses dispatch through
``__torch_function__``, the modules script, no public name hides a module, and the smaller defects stay fixed."""

from __future__ import annotations

import importlib
import io
import pkgutil
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import DEVICE, assert_close, randn
from torch.nn.attention.bias import causal_lower_right, causal_upper_left
from torch.overrides import TorchFunctionMode

import fastattn
import fastattn._attention as api
from fastattn import _backend, _torch


@pytest.fixture
def fresh_warnings(monkeypatch):
    """warn_once forgets what it said, so each test sees its own one-time warnings."""
    monkeypatch.setattr(_backend, "_warned", set())


@pytest.fixture
def global_drop_in(monkeypatch):
    """The usual global swap of torch's functional names and modules for fastattn's."""
    monkeypatch.setattr(F, "scaled_dot_product_attention", fastattn.scaled_dot_product_attention)
    monkeypatch.setattr(F, "layer_norm", fastattn.layer_norm)
    monkeypatch.setattr(F, "rms_norm", fastattn.rms_norm)
    monkeypatch.setattr(nn, "MultiheadAttention", fastattn.MultiheadAttention)


def _sdpa_ref(q, k, v, keep=None, is_causal=False):
    """torch's SDPA in float64 on the CPU, with an explicit bool mask: the reference."""
    ins = [t.detach().double().cpu() for t in (q, k, v)]
    return _torch.scaled_dot_product_attention(*ins, None if keep is None else keep.cpu(), is_causal=is_causal)


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_fallback_keeps_torchs_function_after_a_global_drop_in(global_drop_in, backend):
    """With torch's names pointing at fastattn, every path still ends in torch's own implementation or in
    fastattn's kernels: no recursion (it had surfaced as RecursionError or as a bogus mask error)."""
    q, k, v = randn(2, 3, 9, 16), randn(2, 3, 11, 16), randn(2, 3, 11, 16)
    keep = (torch.rand(9, 11) > 0.3).to(DEVICE)
    with fastattn.backend(backend):
        out = F.scaled_dot_product_attention(q, k, v, keep)
        empty = F.scaled_dot_product_attention(q[:, :, :0], k, v)  # torch's path: the kernels take no empty input
        y = F.layer_norm(q, (16,))
        mha = _torch.TorchMultiheadAttention(16, 2, batch_first=True).to(DEVICE)  # training: torch's composed path,
        x = randn(2, 5, 16)
        mha(x, x, x, need_weights=False)  # which calls F.scaled_dot_product_attention (now fastattn's)
    assert_close(out, _sdpa_ref(q, k, v, keep), torch.float32, None, "out")
    assert empty.shape == (2, 3, 0, 16)
    assert_close(y, _torch.layer_norm(q.double(), (16,)), torch.float32, None, "layer_norm")


def test_broadcast_check_is_not_a_catch_all(monkeypatch):
    """A failure inside the mask check is not reported as a shape mismatch (RecursionError is a RuntimeError).
    The kernels' path: the PyTorch path leaves the checks to torch's op."""
    monkeypatch.setattr(api, "_broadcasts", lambda *a: (_ for _ in ()).throw(RecursionError("deep")))
    q = randn(1, 1, 4, 8)
    with pytest.raises(RecursionError), fastattn.backend("triton"):
        fastattn.scaled_dot_product_attention(q, q, q, torch.ones(4, 4, dtype=torch.bool, device=DEVICE))


CAUSAL_BIASES = [
    pytest.param(causal_upper_left, 7, 12, id="upper-left-L<S"),
    pytest.param(causal_upper_left, 12, 7, id="upper-left-L>S"),
    pytest.param(causal_lower_right, 7, 12, id="lower-right-L<S"),
    pytest.param(causal_lower_right, 12, 7, id="lower-right-L>S"),
    pytest.param(causal_lower_right, 9, 9, id="lower-right-square"),
]


@pytest.mark.parametrize("backend", ["triton", "auto"])
@pytest.mark.parametrize("make,L,S", CAUSAL_BIASES)
def test_causal_bias_runs_as_the_matching_causal_rule(monkeypatch, make, L, S, backend):
    """torch's CausalBias has no data: it must become the kernels' causal rule (top-left or bottom-right),
    never be read as a dense mask (it had given garbage output on the kernel path)."""
    seen = []
    real = api.attention_forward
    monkeypatch.setattr(api, "attention_forward", lambda *a, **k: seen.append(a) or real(*a, **k))
    q = randn(2, 2, L, 16, requires_grad=True)
    k, v = randn(2, 2, S, 16, requires_grad=True), randn(2, 2, S, 16, requires_grad=True)
    bias = make(L, S)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Lower right causal bias will produce NaNs")
        with fastattn.backend(backend):
            out = fastattn.scaled_dot_product_attention(q, k, v, bias)
    offset = 0 if make is causal_upper_left else S - L
    keep = torch.ones(L, S, dtype=torch.bool).tril(offset)
    ref = _sdpa_ref(q, k, v, keep)
    ref = torch.where(keep.any(-1)[:, None], ref, 0.0)  # rows with no key: 0, as fastattn documents
    assert_close(out, ref, torch.float32, None, "out")
    if backend == "triton":
        assert len(seen) == 1
        bias4, spec = seen[0][4], seen[0][6]
        assert bias4 is None and (spec.offset, spec.left, spec.right) == (offset, None, 0)
        dq = torch.autograd.grad(out.sum(), q)[0]
        assert not torch.isnan(dq).any()


def test_causal_bias_errors_like_torch():
    q = randn(1, 1, 5, 8)
    for make in (causal_upper_left, causal_lower_right):
        with pytest.raises(ValueError, match="is_causal"):
            fastattn.scaled_dot_product_attention(q, q, q, make(5, 5), is_causal=True)


class _Tagged(torch.Tensor):
    """A tensor subclass that handles fastattn's SDPA itself, as subclasses do for torch's."""

    calls: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is fastattn.scaled_dot_product_attention:
            cls.calls.append(func)
            return "handled"
        return super().__torch_function__(func, types, args, kwargs or {})


def test_tensor_subclasses_and_modes_dispatch_through_torch_function():
    q = randn(1, 1, 4, 8)
    tagged = q.as_subclass(_Tagged)
    _Tagged.calls.clear()
    assert fastattn.scaled_dot_product_attention(q, tagged, q) == "handled"
    assert fastattn.scaled_dot_product_attention(q, q, q, attn_mask=tagged) == "handled"
    assert _Tagged.calls == [fastattn.scaled_dot_product_attention] * 2

    class Record(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.funcs = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.funcs.append(func)
            return func(*args, **(kwargs or {}))

    with Record() as mode:
        out = fastattn.scaled_dot_product_attention(q, q, q)
    assert fastattn.scaled_dot_product_attention in mode.funcs
    assert_close(out, _sdpa_ref(q, q, q), torch.float32, None, "out under a mode")


def test_modules_script_as_torchs_do(fresh_warnings):
    """torch.jit.script compiles torch's computation (TorchScript cannot compile fastattn's Python dispatch) and
    says so once; eager calls keep running fastattn. Patched models script and save too."""
    torch.manual_seed(0)
    mha = fastattn.MultiheadAttention(128, 8, kdim=256, vdim=256).to(DEVICE)
    with pytest.warns(RuntimeWarning, match="TorchScript cannot compile"):
        scripted = torch.jit.script(mha)
    x, kv = randn(5, 2, 128), randn(7, 2, 256)
    for need_weights in (False, True):
        a, wa = scripted(x, kv, kv, need_weights=need_weights)
        b, wb = mha(x, kv, kv, need_weights=need_weights)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert (wa is None) == (wb is None)
    model = nn.Transformer(32, 4, 1, 1, 64, dropout=0.0).to(DEVICE).eval()
    fastattn.patch(model)
    saved = io.BytesIO()
    torch.jit.save(torch.jit.script(model), saved)
    assert type(model.encoder.layers[0].self_attn) is fastattn.MultiheadAttention  # the eager model is unchanged
    src, tgt = randn(6, 2, 32), randn(4, 2, 32)
    loaded = torch.jit.load(io.BytesIO(saved.getvalue()))
    torch.testing.assert_close(loaded(src, tgt), model(src, tgt), rtol=1e-4, atol=1e-5)
    for norm in (fastattn.LayerNorm(16), fastattn.RMSNorm(16)):
        y = randn(3, 16)
        torch.testing.assert_close(torch.jit.script(norm.to(DEVICE))(y), norm(y), rtol=1e-4, atol=1e-5)


def test_no_public_name_shadows_a_module():
    """``import fastattn.<module>`` must not rebind a public name (``fastattn.attention`` had been the module
    after such an import, ``fastattn.info`` and ``fastattn.patch`` likewise)."""
    submodules = {m.name for m in pkgutil.iter_modules(fastattn.__path__)}
    assert not submodules & set(fastattn.__all__), submodules & set(fastattn.__all__)
    before = {name: getattr(fastattn, name) for name in fastattn.__all__}
    for name in sorted(submodules - {"__main__", "hf", "codegen"}):  # hf needs transformers; codegen compiles
        importlib.import_module(f"fastattn.{name}")
    assert all(getattr(fastattn, name) is obj for name, obj in before.items())
    assert callable(fastattn.attention) and callable(fastattn.info) and callable(fastattn.patch)


def test_alibi_slopes_on_the_query_device():
    slopes = fastattn.alibi_slopes(8, device="meta")
    assert slopes.device.type == "meta" and slopes.dtype == torch.float32
    q = randn(1, 8, 4, 16)
    with pytest.raises(ValueError, match=r"alibi_slopes is on meta.*device=q.device"):
        fastattn.attention(q, q, q, alibi_slopes=slopes)
    fastattn.attention(q, q, q, alibi_slopes=fastattn.alibi_slopes(8, device=q.device))


class _Largest(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest storage (in elements) of a tensor any op returns: views, expanded ones included, count
    as the memory under them."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 13, 40), (1, 3, 1, 1, 40), (13, 40)], ids=str)
def test_5d_inputs_keep_a_broadcast_mask_broadcast(mask_shape):
    """(B1, B2, H, L, E) inputs with a mask broadcast over some batch dims: the mask is never copied out to the
    full (B1, B2, H, L, S) scores (it had been, 768x its size in one case), and the result is right."""
    q, k, v = randn(2, 3, 4, 13, 8), randn(2, 3, 4, 40, 8), randn(2, 3, 4, 40, 8)
    keep = (torch.rand(mask_shape) > 0.3).to(DEVICE)
    with fastattn.backend("triton"), _Largest() as record:
        out = fastattn.scaled_dot_product_attention(q, k, v, keep)
    full_scores = 2 * 3 * 4 * 13 * 40
    assert record.largest < full_scores, f"a tensor of {record.largest} elements (the scores: {full_scores})"
    assert_close(out, _sdpa_ref(q, k, v, keep.expand(2, 3, 4, 13, 40)), torch.float32, None, "out")


@pytest.mark.parametrize("which", ["decode", "varlen"])
def test_cuda_backend_says_when_triton_runs_instead(fresh_warnings, which):
    """The CUDA C++ kernels have no decoding or packed-sequence kernels: under fastattn.backend("cuda") the
    Triton kernels run, and a one-time warning says so (it had been silent)."""
    if DEVICE.type != "cuda" and not _backend.interpreting():
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    q = randn(2, 2, 1, 16)
    with fastattn.backend("cuda"), pytest.warns(RuntimeWarning, match=f"have no {which}"):
        if which == "decode":
            cache = randn(2, 2, 8, 16)
            lengths = torch.tensor([3, 8], dtype=torch.int32, device=DEVICE)
            fastattn.decode_attention(q, cache, cache, lengths)
        else:
            x = randn(7, 2, 16)
            cu = torch.tensor([0, 3, 7], dtype=torch.int32, device=DEVICE)
            fastattn.varlen_attention(x, x, x, cu, cu, 4, 4)
