"""Hugging Face models with attn_implementation="fastattn": tiny models built from configs (random weights,
nothing downloaded) give the logits of attn_implementation="sdpa", with padding, causal masks and GQA."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from helpers import DEVICE, rel_err

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


def _sinks_and_softcap_models():
    from transformers import Gemma2Config, Gemma2ForCausalLM, GptOssConfig, GptOssForCausalLM

    small = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, sliding_window=4, max_position_embeddings=64)  # fmt: skip
    return {
        # Sinks on every layer, a 4-token sliding window on the first (gpt-oss alternates them).
        "gpt-oss": (GptOssForCausalLM, GptOssConfig(intermediate_size=32, num_local_experts=2, num_experts_per_tok=1,
                                                    layer_types=["sliding_attention", "full_attention"], **small)),
        # Soft-capped logits (2.0 makes the cap bend the scores), a sliding window on alternate layers.
        "gemma2": (Gemma2ForCausalLM, Gemma2Config(intermediate_size=64, attn_logit_softcapping=2.0,
                                                   final_logit_softcapping=30.0, query_pre_attn_scalar=16, **small)),
    }  # fmt: skip


def _eager_pair(name):
    cls, config = _sinks_and_softcap_models()[name]
    torch.manual_seed(0)
    ref = cls._from_config(copy.deepcopy(config), attn_implementation="eager").to(DEVICE).eval()
    for layer in ref.model.layers:
        if name == "gpt-oss":  # the initializer's sinks are small; spread them so that they matter
            torch.nn.init.normal_(layer.self_attn.sinks, std=2.0)
        else:  # scores of a few units, so that the cap of 2 bends them (the initializer's give ~0.01)
            torch.nn.init.normal_(layer.self_attn.q_proj.weight, std=0.3)
            torch.nn.init.normal_(layer.self_attn.k_proj.weight, std=0.3)
    ours = cls._from_config(copy.deepcopy(config), attn_implementation="fastattn").to(DEVICE).eval()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", ["gpt-oss", "gemma2"])
def test_sinks_and_softcap_models_match_eager(name, backend):
    """gpt-oss (sinks, sliding window) and Gemma 2 (soft-capping, sliding window) on fastattn: the logits and
    every parameter's gradient of transformers' eager attention, with left padding. Both are float32 (the MoE
    layers of gpt-oss take no float64), so the bound is on the norm-wise difference of two float32 results,
    each within the suite's 1e-5 of exact: 2e-5."""
    ref, ours = _eager_pair(name)
    ids, mask = _batch()
    keep = mask.bool()
    with fastattn.backend(backend), fastattn.kernel_log() as log:
        got = ours(input_ids=ids, attention_mask=mask).logits
    want = ref(input_ids=ids, attention_mask=mask).logits
    kernel = "_attention_fwd_kernel" if backend == "triton" else "attention_reference"
    assert [e.kernel for e in log] == [kernel] * 2  # both layers through fastattn.attention
    assert rel_err(got[keep], want[keep]) <= 2e-5
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE) * keep[..., None]
    with fastattn.backend(backend):
        (got * dout).sum().backward()
    (want * dout).sum().backward()
    for (pname, p), r in zip(ours.named_parameters(), ref.parameters()):
        if r.grad is None:
            assert p.grad is None, pname
            continue
        assert rel_err(p.grad, r.grad) <= 2e-5, (pname, rel_err(p.grad, r.grad))


@pytest.mark.parametrize("name", ["gpt-oss", "gemma2"])
def test_sinks_and_softcap_matter_here(name):
    """The comparison above bites: the same model with its sinks (gpt-oss) or cap (Gemma 2) taken out gives
    other logits than eager attention with them."""
    ref, ours = _eager_pair(name)
    if name == "gpt-oss":
        for layer in ours.model.layers:
            layer.self_attn.sinks.data.fill_(-1e4)  # e^-1e4 = 0: no sink
    else:
        for layer in ours.model.layers:
            layer.self_attn.attn_logit_softcapping = None
    ids, mask = _batch()
    with torch.no_grad(), fastattn.backend("triton"):
        got = ours(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    assert (got - want)[mask.bool()].abs().max() > 1e-3


@pytest.mark.parametrize("name", ["gpt-oss", "gemma2"])
def test_sinks_and_softcap_generation_with_cache_equals_without(name):
    """Greedy generation on fastattn: with the KV cache (single-token steps, sliding-window cache layers) the
    tokens of generation without a cache, and of eager attention."""
    ref, ours = _eager_pair(name)
    ids, mask = _batch()
    kw = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad(), fastattn.backend("triton"):
        cached = ours.generate(ids, use_cache=True, **kw)
        uncached = ours.generate(ids, use_cache=False, **kw)
        eager = ref.generate(ids, use_cache=True, **kw)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, eager)
