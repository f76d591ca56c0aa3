"""fastattn.patch on torch's Transformer modules: same outputs, same state, and the attention really runs
through fastattn (counted), also where torch's encoder layer would take its fused path."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from helpers import DEVICE

import fastattn
import fastattn.multihead_attention as mha

D, HEADS = 16, 2


@pytest.fixture
def calls(monkeypatch):
    """Attention calls of fastattn's MultiheadAttention: through its SDPA, or over packed keys (a bool key
    padding mask on the kernels)."""
    counted = []
    for name in ("scaled_dot_product_attention", "padded_key_attention"):
        real = getattr(mha, name)

        def counting(*a, _real=real, **k):
            out = _real(*a, **k)
            counted.extend([1] if out is not None else [])
            return out

        monkeypatch.setattr(mha, name, counting)
    return counted


def _transformer(batch_first=True):
    torch.manual_seed(0)
    return nn.Transformer(
        d_model=D,
        nhead=HEADS,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=32,
        dropout=0.0,
        batch_first=batch_first,
    ).to(DEVICE)


def _data(batch_first=True):
    g = torch.Generator().manual_seed(3)
    shape = (lambda n, t: (n, t, D)) if batch_first else (lambda n, t: (t, n, D))
    src, tgt = torch.randn(shape(2, 9), generator=g).to(DEVICE), torch.randn(shape(2, 6), generator=g).to(DEVICE)
    src_kpm = torch.zeros(2, 9, dtype=torch.bool)
    src_kpm[1, 6:] = True  # right padding
    return src, tgt, src_kpm.to(DEVICE)


def test_patch_replaces_every_mha_and_keeps_state():
    model = _transformer()
    params_before = {n: p for n, p in model.named_parameters()}
    model.eval()
    patched = fastattn.patch(model)
    assert patched is model
    mhas = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(mhas) == 6 and all(type(m) is fastattn.MultiheadAttention for m in mhas)
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 12 and all(type(model.get_submodule(n)) is fastattn.LayerNorm for n in norms)
    mha_names = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    assert sorted(model.fastattn_patched) == sorted(mha_names + norms)
    assert all(p is params_before[n] for n, p in model.named_parameters()), "parameters must be the same tensors"
    assert not model.training and all(not m.training for m in mhas)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_patched_transformer_matches_and_routes_through_fastattn(calls, mode, backend):
    model = _transformer()
    ref = copy.deepcopy(model)
    getattr(model, mode)(), getattr(ref, mode)()
    fastattn.patch(model)
    src, tgt, src_kpm = _data()
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(6, device=DEVICE)
    kwargs = dict(tgt_mask=tgt_mask, src_key_padding_mask=src_kpm, memory_key_padding_mask=src_kpm, tgt_is_causal=True)
    with fastattn.backend(backend):
        out = model(src, tgt, **kwargs)
    want = ref(src, tgt, **kwargs)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert len(calls) == 6  # 2 encoder self-attn, 2 decoder self-attn, 2 cross-attn
    if mode == "train":
        g_out = torch.autograd.grad(out.sum(), list(model.parameters()))
        g_ref = torch.autograd.grad(want.sum(), list(ref.parameters()))
        for a, b in zip(g_out, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("nested", [False, True], ids=["padded", "nested-fast-path"])
def test_encoder_fast_path_still_calls_fastattn(calls, nested):
    """In inference torch's encoder layer would run a fused C++ kernel (and the encoder would switch to nested
    tensors for a padding mask) without calling self_attn; the patched layers still call fastattn."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, HEADS, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=nested).to(DEVICE).eval()
    ref = copy.deepcopy(model)
    fastattn.patch(model)
    src, _, src_kpm = _data()
    with torch.no_grad():
        out = model(src, src_key_padding_mask=src_kpm)
        want = ref(src, src_key_padding_mask=src_kpm)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert len(calls) >= 2


def test_patch_keeps_dtype_and_is_idempotent():
    model = _transformer().to(torch.float64)
    fastattn.patch(model)
    fastattn.patch(model)
    assert len(model.fastattn_patched) == 18  # 6 attention modules and 12 layer norms, each once
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_patch_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        fastattn.patch(object())
