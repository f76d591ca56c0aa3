"""The reference models: impl="fastattn" equals impl="torch" (stock PyTorch) with the same weights, outputs and
gradients, on the PyTorch path and the Triton kernels; cached generation equals uncached generation."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_close

import fastattn
from fastattn.models import GPT, Transformer

VOCAB = 40


def _pair(cls, **kw):
    torch.manual_seed(0)
    ours = cls(32, 4, 2, vocab_size=VOCAB, impl="fastattn", **kw).to(DEVICE)
    ref = cls(32, 4, 2, vocab_size=VOCAB, impl="torch", **kw).to(DEVICE)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours, ref


def _transformer_inputs(gen):
    src = torch.randint(3, VOCAB, (3, 13), generator=gen)
    tgt = torch.randint(3, VOCAB, (3, 9), generator=gen)
    pad = torch.zeros(3, 13, dtype=torch.bool)
    pad[1, 8:] = True
    pad[2, 1:] = True
    tgt_pad = torch.zeros(3, 9, dtype=torch.bool)
    tgt_pad[0, 6:] = True
    return [t.to(DEVICE) for t in (src, tgt, pad, tgt_pad)]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("model", ["transformer", "gpt-gqa"])
def test_fastattn_and_torch_implementations_agree(model, backend):
    gen = torch.Generator().manual_seed(1)
    if model == "transformer":
        ours, ref = _pair(Transformer, dropout=0.0, max_len=64)
        src, tgt, pad, tgt_pad = _transformer_inputs(gen)

        def run(m):
            return m(src, tgt, src_key_padding_mask=pad, tgt_key_padding_mask=tgt_pad)
    else:
        ours, ref = _pair(GPT, kv_heads=2, max_len=64)
        idx = torch.randint(0, VOCAB, (2, 17), generator=gen).to(DEVICE)

        def run(m):
            return m(idx)

    with fastattn.backend(backend):
        out = run(ours)
    want = run(ref)
    assert out.shape == want.shape
    assert_close(out, want.double(), torch.float32, None, "logits")
    dy = torch.randn(want.shape, generator=gen).to(DEVICE)
    with fastattn.backend(backend):
        grads = torch.autograd.grad(out, list(ours.parameters()), dy)
    ref_grads = dict(zip((n for n, _ in ref.named_parameters()), torch.autograd.grad(want, list(ref.parameters()), dy)))
    for (name, _), g in zip(ours.named_parameters(), grads):
        assert_close(g, ref_grads[name].double(), torch.float32, None, name)


def test_state_dicts_are_the_same_and_hold_no_tables():
    for cls in (Transformer, GPT):
        ours, ref = _pair(cls, max_len=64)
        assert ours.state_dict().keys() == ref.state_dict().keys()
        assert not any(k.endswith((".pe", ".cos", ".sin")) for k in ref.state_dict())
    with pytest.raises(ValueError, match="impl must be one of"):
        GPT(32, 4, 1, impl="jax")


@pytest.mark.parametrize("impl", ["fastattn", "torch"])
def test_transformer_generate_with_and_without_cache(impl):
    torch.manual_seed(3)
    # One layer and a few steps: under the interpreter each decoding step launches every kernel again.
    model = Transformer(32, 4, 1, vocab_size=VOCAB, dropout=0.0, max_len=64, impl=impl).to(DEVICE).eval()
    src, _, pad, _ = _transformer_inputs(torch.Generator().manual_seed(4))
    with fastattn.backend("triton"):
        cached = model.generate(src, 5, bos_id=1, eos_id=2, src_key_padding_mask=pad)
        plain = model.generate(src, 5, bos_id=1, eos_id=2, src_key_padding_mask=pad, use_cache=False)
    assert torch.equal(cached, plain)
    assert cached.shape[0] == 3 and 1 <= cached.shape[1] <= 5


@pytest.mark.parametrize("impl", ["fastattn", "torch"])
def test_gpt_generate_with_and_without_cache(impl):
    torch.manual_seed(5)
    model = GPT(32, 4, 1, vocab_size=VOCAB, kv_heads=1, max_len=64, impl=impl).to(DEVICE).eval()
    idx = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    with fastattn.backend("triton"):
        cached = model.generate(idx, 5)
        plain = model.generate(idx, 5, use_cache=False)
    assert cached.shape == (2, 12) and torch.equal(cached[:, :7], idx)
    assert torch.equal(cached, plain)


def test_positions_past_max_len_are_refused():
    model = GPT(32, 4, 1, vocab_size=VOCAB, max_len=8)
    with pytest.raises(ValueError, match="exceed max_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
