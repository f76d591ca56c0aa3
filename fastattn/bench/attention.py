"""Attention benchmark: fastattn against torch's SDPA backends (and flash-attn / xFormers when installed).

On CUDA: forward, backward and forward+backward TFLOP/s, FLOPs = 4·N·H·L·S·E forward, 2.5x that backward,
halved when causal; the median of ``triton.testing.do_bench``; 16k tokens per batch (N = 16384 / L) and
model width 2048 (H = 2048 / E). On a machine without a GPU it says so and times the CPU path against torch.
Prints a Markdown table; ``--out DIR`` also writes ``attention.md`` and ``attention.json`` there.

    python -m fastattn.bench.attention [--head-dims 64,128] [--seqlens 512,...,16384] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable

import torch

import fastattn
from fastattn import _torch
from fastattn.ops.attention.configs import tuned_configs

from .common import kernel_backends, on_backend, time_ms
from .report import report


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
            return _torch.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


_SHAPE_CACHE: dict = {}


def _cached(key, make):
    """Per-shape inputs of a feature (sinks of H heads, a block mask of L positions), made once: the timed call
    is the attention, not the setup (as a model builds its block mask once per batch)."""
    if key not in _SHAPE_CACHE:
        _SHAPE_CACHE[key] = make()
    return _SHAPE_CACHE[key]


def _documents(L: int, device) -> torch.Tensor:
    """Two documents of L / 2 positions: document masking at 50 % sparsity (75 % when causal)."""
    return (torch.arange(L, device=device) >= L // 2).to(torch.int32)


def _docmask_block(q, k, v, causal):
    from fastattn.examples import masks

    L = q.shape[2]
    fn = masks.causal_document if causal else masks.document
    bm = _cached(("bm", L, causal, q.device), lambda: fastattn.create_block_mask(
        fastattn.MaskMod(fn, aux=_documents(L, q.device)), None, None, L, L, device=q.device))  # fmt: skip
    return fastattn.attention(q, k, v, block_mask=bm)


def _docmask_dense(q, k, v, causal):
    L = q.shape[2]

    def make():
        doc = _documents(L, q.device)
        keep = doc[:, None] == doc[None, :]
        return keep & torch.ones(L, L, dtype=torch.bool, device=q.device).tril() if causal else keep

    return fastattn.scaled_dot_product_attention(q, k, v, attn_mask=_cached(("dense", L, causal, q.device), make))


def feature_implementations() -> dict[str, Callable]:
    """fastattn's Triton kernels with the features of issue 14, to set beside the plain case in one run:
    soft-capping, sinks, document masking by block mask and the same mask as a dense bool tensor (TFLOP/s of
    these count the dense FLOPs: compare their times)."""

    def sinks(q, k, v, c):
        t = _cached(("sinks", q.shape[1], q.device), lambda: torch.zeros(q.shape[1], device=q.device))
        return fastattn.attention(q, k, v, causal=c, sinks=t)

    fns = {
        "fastattn-softcap": lambda q, k, v, c: fastattn.attention(q, k, v, causal=c, softcap=30.0),
        "fastattn-sinks": sinks,
        "fastattn-docmask": _docmask_block,
        "fastattn-docmask-dense": _docmask_dense,
    }
    return {name: on_backend(fn, "triton") for name, fn in fns.items()}


def implementations() -> dict[str, Callable]:
    impls = {
        name: on_backend(lambda q, k, v, c: fastattn.attention(q, k, v, causal=c), backend)
        for name, backend in kernel_backends(gluon=True).items()
    }
    impls.update(feature_implementations())
    for name in ("flash", "efficient", "cudnn"):
        impls[f"sdpa-{name}"] = _sdpa_backend(name)
    # What a user gets without fastattn: torch's own choice among its backends (cuDNN on Hopper in torch 2.11).
    impls["sdpa-default"] = lambda q, k, v, c: _torch.scaled_dot_product_attention(q, k, v, is_causal=c)
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


def _time_one(fn, q, k, v, dout, causal: bool, with_backward: bool) -> tuple[float, float | None]:
    """Median ms of the forward and of forward+backward (None when not asked)."""
    import triton.testing

    ms_f = triton.testing.do_bench(lambda: fn(q, k, v, causal), return_mode="median")
    if not with_backward:
        return ms_f, None
    ms_fb = triton.testing.do_bench(
        lambda: fn(q, k, v, causal).backward(dout), grad_to_none=[q, k, v], return_mode="median"
    )
    return ms_f, ms_fb


def _row(name, n, h, L, e, causal, dtype, modes, ms_f, ms_fb) -> dict:
    row = dict(impl=name, head_dim=e, seqlen=L, batch=n, heads=h, causal=causal, dtype=str(dtype).split(".")[-1])
    times = {"fwd": ms_f, "fwd+bwd": ms_fb, "bwd": None if ms_fb is None else ms_fb - ms_f}
    for mode in modes:
        if times[mode] is not None:
            row[f"{mode}_ms"] = round(times[mode], 4)
            row[f"{mode}_tflops"] = round(attention_flops(n, h, L, L, e, causal, mode) / times[mode] * 1e-9, 1)
    return row


def bench_cuda(head_dims, seqlens, dtype, modes, impl_names=None) -> list[dict]:
    rows = []
    impls = implementations()
    if impl_names:
        impls = {name: fn for name, fn in impls.items() if name in impl_names}
    with_backward = "bwd" in modes or "fwd+bwd" in modes
    for e in head_dims:
        for causal in (False, True):
            for L in seqlens:
                n, h = max(1, 16384 // L), 2048 // e
                gen = torch.Generator(device="cuda").manual_seed(L + e)
                q, k, v, dout = (torch.randn(n, h, L, e, device="cuda", dtype=dtype, generator=gen) for _ in range(4))
                for x in (q, k, v):
                    x.requires_grad_()
                for name, fn in impls.items():
                    tuned_before = set(tuned_configs())
                    try:
                        ms_f, ms_fb = _time_one(fn, q, k, v, dout, causal, with_backward)
                    except Exception as exc:  # a backend that refuses this case (cuDNN head dims, ...)
                        row = dict(impl=name, head_dim=e, seqlen=L, causal=causal, error=f"{type(exc).__name__}")
                    else:
                        row = _row(name, n, h, L, e, causal, dtype, modes, ms_f, ms_fb)
                    chosen = {key[0]: str(cfg) for key, cfg in tuned_configs().items() if key not in tuned_before}
                    if chosen:  # the autotuner's picks for this shape (fwd, dkdv, dq)
                        row["configs"] = " ".join(f"{kind}:{cfg}" for kind, cfg in chosen.items())
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


CPU_CASES = [(256, 64, False), (256, 64, True), (1024, 64, True)]


def bench_cpu(cases=CPU_CASES) -> list[dict]:
    """No GPU: time fastattn's CPU path (PyTorch) against torch's SDPA, and check they agree."""
    rows = []
    for L, e, causal in cases:
        q, k, v = (torch.randn(2, 8, L, e) for _ in range(3))
        ref = _torch.scaled_dot_product_attention(q, k, v, is_causal=causal)
        impls = {"fastattn": fastattn.scaled_dot_product_attention, "torch-sdpa": _torch.scaled_dot_product_attention}
        for name, fn in impls.items():
            out = fn(q, k, v, is_causal=causal)
            ms = time_ms(lambda fn=fn, q=q, k=k, v=v, c=causal: fn(q, k, v, is_causal=c))
            err = ((out - ref).norm() / ref.norm()).item()
            flops = attention_flops(2, 8, L, L, e, causal, "fwd")
            rows.append(
                dict(
                    impl=name,
                    head_dim=e,
                    seqlen=L,
                    causal=causal,
                    fwd_ms=round(ms, 3),
                    fwd_gflops=round(flops / ms * 1e-6, 1),
                    rel_err_vs_torch=f"{err:.1e}",
                )
            )
    return rows


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
            [int(x) for x in args.head_dims.split(",")],
            [int(x) for x in args.seqlens.split(",")],
            dtype,
            args.modes.split(","),
            [x for x in args.impls.split(",") if x],
        )
    else:
        print("# no GPU here: timing fastattn's CPU path (PyTorch) against torch's SDPA on the CPU")
        rows = bench_cpu()
    report(rows, args.out, "attention")


if __name__ == "__main__":
    main()
