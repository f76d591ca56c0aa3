"""Property tests: random shapes, masks, causal, GQA and dtypes through the Triton path against float64 torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import DEVICE, assert_close, grad_out
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastattn


@st.composite
def problems(draw):
    """Random problems. The bf16 ones have 2 sequences, at least 16 queries and keys and head dims of 16 or
    more: the 2x-torch rule compares relative errors, which on a few hundred elements measure a few roundings
    (ratios up to 2.4 on L = 1, S = 2 in a trial), so tiny shapes run in fp32, against its fixed bound. With
    Ev != E torch's CPU SDPA falls back to its fp32 math, and the kernels (P and dS rounded to bf16 for the
    tensor cores, as FlashAttention and cuDNN do) show about 1.4x its error (1.75x at most in a 150-draw sweep);
    with Ev = E torch runs its CPU flash kernel, and the ratio is about 1.0."""
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    low = dtype == torch.bfloat16
    n, hkv, group = draw(st.integers(2 if low else 1, 2)), draw(st.integers(1, 2)), draw(st.sampled_from([1, 2, 3]))
    L, S = draw(st.integers(16 if low else 1, 40)), draw(st.integers(16 if low else 1, 40))
    e = draw(st.sampled_from([16, 24, 40, 64] if low else [8, 16, 24, 40, 64]))
    return dict(
        n=n,
        hkv=hkv,
        h=hkv * group,
        L=L,
        S=S,
        e=e,
        ev=draw(st.sampled_from([e, 16])),
        causal=draw(st.booleans()),
        mask=draw(st.sampled_from(["none", "bool", "float", "keypad"])),
        dtype=dtype,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# Each new shape class compiles new kernels on a GPU; the interpreter has no compile cost.
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_sdpa_property(p):
    g = torch.Generator().manual_seed(p["seed"])
    dt = p["dtype"]
    q = torch.randn(p["n"], p["h"], p["L"], p["e"], generator=g)
    k = torch.randn(p["n"], p["hkv"], p["S"], p["e"], generator=g)
    v = torch.randn(p["n"], p["hkv"], p["S"], p["ev"], generator=g)
    mask = {
        "none": None,
        "bool": torch.rand(p["L"], p["S"], generator=g) > 0.3,
        "float": torch.randn(p["n"], 1, p["L"], p["S"], generator=g),
        "keypad": torch.rand(p["n"], 1, 1, p["S"], generator=g) > 0.3,
    }[p["mask"]]
    leaves = [x.to(DEVICE, dt).requires_grad_() for x in (q, k, v)]
    with fastattn.backend("triton"):
        out = fastattn.scaled_dot_product_attention(
            *leaves,
            None if mask is None else mask.to(DEVICE),
            is_causal=p["causal"] and mask is None,
            enable_gqa=True,
        )
    ref_in = [x.to(dt).double().requires_grad_() for x in (q, k, v)]
    ref_mask = None if mask is None or mask.dtype == torch.bool else mask.double()
    if mask is not None and mask.dtype == torch.bool:
        ref_mask = mask
    ref = F.scaled_dot_product_attention(*ref_in, ref_mask, is_causal=p["causal"] and mask is None, enable_gqa=True)
    torch_in = [x.to(dt).requires_grad_() for x in (q, k, v)]
    torch_out = F.scaled_dot_product_attention(
        *torch_in,
        None if mask is None else mask.to(dt) if mask.is_floating_point() else mask,
        is_causal=p["causal"] and mask is None,
        enable_gqa=True,
    )
    assert_close(out, ref, dt, torch_out.detach(), f"out {p}")
    dout = grad_out(ref.shape, dt, g)
    got = torch.autograd.grad(out, leaves, dout.to(DEVICE, dt))
    want = torch.autograd.grad(ref, ref_in, dout)
    torch_grads = torch.autograd.grad(torch_out, torch_in, dout.to(dt))
    for name, a, b, t in zip("qkv", got, want, torch_grads):
        assert_close(a, b, dt, t, f"d{name} {p}")
