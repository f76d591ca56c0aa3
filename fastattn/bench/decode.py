"""Decode and varlen benchmarks.

- Decode (``decode_attention``, one new token per sequence, GQA): memory-bound, so GB/s of key/value cache
  read (2 · N · H_kv · S · E · bytes) per step, against torch writing the new token into the cache and running
  ``F.scaled_dot_product_attention`` over the filled part, and against the device copying the cache (the
  bandwidth ceiling, measured in the same run).
- Varlen (``varlen_attention``, causal, a realistic spread of lengths): TFLOP/s of the real work
  (Σ_b 2 · H · L_b² · E, causal), against torch's SDPA on the same sequences padded to the longest (its FLOPs
  counted the same way, so the padding it computes shows as lower TFLOP/s), and flash-attn's varlen where
  installed.

    python -m fastattn.bench.decode [--out DIR]
"""

from __future__ import annotations

import argparse

import torch

import fastattn
from fastattn import _torch

from .common import kernel_backends, on_backend, time_ms
from .report import report


def _decode_ours(q, k_cache, v_cache, filled, k_new, v_new):
    return fastattn.decode_attention(q, k_cache, v_cache, filled, k_new=k_new, v_new=v_new)


def _decode_torch(q, k_cache, v_cache, filled, k_new, v_new):
    """Stock PyTorch: the new token into the (uniformly filled) cache, then SDPA over the filled part."""
    s = int(filled[0]) + 1
    k_cache[:, :, s - 1 : s] = k_new
    v_cache[:, :, s - 1 : s] = v_new
    return _torch.scaled_dot_product_attention(q, k_cache[:, :, :s], v_cache[:, :, :s], enable_gqa=True)


def run_decode(quick: bool = False) -> list[dict]:
    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    H, HK, E = (32, 8, 128) if gpu else (8, 2, 32)
    shapes = [(1, 4096), (16, 4096), (1, 32768)] if gpu else [(1, 512), (4, 512)]
    if quick:
        shapes = shapes[:2]
    rows = []
    for N, S in shapes:
        q = torch.randn(N, H, 1, E, device=device, dtype=dtype)
        k_cache, v_cache = (torch.randn(N, HK, S, E, device=device, dtype=dtype) for _ in range(2))
        k_new, v_new = (torch.randn(N, HK, 1, E, device=device, dtype=dtype) for _ in range(2))
        filled = torch.full((N,), S - 1, dtype=torch.int32, device=device)

        impls = {name: on_backend(_decode_ours, b) for name, b in kernel_backends().items()}
        impls["torch"] = _decode_torch
        size = 2 * N * HK * S * E * k_cache.element_size()
        for name, fn in impls.items():
            ms = time_ms(fn, q, k_cache, v_cache, filled, k_new, v_new)
            rows.append(dict(op="decode", impl=name, batch=N, cache_len=S, heads=H, kv_heads=HK, ms=round(ms, 4),
                             gbps=round(size / ms * 1e-6, 1)))  # fmt: skip
        # The ceiling: the device copying the same cache (read + write of its bytes), in the same run.
        dst = torch.empty_like(k_cache)
        ms = time_ms(dst.copy_, k_cache)
        copied = 2 * k_cache.numel() * k_cache.element_size()
        rows.append(dict(op="decode", impl="copy (ceiling)", batch=N, cache_len=S, heads=H, kv_heads=HK,
                         ms=round(ms, 4), gbps=round(copied / ms * 1e-6, 1)))  # fmt: skip
    return rows


def _varlen_ours(q, k, v, cu, longest, padded):
    return fastattn.varlen_attention(q, k, v, cu, cu, longest, longest, causal=True)


def _varlen_torch(q, k, v, cu, longest, padded):
    return _torch.scaled_dot_product_attention(*padded, is_causal=True)


def run_varlen(quick: bool = False) -> list[dict]:
    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    H, E = (16, 128) if gpu else (4, 32)
    gen = torch.Generator().manual_seed(0)
    spreads = [(128, 4096, 16)] if gpu else [(16, 256, 4)]
    if gpu and not quick:
        spreads.append((512, 8192, 8))
    rows = []
    for lo, hi, n in spreads:
        lengths = torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        q, k, v = (torch.randn(sum(lengths), H, E, device=device, dtype=dtype) for _ in range(3))
        longest = max(lengths)
        padded = [torch.zeros(n, H, longest, E, device=device, dtype=dtype) for _ in range(3)]
        for b, (start, length) in enumerate(zip(cu.tolist(), lengths)):
            for dst, src in zip(padded, (q, k, v)):
                dst[b, :, :length] = src[start : start + length].transpose(0, 1)

        impls = {name: on_backend(_varlen_ours, b) for name, b in kernel_backends().items()}
        impls["torch (padded)"] = _varlen_torch
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            pass
        else:
            impls["flash-attn varlen"] = lambda q, k, v, cu, longest, padded: flash_attn_varlen_func(
                q, k, v, cu, cu, longest, longest, causal=True
            )
        flops = sum(2.0 * H * length * length * E for length in lengths)  # 4·L²·E halved for causal
        for name, fn in impls.items():
            ms = time_ms(fn, q, k, v, cu, longest, padded)
            rows.append(dict(op="varlen", impl=name, sequences=n, tokens=sum(lengths), longest=longest,
                             ms=round(ms, 4), tflops=round(flops / ms * 1e-9, 2)))  # fmt: skip
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    report(run_decode(args.quick) + run_varlen(args.quick), args.out, "decode")


if __name__ == "__main__":
    main()
