"""decode_attention against per-sequence float64 references: cache lengths including 0 and 1, new tokens
written into the cache in place, GQA, rotary, ALiBi, and the split (flash-decoding) path."""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_close, reference

import fastattn


def _setup(lengths, L_new, H=4, HK=2, E=16, S_max=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    N = len(lengths)
    q = torch.randn(N, H, L_new, E, generator=gen).to(DEVICE)
    k_cache, v_cache = (torch.randn(N, HK, S_max, E, generator=gen).to(DEVICE) for _ in range(2))
    k_new, v_new = (torch.randn(N, HK, L_new, E, generator=gen).to(DEVICE) for _ in range(2))
    return q, k_cache, v_cache, k_new, v_new, torch.tensor(lengths, dtype=torch.int32, device=DEVICE)


def _reference(q, k_cache, v_cache, lengths, L_new, alibi=None):
    """Per sequence in float64 (tests/helpers.reference): the last query aligned with key lengths[n] - 1,
    causal; ALiBi written out as a bias."""
    outs = []
    for n, s in enumerate(lengths):
        kn, vn = (c[n : n + 1, :, :s].cpu().double() for c in (k_cache, v_cache))
        bias = None
        if alibi is not None:
            i, j = torch.arange(L_new)[:, None] + s - L_new, torch.arange(s)[None, :]
            slopes = alibi.cpu().double()
            bias = -(slopes if slopes.dim() == 1 else slopes[n]).reshape(1, -1, 1, 1) * (i - j).abs()
        out, _ = reference(q[n : n + 1].cpu().double(), kn, vn, offset=s - L_new, right=0, bias=bias)
        outs.append(out)
    return torch.cat(outs)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("L_new", [1, 3])
@pytest.mark.parametrize("splits", [None, 3], ids=["one-split", "three-splits"])
def test_new_tokens_are_cached_and_attended_causally(L_new, backend, splits):
    # Splits are multiples of 256 keys: the split case needs a longer cache.
    S_max = 40 if splits is None else 600
    lengths = [0, 1, 17, S_max - 3 - L_new]
    q, k_cache, v_cache, k_new, v_new, seqlens = _setup(lengths, L_new, S_max=S_max)
    before_k = k_cache.clone()
    with fastattn.backend(backend):
        out = fastattn.decode_attention(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new, num_splits=splits)
    for n, s in enumerate(lengths):  # written in place at s .. s + L_new; the rest untouched
        assert torch.equal(k_cache[n, :, s : s + L_new], k_new[n])
        assert torch.equal(k_cache[n, :, :s], before_k[n, :, :s])
        assert torch.equal(k_cache[n, :, s + L_new :], before_k[n, :, s + L_new :])
    ref = _reference(q, k_cache, v_cache, [s + L_new for s in lengths], L_new)
    assert_close(out, ref, torch.float32, None, "out")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_attending_to_the_cache_only_with_alibi(backend):
    lengths = [5, 1, 29]
    q, k_cache, v_cache, *_, seqlens = _setup(lengths, 2, seed=1)
    slopes = fastattn.alibi_slopes(4).to(DEVICE)
    with fastattn.backend(backend):
        out = fastattn.decode_attention(q, k_cache, v_cache, seqlens, alibi_slopes=slopes)
    ref = _reference(q, k_cache, v_cache, lengths, 2, alibi=slopes)
    assert_close(out, ref, torch.float32, None, "out")


def test_rotary_turns_queries_and_new_keys_at_their_positions():
    lengths = [3, 11]
    q, k_cache, v_cache, k_new, v_new, seqlens = _setup(lengths, 2, seed=2)
    rope = fastattn.RotaryEmbedding(16)
    with fastattn.backend("triton"):
        out = fastattn.decode_attention(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new, rotary=rope)
    positions = torch.tensor(lengths, device=DEVICE)[:, None] + torch.arange(2, device=DEVICE)
    rq, rk = fastattn.apply_rotary(q, k_new, positions=positions)
    for n, s in enumerate(lengths):
        assert_close(k_cache[n, :, s : s + 2], rk[n].double(), torch.float32, None, "rotated keys in the cache")
    ref = _reference(rq, k_cache, v_cache, [s + 2 for s in lengths], 2)
    assert_close(out, ref, torch.float32, None, "out")


def test_bad_cache_lengths_are_refused():
    q, k_cache, v_cache, k_new, v_new, _ = _setup([1, 2], 3)
    with pytest.raises(ValueError, match=r"cache_seqlens must be in \[0, 37\]"):
        fastattn.decode_attention(q, k_cache, v_cache, torch.tensor([1, 38], dtype=torch.int32, device=DEVICE),
                                  k_new=k_new, v_new=v_new, check=True)  # fmt: skip
    with pytest.raises(ValueError, match="int32"):
        fastattn.decode_attention(q, k_cache, v_cache, torch.tensor([1, 2], device=DEVICE))
    with pytest.raises(ValueError, match="together"):
        fastattn.decode_attention(q, k_cache, v_cache, torch.tensor([1, 2], dtype=torch.int32), k_new=k_new)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("L_new,splits", [(1, None), (2, None), (1, 3), (2, 3)], ids=["1", "2", "1-split3", "2-split3"])
def test_paged_cache_with_pages_out_of_order(L_new, splits, backend):
    """The same step on a pool of pages in shuffled order (block_table) gives the contiguous cache's result,
    and the new keys land in the right page slots; also with the key length split (pages and splits together:
    a split's first key is in the middle of the table)."""
    lengths, page, S_max = ([0, 9, 30], 8, 40) if splits is None else ([0, 300, 700], 64, 768)
    q, k_cache, v_cache, k_new, v_new, seqlens = _setup(lengths, L_new, S_max=S_max, seed=4)
    N, HK, S_max, E = k_cache.shape
    max_pages = S_max // page
    order = torch.randperm(N * max_pages + 3, generator=torch.Generator().manual_seed(5))  # spare pages too
    block_table = order[: N * max_pages].view(N, max_pages).to(torch.int32).to(DEVICE)
    pools = []
    for cache in (k_cache, v_cache):
        pool = torch.zeros(N * max_pages + 3, HK, page, E, device=DEVICE)
        pool[block_table.long()] = cache.view(N, HK, max_pages, page, E).transpose(1, 2)
        pools.append(pool)
    with fastattn.backend(backend):
        got = fastattn.decode_attention(q, *pools, seqlens, k_new=k_new, v_new=v_new, block_table=block_table,
                                        num_splits=splits)  # fmt: skip
        fastattn.decode_attention(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new)  # writes the new keys
    want = _reference(q, k_cache, v_cache, [n + L_new for n in lengths], L_new)
    assert_close(got, want, torch.float32, None, "paged out")
    back = pools[0][block_table.long()].transpose(1, 2).reshape(N, HK, S_max, E)
    assert torch.equal(back, k_cache)
    with pytest.raises(ValueError, match="block_table entries"):
        fastattn.decode_attention(q, *pools, seqlens, block_table=block_table + 100, check=True)


def test_bad_shapes_and_tables_are_refused():
    q, k_cache, v_cache, k_new, v_new, seqlens = _setup([1, 2], 2)
    with pytest.raises(ValueError, match="k_new / v_new must be"):
        fastattn.decode_attention(q, k_cache, v_cache, seqlens, k_new=k_new[:, :, :1], v_new=v_new)
    with pytest.raises(ValueError, match="do not fit"):
        fastattn.decode_attention(q, k_cache[:1], v_cache[:1], seqlens)
    pool = torch.zeros(10, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="block_table must be an int32"):
        fastattn.decode_attention(q, pool, pool, seqlens, block_table=torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="block_table entries"):  # a page in use (lengths 1 and 2: the first)
        table = torch.tensor([[0, 1, 2, 3, 4], [-1, 6, 7, 8, 9]], dtype=torch.int32, device=DEVICE)
        fastattn.decode_attention(q, pool, pool, seqlens, block_table=table, check=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_unused_table_entries_may_be_minus_one(backend):
    """Serving engines put -1 in the table entries past a sequence's last page: they are never read."""
    lengths, page, L_new = [0, 9, 21], 8, 2
    q, k_cache, v_cache, k_new, v_new, seqlens = _setup(lengths, L_new, S_max=40, seed=6)
    N, HK, S_max, E = k_cache.shape
    pages = [-(-(n + L_new) // page) for n in lengths]  # pages in use after the step: 1, 2, 3
    table = torch.full((N, S_max // page), -1, dtype=torch.int32)
    pools = [torch.zeros(sum(pages), HK, page, E, device=DEVICE) for _ in range(2)]
    first = 0
    for n, used in enumerate(pages):
        table[n, :used] = torch.arange(first, first + used, dtype=torch.int32)
        for pool, cache in zip(pools, (k_cache, v_cache)):
            pool[first : first + used] = cache[n, :, : used * page].unflatten(1, (used, page)).transpose(0, 1)
        first += used
    with fastattn.backend(backend):
        want = fastattn.decode_attention(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new)
        got = fastattn.decode_attention(q, *pools, seqlens, k_new=k_new, v_new=v_new, block_table=table.to(DEVICE))
    assert_close(got, want.double(), torch.float32, None, "paged out")


def test_model_cache_refuses_to_overflow():
    from fastattn.models import GPT

    model = GPT(32, 4, 1, vocab_size=20, max_len=64).to(DEVICE).eval()
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="exceed the capacity"):
        model(torch.zeros(1, 5, dtype=torch.long, device=DEVICE), cache)


def test_default_split_choice():
    """About two programs per SM, splits of at least 256 keys, at most 64 splits."""
    from fastattn.decode import default_splits

    assert default_splits(programs=32, s_max=32768, sms=132) == 9  # batch 1, 32 heads: 9 splits fill 132 SMs
    assert default_splits(programs=512, s_max=32768, sms=132) == 1  # a large batch fills the GPU by itself
    assert default_splits(programs=1, s_max=32768, sms=132) == 64  # capped
    assert default_splits(programs=1, s_max=300, sms=132) == 2  # a short cache: splits stay >= 256 keys


def test_default_splits_run_in_the_kernel(monkeypatch):
    """Without num_splits the launch takes default_splits' choice (the interpreter stands in 8 SMs): here 4
    splits, merged into the unsplit result."""
    from fastattn.ops.attention import launch as attention_launch

    seen = []
    real = attention_launch.attention_fwd
    monkeypatch.setattr(
        attention_launch, "attention_fwd", lambda *a, **k: seen.append(k["varlen"].splits) or real(*a, **k)
    )
    lengths = [1000]
    q, k_cache, v_cache, k_new, v_new, seqlens = _setup(lengths, 1, H=4, HK=4, S_max=1024, seed=7)
    with fastattn.backend("triton"):
        out = fastattn.decode_attention(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new)
    assert seen == [4], seen  # programs 1 x 4 heads: ceil(16 / 4) = 4, ceil(1024 / 256) = 4
    assert_close(out, _reference(q, k_cache, v_cache, [1001], 1), torch.float32, None, "out")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("L_new,splits", [(1, None), (3, 3)], ids=["1", "3-split3"])
def test_low_precision_caches(dtype, L_new, splits):
    """bf16 / fp16 caches against float64, within the rule of tests/helpers.py against torch's own SDPA in that
    dtype over each sequence's filled keys (causal for the new tokens)."""
    from fastattn import _torch

    lengths = [0, 5, 700]
    q, k_cache, v_cache, k_new, v_new, seqlens = _setup(lengths, L_new, S_max=768, seed=8)
    q, k_cache, v_cache, k_new, v_new = (t.to(dtype) for t in (q, k_cache, v_cache, k_new, v_new))
    with fastattn.backend("triton"):
        out = fastattn.decode_attention(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new, num_splits=splits)
    assert out.dtype == dtype
    filled = [n + L_new for n in lengths]
    ref = _reference(q, k_cache, v_cache, filled, L_new)
    torch_out = torch.cat([
        _torch.scaled_dot_product_attention(
            q[n : n + 1].cpu(), k_cache[n : n + 1, :, :s].cpu(), v_cache[n : n + 1, :, :s].cpu(),
            torch.ones(L_new, s, dtype=torch.bool).tril(s - L_new), enable_gqa=True,
        ) for n, s in enumerate(filled)
    ])  # fmt: skip
    assert_close(out, ref, dtype, torch_out, "out")
