"""``fastattn-bench`` (also ``python -m fastattn.bench``): end-to-end model speed and kernel microbenchmarks.

    fastattn-bench e2e [--quick] [--out DIR] [--plot DIR] [--compile | --no-compile]
    fastattn-bench kernels [--quick] [--out DIR] [--plot DIR]
    fastattn-bench all ...

Each prints its table (with a progress bar over the cases), writes the same rows as JSON and Markdown under
``--out`` and, with ``--plot``, PNG plots. Ratios against torch are taken case by case within the run.
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from . import attention, decode, e2e, norms, posenc
from .report import Progress, add_ratios, plot, to_markdown, write


def _header() -> str:
    if torch.cuda.is_available():
        return f"# {torch.cuda.get_device_name()}, torch {torch.__version__}"
    return (f"# No GPU here ({platform.processor() or platform.machine()}, torch {torch.__version__}): these are CPU "
            f"timings of fastattn's CPU path (PyTorch ops) against stock PyTorch. GPU numbers need a GPU: run "
            f"this on one, or benchmarks/device_check.sh.")  # fmt: skip


def _emit(rows: list[dict], name: str, args) -> None:
    print(f"\n## {name}\n")
    print(to_markdown(rows))
    paths = write(rows, args.out, name)
    print(f"\n(wrote {', '.join(paths)})")


def run_e2e(args) -> list[dict]:
    size, shapes, _, _ = e2e.cases(args.quick)
    models = args.models.split(",")
    compile_torch = args.compile if args.compile is not None else torch.cuda.is_available()
    n_impls = len(e2e.implementations(compile_torch))
    progress = Progress(len(models) * len(shapes) * n_impls)
    rows = e2e.run(args.quick, models, compile_torch, progress)
    add_ratios(rows, ("model", "seqlen", "batch"), ("train_tok_s", "prefill_tok_s", "decode_tok_s"), "torch")
    _emit(rows, "e2e", args)
    if not compile_torch:
        print("(torch.compile left out: on a CPU compiling the model takes minutes; --compile adds it)")
    if args.plot:
        for metric in ("train_tok_s", "decode_tok_s"):
            path = plot(rows, "seqlen", metric, os.path.join(args.plot, f"e2e_{metric}.png"),
                        f"{metric} (d_model {size.d_model}, {size.layers} layers)", group=("model",))  # fmt: skip
            if path:
                print(f"(plot {path})")
    return rows


def run_kernels(args) -> list[dict]:
    gpu = torch.cuda.is_available()
    progress = Progress(4)
    if gpu:
        seqlens = [1024, 4096] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
        att = attention.bench_cuda([128] if args.quick else [64, 128], seqlens, torch.bfloat16, ["fwd", "bwd"])
        add_ratios(att, ("head_dim", "seqlen", "causal"), ("fwd_tflops", "bwd_tflops"), "sdpa-flash")
    else:
        att = attention.bench_cpu([(256, 64, False), (256, 64, True)] if args.quick else attention.CPU_CASES)
        add_ratios(att, ("head_dim", "seqlen", "causal"), ("fwd_gflops",), "torch-sdpa")
    progress.step("attention")
    dtype = torch.bfloat16 if gpu else torch.float32
    hidden = [1024, 4096, 8192] if gpu else [256, 1024]
    nrm = norms.run(hidden if args.quick or not gpu else hidden + [16384], 16384 if gpu else 1024, dtype)
    add_ratios(nrm, ("op", "hidden"), ("fwd_gbps", "bwd_gbps"), "torch")
    progress.step("norms")
    pe = posenc.run(16384 if gpu else 2048, [1024, 4096] if gpu else [256], dtype)
    for ref in ("torch (table)", "torch (tables)"):
        add_ratios(pe, ("op", "d"), ("gbps",), ref)
    progress.step("encodings")
    dec = decode.run_decode(args.quick) + decode.run_varlen(args.quick)
    add_ratios(dec, ("op", "batch", "cache_len"), ("gbps",), "torch")
    add_ratios(dec, ("op", "sequences", "tokens"), ("tflops",), "torch (padded)")
    progress.step("decode and varlen")
    for rows, name in ((att, "attention"), (nrm, "norms"), (pe, "posenc"), (dec, "decode")):
        _emit(rows, name, args)
    if args.plot:
        metric = "fwd_tflops" if gpu else "fwd_gflops"
        paths = [
            plot(att, "seqlen", metric, os.path.join(args.plot, "attention.png"), f"attention forward {metric}",
                 group=("head_dim", "causal")),
            plot(nrm, "hidden", "fwd_gbps", os.path.join(args.plot, "norms.png"), "norm forward GB/s", group=("op",)),
            plot(pe, "d", "gbps", os.path.join(args.plot, "posenc.png"), "encodings GB/s", group=("op",)),
        ]  # fmt: skip
        print("".join(f"(plot {p})\n" for p in paths if p), end="")
    return att + nrm + pe + dec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="fastattn-bench", description=__doc__.splitlines()[0])
    ap.add_argument("command", nargs="?", default="e2e", choices=["e2e", "kernels", "all"])
    ap.add_argument("--quick", action="store_true", help="a few small cases (under a minute on a CPU)")
    ap.add_argument("--out", default="bench-results", help="directory for the JSON and Markdown results")
    ap.add_argument("--plot", default="", help="directory for PNG plots (needs matplotlib)")
    ap.add_argument("--models", default="gpt,transformer")
    ap.add_argument("--compile", dest="compile", action="store_true", default=None, help="include torch.compile")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    args = ap.parse_args(argv)
    print(_header())
    if args.command in ("e2e", "all"):
        run_e2e(args)
    if args.command in ("kernels", "all"):
        run_kernels(args)
    return 0
