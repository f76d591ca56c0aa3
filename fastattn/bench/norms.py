"""Norm benchmark: fastattn's layer norm / RMSNorm against torch's ops, torch.compile of them, and Liger-Kernel
and Apex where installed.

GB/s of the minimal bytes (inputs read once, outputs written once): forward reads x and writes y (weights
are negligible); backward reads x, dy and writes dx. The median of ``triton.testing.do_bench``; 16k rows
of each hidden size. Without a GPU it says so and times the CPU path against torch.

    python -m fastattn.bench.norms [--hidden 1024,...,16384] [--rows 16384] [--dtype bf16] [--out DIR]
"""

from __future__ import annotations

import argparse

import torch

import fastattn
from fastattn import _torch

from .common import kernel_backends, on_backend, time_ms
from .report import report


def _impls(kind: str) -> dict:
    if kind == "layer_norm":
        ours = lambda x, w, b: fastattn.layer_norm(x, x.shape[-1:], w, b)  # noqa: E731
        ref = lambda x, w, b: _torch.layer_norm(x, x.shape[-1:], w, b)  # noqa: E731
    else:
        ours = lambda x, w, b: fastattn.rms_norm(x, x.shape[-1:], w)  # noqa: E731
        ref = lambda x, w, b: _torch.rms_norm(x, x.shape[-1:], w)  # noqa: E731
    impls = {name: on_backend(ours, backend) for name, backend in kernel_backends().items()}
    impls["torch"] = ref
    if torch.cuda.is_available():
        impls["torch.compile"] = torch.compile(ref)
    impls.update(_peers(kind))
    return impls


def _peers(kind: str) -> dict:
    """Liger-Kernel and Apex, where installed (their public functional entry points)."""
    peers = {}
    try:
        from liger_kernel.transformers.functional import liger_layer_norm, liger_rms_norm

        if kind == "layer_norm":
            peers["liger"] = lambda x, w, b: liger_layer_norm(x, w, b, 1e-5)
        else:
            peers["liger"] = lambda x, w, b: liger_rms_norm(x, w, 1e-6)
    except ImportError:
        pass
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine, fused_rms_norm_affine

        if kind == "layer_norm":
            peers["apex"] = lambda x, w, b: fused_layer_norm_affine(x, w, b, x.shape[-1:], 1e-5)
        else:
            peers["apex"] = lambda x, w, b: fused_rms_norm_affine(x, w, x.shape[-1:], 1e-6)
    except ImportError:
        pass
    return peers


def run(hidden_sizes, rows, dtype) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = []
    for kind in ("layer_norm", "rms_norm"):
        for n in hidden_sizes:
            x = torch.randn(rows, n, device=device, dtype=dtype, requires_grad=True)
            w = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
            b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn(rows, n, device=device, dtype=dtype)
            size = x.numel() * x.element_size()
            for name, fn in _impls(kind).items():
                ms_f = time_ms(fn, x, w, b)
                ms_b = time_ms(fn, x, w, b, backward=dy)
                row = dict(op=kind, impl=name, hidden=n, rows=rows, dtype=str(dtype).split(".")[-1])
                row.update(fwd_ms=round(ms_f, 4), fwd_gbps=round(2 * size / ms_f * 1e-6, 1))
                row.update(bwd_ms=round(ms_b, 4), bwd_gbps=round(3 * size / ms_b * 1e-6, 1))
                out.append(row)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", default="1024,2048,4096,8192,16384")
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    hidden = [int(h) for h in args.hidden.split(",")]
    rows = args.rows
    if not torch.cuda.is_available():
        print("# no GPU here: timing the CPU path (PyTorch's ops) on a small problem")
        hidden, rows, dtype = hidden[:2], 256, torch.float32
    report(run(hidden, rows, dtype), args.out, "norms")


if __name__ == "__main__":
    main()
