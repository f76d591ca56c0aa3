"""Hugging Face models with attn_implementation="fastattn": tiny models built from configs (random weights,
nothing downloaded) give the logits of attn_implementation="sdpa", with padding, causal masks and GQA."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from helpers import DEVICE

transformers = pytest.importorskip("transformers", reason="transformers is the optional 'hf' extra")
import fastattn  # noqa: E402
import fastattn.hf  # noqa: E402

TINY = dict(vocab_size=97, num_hidden_layers=2)


def _models():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    return {
        "bert": (BertModel, BertConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64, **TINY)),
        "gpt2": (
            GPT2LMHeadModel,
            GPT2Config(n_embd=32, n_head=4, n_positions=64, vocab_size=97, n_layer=2, bos_token_id=0, eos_token_id=0),
        ),
        "llama-gqa": (
            LlamaForCausalLM,
            LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, **TINY),
        ),
    }


def _pair(name):
    cls, config = _models()[name]
    torch.manual_seed(0)
    # Separate configs: the implementation name is stored on the config object the model keeps.
    ref = cls._from_config(copy.deepcopy(config), attn_implementation="sdpa").to(DEVICE).eval()
    ours = cls._from_config(copy.deepcopy(config), attn_implementation="fastattn").to(DEVICE).eval()
    ours.load_state_dict(ref.state_dict())
    assert ours.config._attn_implementation == "fastattn" and ref.config._attn_implementation == "sdpa"
    return ref, ours


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 11), generator=g)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :4] = 0  # left padding of the second sequence
    return ids.to(DEVICE), mask.to(DEVICE)


def _out(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", ["bert", "gpt2", "llama-gqa"])
def test_logits_match_sdpa(name, backend, monkeypatch):
    calls = []
    real = fastattn.hf.scaled_dot_product_attention
    monkeypatch.setattr(fastattn.hf, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref, ours = _pair(name)
    ids, mask = _batch()
    with torch.no_grad(), fastattn.backend(backend):
        got = _out(ours, ids, mask)
    want = _out(ref, ids, mask)
    keep = mask.bool()  # padded positions carry no meaning
    torch.testing.assert_close(got[keep], want.detach()[keep], rtol=1e-4, atol=1e-4)
    assert len(calls) == 2  # one per layer


def test_padding_is_not_ignored():
    ref, ours = _pair("bert")
    ids, mask = _batch()
    with torch.no_grad():
        padded = _out(ours, ids, mask)
        unpadded = _out(ours, ids, torch.ones_like(mask))
    assert not torch.allclose(padded[1, 4:], unpadded[1, 4:], atol=1e-3), "the padding mask must reach attention"


def test_gradients_match_sdpa():
    ref, ours = _pair("llama-gqa")
    ids, mask = _batch()
    with fastattn.backend("triton"):
        loss_o = _out(ours.train(), ids, mask)[mask.bool()].square().mean()
        grads_o = torch.autograd.grad(loss_o, list(ours.parameters()))
    loss_r = _out(ref.train(), ids, mask)[mask.bool()].square().mean()
    grads_r = torch.autograd.grad(loss_r, list(ref.parameters()))
    for a, b in zip(grads_o, grads_r):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_plain_import_does_not_import_transformers():
    code = "import sys, fastattn; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_patch_switches_a_hf_model(monkeypatch):
    calls = []
    real = fastattn.hf.scaled_dot_product_attention
    monkeypatch.setattr(fastattn.hf, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    ref, _ = _pair("llama-gqa")
    model = copy.deepcopy(ref)
    wrapper = torch.nn.ModuleDict({"lm": model})
    assert fastattn.patch(wrapper) is wrapper
    assert model.config._attn_implementation == "fastattn"
    assert wrapper.fastattn_patched == ["lm:attn_implementation"]
    ids, mask = _batch()
    with torch.no_grad(), fastattn.backend("triton"):
        got = _out(model, ids, mask)
        want = _out(ref, ids, mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-4)
    assert len(calls) == 2
