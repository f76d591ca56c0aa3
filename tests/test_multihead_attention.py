"""fastattn.MultiheadAttention against torch.nn.MultiheadAttention: same state dict, outputs, weights, gradients
of inputs and every parameter, masks, fully masked rows on both of torch's paths, errors, nested tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from helpers import DEVICE

import fastattn

E, H, N, L, S = 16, 2, 3, 5, 7


def _pair(**kw):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, kw.pop("heads", H), **kw).to(DEVICE)
    ours = fastattn.MultiheadAttention(ref.embed_dim, ref.num_heads, **kw).to(DEVICE)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _inputs(ref, batched=True, self_attn=False, gen_seed=1):
    g = torch.Generator().manual_seed(gen_seed)
    kdim, vdim = ref.kdim, ref.vdim

    def mk(length, dim):
        shape = ((N, length, dim) if ref.batch_first else (length, N, dim)) if batched else (length, dim)
        return torch.randn(shape, generator=g).to(DEVICE)

    if self_attn:
        x = mk(L, E)
        return x, x, x
    return mk(L, E), mk(S, kdim), mk(S, vdim)


def _masks(kind, batched=True, self_attn=False, heads=H):
    g = torch.Generator().manual_seed(2)
    s = L if self_attn else S
    n = N if batched else 1
    kpm_bool = torch.rand(n, s, generator=g) > 0.7
    kpm_bool[:, 0] = False  # every batch keeps a key: fully masked rows have their own tests
    am_bool = torch.rand(L, s, generator=g) > 0.8
    am_bool[:, 0] = False
    masks = {
        "none": {},
        "kpm-bool": {"key_padding_mask": kpm_bool},
        "kpm-float": {"key_padding_mask": torch.zeros(n, s).masked_fill(kpm_bool, float("-inf"))},
        "am-2d-bool": {"attn_mask": am_bool},
        "am-2d-float": {"attn_mask": torch.randn(L, s, generator=g)},
        "am-3d-bool": {"attn_mask": torch.rand(n * heads, L, s, generator=g) > 0.8},
        "kpm+am": {"key_padding_mask": kpm_bool, "attn_mask": am_bool},
        "causal": {"attn_mask": nn.Transformer.generate_square_subsequent_mask(L), "is_causal": True},
    }[kind]
    out = {}
    for name, m in masks.items():
        if name == "key_padding_mask" and not batched:
            m = m[0]
        out[name] = m.to(DEVICE) if isinstance(m, torch.Tensor) else m
    return out


def _compare(ref, ours, args, kwargs, grads=True):
    out_r, w_r = ref(*args, **kwargs)
    out_o, w_o = ours(*args, **kwargs)
    torch.testing.assert_close(out_o, out_r, rtol=1e-4, atol=1e-5)
    if w_r is None:
        assert w_o is None
    else:
        torch.testing.assert_close(w_o, w_r, rtol=1e-4, atol=1e-5)
    if not grads:
        return
    dout = torch.randn_like(out_r)
    leaves = [a for a in dict.fromkeys(args) if a.requires_grad]
    g_r = torch.autograd.grad(out_r, leaves + list(ref.parameters()), dout)
    g_o = torch.autograd.grad(out_o, leaves + list(ours.parameters()), dout)
    names = [f"input{i}" for i in range(len(leaves))] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, g_o, g_r):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"grad of {name}: {m}")


MODULES = [
    pytest.param({}, id="default"),
    pytest.param({"batch_first": True}, id="batch_first"),
    pytest.param({"kdim": 6, "vdim": 10}, id="kdim-vdim"),
    pytest.param({"add_bias_kv": True}, id="bias_kv"),
    pytest.param({"add_zero_attn": True, "batch_first": True}, id="zero_attn"),
    pytest.param({"bias": False}, id="no-bias"),
    pytest.param({"heads": 4}, id="4-heads"),
]
MASK_KINDS = ["none", "kpm-bool", "kpm-float", "am-2d-bool", "am-2d-float", "am-3d-bool", "kpm+am", "causal"]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("module_kw", MODULES)
def test_parity_without_weights(module_kw, mask_kind, backend):
    self_attn = mask_kind == "causal"
    if self_attn and "kdim" in module_kw:
        pytest.skip("the causal case is self-attention, which needs kdim == vdim == embed_dim")
    ref, ours = _pair(**module_kw)
    args = [a.requires_grad_() for a in _inputs(ref, self_attn=self_attn)]
    if self_attn:
        args = [args[0]] * 3
    kwargs = dict(need_weights=False, **_masks(mask_kind, self_attn=self_attn, heads=ref.num_heads))
    with fastattn.backend(backend):
        _compare(ref, ours, args, kwargs)


@pytest.mark.parametrize("average", [True, False], ids=["averaged", "per-head"])
@pytest.mark.parametrize("mask_kind", ["none", "kpm+am"])
def test_parity_with_weights(mask_kind, average):
    ref, ours = _pair()
    args = [a.requires_grad_() for a in _inputs(ref)]
    with fastattn.backend("triton"):
        _compare(ref, ours, args, dict(need_weights=True, average_attn_weights=average, **_masks(mask_kind)))


@pytest.mark.parametrize("mask_kind", ["none", "kpm-bool", "am-2d-float"])
def test_unbatched(mask_kind):
    ref, ours = _pair()
    args = [a.requires_grad_() for a in _inputs(ref, batched=False)]
    with fastattn.backend("triton"):
        _compare(ref, ours, args, dict(need_weights=False, **_masks(mask_kind, batched=False)))


def test_self_attention_single_projection_and_training_dropout_zero():
    ref, ours = _pair(batch_first=True, dropout=0.0)
    x = _inputs(ref, self_attn=True)[0].requires_grad_()
    with fastattn.backend("triton"):
        _compare(ref.train(), ours.train(), [x, x, x], dict(need_weights=False))


def test_dropout_only_in_training():
    ref, ours = _pair(dropout=0.5)
    q, k, v = _inputs(ref)
    ours.eval()
    with fastattn.backend("triton"):
        torch.testing.assert_close(ours(q, k, v, need_weights=False)[0], ref.eval()(q, k, v, need_weights=False)[0])
        ours.train()
        a, b = ours(q, k, v, need_weights=False)[0], ours(q, k, v, need_weights=False)[0]
    assert not torch.equal(a, b), "training dropout must draw new masks"


def _fully_masked_kwargs():
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1] = True  # batch 1 sees no key at all
    return {"key_padding_mask": kpm.to(DEVICE), "need_weights": False}


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fully_masked_rows_on_torch_inference_fast_path(backend):
    """torch's fused inference path gives NaN on rows with no key; the module gives the same."""
    ref, ours = _pair(batch_first=True)
    ref.eval(), ours.eval()
    x = _inputs(ref, self_attn=True)[0]
    with torch.no_grad(), fastattn.backend(backend):
        out_r = ref(x, x, x, **_fully_masked_kwargs())[0]
        out_o = ours(x, x, x, **_fully_masked_kwargs())[0]
    assert out_r[1].isnan().all() and out_o[1].isnan().all()
    torch.testing.assert_close(out_o[0], out_r[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_o[2], out_r[2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fully_masked_rows_on_torch_autograd_path(backend):
    """torch's autograd path gives 0 attention (so out_proj's bias) on rows with no key; so does the module."""
    ref, ours = _pair(batch_first=True)
    with torch.no_grad():
        ref.out_proj.bias.normal_()
        ours.out_proj.bias.copy_(ref.out_proj.bias)
    x = _inputs(ref, self_attn=True)[0].requires_grad_()
    with fastattn.backend(backend):
        _compare(ref, ours, [x, x, x], _fully_masked_kwargs())
        out = ours(x, x, x, **_fully_masked_kwargs())[0]
    torch.testing.assert_close(out[1], ref.out_proj.bias.expand(L, E))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nested_tensor_input_on_fast_path(backend):
    ref, ours = _pair(batch_first=True)
    ref.eval(), ours.eval()
    nt = torch.nested.nested_tensor([torch.randn(5, E), torch.randn(3, E)]).to(DEVICE)
    with torch.no_grad(), fastattn.backend(backend):
        out_r = ref(nt, nt, nt, need_weights=False)[0]
        out_o = ours(nt, nt, nt, need_weights=False)[0]
    assert out_o.is_nested
    for a, b in zip(out_o.unbind(), out_r.unbind()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_state_dict_round_trip_both_ways():
    for kw in [{}, {"kdim": 6, "vdim": 10}, {"add_bias_kv": True}, {"bias": False}]:
        ref, ours = _pair(**kw)
        assert [n for n, _ in ref.named_parameters()] == [n for n, _ in ours.named_parameters()]
        ref.load_state_dict(ours.state_dict(), strict=True)
        assert isinstance(ours, nn.MultiheadAttention)


def _error_cases():
    ref, _ = _pair()
    q, k, v = _inputs(ref)
    return {
        "query-4d": ((q[None], k, v), {}),
        "embed-dim": ((q[..., :8], k, v), {}),
        "key-value-shapes": ((q, k, v[:3]), {}),
        "am-2d-shape": ((q, k, v), {"attn_mask": torch.zeros(L, S + 1, dtype=torch.bool, device=DEVICE)}),
        "am-3d-shape": ((q, k, v), {"attn_mask": torch.zeros(2, L, S, dtype=torch.bool, device=DEVICE)}),
        "kpm-shape": ((q, k, v), {"key_padding_mask": torch.zeros(N, S + 2, dtype=torch.bool, device=DEVICE)}),
        "kpm-int": ((q, k, v), {"key_padding_mask": torch.zeros(N, S, dtype=torch.int32, device=DEVICE)}),
        "causal-without-mask": ((q, k, v), {"is_causal": True}),
    }


@pytest.mark.parametrize("case", list(_error_cases()))
def test_same_errors_as_torch(case):
    ref, ours = _pair()
    args, kwargs = _error_cases()[case]
    with pytest.raises(Exception) as torch_exc:
        ref(*args, need_weights=False, **kwargs)
    with pytest.raises(torch_exc.type):
        ours(*args, need_weights=False, **kwargs)


def test_need_weights_false_runs_the_fused_op(monkeypatch):
    import fastattn.multihead_attention as mha

    calls = []
    real = mha.scaled_dot_product_attention
    monkeypatch.setattr(mha, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref, ours = _pair()
    q, k, v = _inputs(ref)
    ours(q, k, v, need_weights=False)
    assert calls == [1]
    ours(q, k, v, need_weights=True)  # weights asked for: torch's path, which builds them
    assert calls == [1]
