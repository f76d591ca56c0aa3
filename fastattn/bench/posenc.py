"""Positional-encoding benchmark: fastattn's sinusoidal add and rotary embeddings against PyTorch versions.

GB/s of the minimal bytes: the sinusoidal add reads x and writes y; rotary reads and writes q and k (the
torch versions also read precomputed tables, which the kernels compute instead). Median of
``triton.testing.do_bench``. Without a GPU it says so and times the CPU path.

    python -m fastattn.bench.posenc [--tokens 16384] [--d-model 1024,4096] [--dtype bf16] [--out DIR]
"""

from __future__ import annotations

import argparse

import torch

import fastattn
from fastattn.ops.posenc.reference import inv_freq, sinusoidal_table

from .common import kernel_backends, on_backend, time_ms
from .report import report


def run(tokens: int, d_models: list[int], dtype: torch.dtype) -> list[dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for d in d_models:
        x = torch.randn(tokens // 512, 512, d, device=device, dtype=dtype)
        table = sinusoidal_table(torch.arange(512, device=device), d).to(dtype)
        impls = {
            name: on_backend(lambda x=x: fastattn.sinusoidal_encoding(x), backend)
            for name, backend in kernel_backends().items()
        }
        impls["torch (table)"] = lambda x=x, table=table: x + table
        for name, fn in impls.items():
            ms = time_ms(fn)
            rows.append(dict(op="sinusoidal", impl=name, d=d, tokens=tokens, ms=round(ms, 4),
                             gbps=round(2 * x.numel() * x.element_size() / ms * 1e-6, 1)))  # fmt: skip
    n, h, e = tokens // 1024, 32, 128
    q = torch.randn(n, h, 1024, e, device=device, dtype=dtype)
    k = torch.randn(n, 8, 1024, e, device=device, dtype=dtype)
    # The usual PyTorch form (as in Hugging Face models): cached cos/sin tables and rotate_half.
    angles = torch.outer(
        torch.arange(1024, device=device, dtype=torch.float32), inv_freq(e // 2, e, 1e4, device).float()
    )
    cos, sin = (f(torch.cat([angles, angles], -1)).to(dtype) for f in (torch.cos, torch.sin))

    def torch_rope(t):
        x1, x2 = t[..., : e // 2], t[..., e // 2 :]
        return t * cos + torch.cat([-x2, x1], -1) * sin

    impls = {name: on_backend(lambda: fastattn.apply_rotary(q, k), b) for name, b in kernel_backends().items()}
    impls["torch (tables)"] = lambda: (torch_rope(q), torch_rope(k))
    for name, fn in impls.items():
        ms = time_ms(fn)
        size = (q.numel() + k.numel()) * q.element_size()
        rows.append(
            dict(op="rotary", impl=name, d=e, tokens=tokens, ms=round(ms, 4), gbps=round(2 * size / ms * 1e-6, 1))
        )
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--d-model", default="1024,4096")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    tokens = args.tokens
    if not torch.cuda.is_available():
        print("# no GPU here: timing the CPU path on a small problem")
        tokens, dtype = 2048, torch.float32
    report(run(tokens, [int(d) for d in args.d_model.split(",")], dtype), args.out, "posenc")


if __name__ == "__main__":
    main()
