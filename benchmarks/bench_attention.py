"""Attention benchmark: fastattn against torch's SDPA backends (and flash-attn / xFormers when installed).

On CUDA: forward, backward and forward+backward TFLOP/s, FLOPs = 4·N·H·L·S·E forward, 2.5x that backward,
halved when causal; the median of ``triton.testing.do_bench``; 16k tokens per batch (N = 16384 / L) and
model width 2048 (H = 2048 / E). On a machine without a GPU it says so and times the CPU path against torch.
Prints a Markdown table; ``--out DIR`` also writes ``attention.md`` and ``attention.json`` there.

    python benchmarks/bench_attention.py [--head-dims 64,128] [--seqlens 512,...,16384] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fastattn


def attention_flops(n: int, h: int, l: int, s: int, e: int, causal: bool, mode: str) -> float:
    fwd = 4.0 * n * h * l * s * e * (0.5 if causal else 1.0)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def _sdpa_backend(name: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }[name]

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def _fastattn(q, k, v, causal):
    with fastattn.backend("triton"):
        return fastattn.attention(q, k, v, causal=causal)


def implementations() -> dict[str, Callable]:
    impls = {"fastattn": _fastattn}
    for name in ("flash", "efficient", "cudnn"):
        impls[f"sdpa-{name}"] = _sdpa_backend(name)
    with contextlib.suppress(ImportError):
        from flash_attn import flash_attn_func

        impls["flash-attn"] = lambda q, k, v, c: flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=c
        ).transpose(1, 2)
    with contextlib.suppress(ImportError):
        import xformers.ops as xops

        def _xformers(q, k, v, c):
            bias = xops.LowerTriangularMask() if c else None
            tr = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return xops.memory_efficient_attention(*tr, attn_bias=bias).transpose(1, 2)

        impls["xformers"] = _xformers
    return impls


def bench_cuda(head_dims, seqlens, dtype, modes, impl_names=None) -> list[dict]:
    import triton.testing

    rows = []
    impls = implementations()
    if impl_names:
        impls = {k: v for k, v in impls.items() if k in impl_names}
    for e in head_dims:
        for causal in (False, True):
            for L in seqlens:
                n, h = max(1, 16384 // L), 2048 // e
                gen = torch.Generator(device="cuda").manual_seed(L + e)
                q, k, v = (
                    torch.randn(n, h, L, e, device="cuda", dtype=dtype, generator=gen).requires_grad_()
                    for _ in range(3)
                )
                dout = torch.randn(n, h, L, e, device="cuda", dtype=dtype, generator=gen)
                for name, fn in impls.items():
                    row = dict(impl=name, head_dim=e, seqlen=L, batch=n, heads=h, causal=causal, dtype=str(dtype))
                    try:
                        ms_f = triton.testing.do_bench(lambda: fn(q, k, v, causal), return_mode="median")
                        ms_fb = None
                        if "bwd" in modes or "fwd+bwd" in modes:
                            ms_fb = triton.testing.do_bench(
                                lambda: fn(q, k, v, causal).backward(dout), grad_to_none=[q, k, v],
                                return_mode="median",
                            )
                    except Exception as exc:  # a backend that refuses this case (cuDNN head dims, ...)
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:80]}"
                        rows.append(row)
                        continue
                    times = {"fwd": ms_f, "fwd+bwd": ms_fb, "bwd": None if ms_fb is None else ms_fb - ms_f}
                    for mode in modes:
                        if times[mode] is not None:
                            flops = attention_flops(n, h, L, L, e, causal, mode)
                            row[f"{mode}_ms"] = round(times[mode], 4)
                            row[f"{mode}_tflops"] = round(flops / times[mode] * 1e-9, 1)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
                del q, k, v, dout
    return rows


def bench_cpu() -> list[dict]:
    """No GPU: time fastattn's CPU path (PyTorch) against torch's SDPA, and check they agree."""
    rows = []
    for L, e, causal in [(256, 64, False), (256, 64, True), (1024, 64, True)]:
        q, k, v = (torch.randn(2, 8, L, e) for _ in range(3))
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        for name, fn in (
            ("fastattn", lambda: fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal)),
            ("torch-sdpa", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)),
        ):
            out = fn()
            fn()
            t0 = time.perf_counter()
            reps = 5
            for _ in range(reps):
                fn()
            ms = (time.perf_counter() - t0) / reps * 1e3
            err = ((out - ref).norm() / ref.norm()).item()
            flops = attention_flops(2, 8, L, L, e, causal, "fwd")
            rows.append(dict(impl=name, head_dim=e, seqlen=L, causal=causal, fwd_ms=round(ms, 3),
                             fwd_gflops=round(flops / ms * 1e-6, 1), rel_err_vs_torch=f"{err:.1e}"))
    return rows


def to_markdown(rows: list[dict]) -> str:
    cols = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192,16384")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--modes", default="fwd,bwd,fwd+bwd")
    ap.add_argument("--impls", default="", help="comma list to restrict (fastattn,sdpa-flash,...)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if torch.cuda.is_available():
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        print(f"# attention, {torch.cuda.get_device_name()}, {args.dtype}, torch {torch.__version__}")
        rows = bench_cuda(
            [int(x) for x in args.head_dims.split(",")], [int(x) for x in args.seqlens.split(",")], dtype,
            args.modes.split(","), [x for x in args.impls.split(",") if x],
        )
    else:
        print("# no GPU here: timing fastattn's CPU path (PyTorch) against torch's SDPA on the CPU")
        rows = bench_cpu()
    table = to_markdown(rows)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "attention.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(args.out, "attention.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
