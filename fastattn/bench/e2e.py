"""End-to-end speed of the reference models: fastattn's ops against stock PyTorch with the same weights.

Per model (``gpt``: decoder-only, RoPE, GQA; ``transformer``: encoder-decoder), sequence length and batch:
- ``train_ms`` / ``train_tok_s``: one training step (forward, backward, AdamW step) and tokens per second;
- ``prefill_tok_s``: a forward pass without gradients over the batch;
- ``decode_tok_s``: greedy generation of new tokens with the key/value cache, tokens per second;
- ``peak_mem_mb``: peak CUDA memory of the training step (GPU only).
Implementations: ``fastattn`` (the models' ``impl="fastattn"``, Triton kernels on a GPU; on a CPU the CPU
path), ``fastattn-cuda`` (the CUDA C++ kernels, where built), ``torch`` (``impl="torch"``, eager) and
``torch.compile`` (the torch model compiled; training and prefill only).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

import fastattn
from fastattn.models import GPT, Transformer

from .common import kernel_backends


@dataclass(frozen=True)
class Size:
    d_model: int
    nhead: int
    layers: int
    vocab: int
    kv_heads: int


GPU_SIZE = Size(d_model=2048, nhead=16, layers=4, vocab=32000, kv_heads=4)  # head dim 128
CPU_SIZE = Size(d_model=128, nhead=4, layers=2, vocab=1000, kv_heads=2)


def build(model: str, size: Size, impl: str, max_len: int) -> torch.nn.Module:
    if model == "gpt":
        return GPT(size.d_model, size.nhead, size.layers, vocab_size=size.vocab, kv_heads=size.kv_heads,
                   max_len=max_len, impl=impl)  # fmt: skip
    return Transformer(size.d_model, size.nhead, size.layers, vocab_size=size.vocab, dropout=0.0, max_len=max_len,
                       impl=impl)  # fmt: skip


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_ms(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _inputs(model: str, batch: int, seqlen: int, vocab: int, device):
    gen = torch.Generator().manual_seed(seqlen)
    ids = lambda: torch.randint(3, vocab, (batch, seqlen), generator=gen).to(device)  # noqa: E731
    return (ids(),) if model == "gpt" else (ids(), ids())


def _loss(net, inputs):
    logits = net(*inputs)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), inputs[-1].flatten())


def _jobs(model: str, net, inputs, new_tokens: int, decode: bool) -> dict:
    """metric -> the function that one repetition of it runs, for one implementation's ``net``."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def train_step():
        opt.zero_grad(set_to_none=True)
        _loss(net, inputs).backward()
        opt.step()

    def prefill():
        with torch.no_grad():
            net(*inputs)

    jobs = {"train": train_step, "prefill": prefill}
    if decode:
        base = net._orig_mod if hasattr(net, "_orig_mod") else net
        extra = {} if model == "gpt" else {"bos_id": 1}
        jobs["decode"] = lambda: base.generate(inputs[0], new_tokens, **extra)
    return jobs


def _interleaved_ms(runs: dict, reps: int, warmup: int) -> dict:
    """name -> median ms of ``runs[name] = (backend, fn)``, the repetitions of the implementations taken in
    turn (one each, then again), so that a drift of the machine's speed weighs on all of them alike."""
    for backend, fn in runs.values():
        with fastattn.backend(backend):
            for _ in range(warmup):
                fn()
    _sync()
    times: dict = {name: [] for name in runs}
    for _ in range(reps):
        for name, (backend, fn) in runs.items():
            with fastattn.backend(backend):
                t0 = time.perf_counter()
                fn()
                _sync()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def measure_case(model: str, nets: dict, inputs, new_tokens: int, reps: int) -> dict:
    """name -> row of times for the implementations ``nets[name] = (backend, net, decode)`` on one case. An
    implementation that fails gets an ``error`` instead and the others go on."""
    rows: dict = {name: {} for name in nets}
    jobs: dict = {}
    for name, (backend, net, decode) in nets.items():
        try:
            jobs[name] = _jobs(model, net, inputs, new_tokens, decode)
            if torch.cuda.is_available():  # peak memory of one training step, each implementation alone
                torch.cuda.reset_peak_memory_stats()
                with fastattn.backend(backend):
                    jobs[name]["train"]()
                rows[name]["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        except Exception as exc:  # one implementation failing must not lose the others' rows
            rows[name]["error"] = f"{type(exc).__name__}: {str(exc)[:80]}"
    tokens = inputs[0].numel()
    decode_reps = reps if not torch.cuda.is_available() else max(1, reps // 2)
    for metric, n, warmup in (("train", reps, 2), ("prefill", reps, 2), ("decode", decode_reps, 1)):
        runs = {
            name: (nets[name][0], j[metric]) for name, j in jobs.items() if metric in j and "error" not in rows[name]
        }
        try:
            ms = _interleaved_ms(runs, n, warmup)
        except Exception:  # time them one by one, to find which failed
            ms = {}
            for name, run in runs.items():
                try:
                    ms.update(_interleaved_ms({name: run}, n, warmup))
                except Exception as exc:
                    rows[name]["error"] = f"{type(exc).__name__}: {str(exc)[:80]}"
        for name, t in ms.items():
            if metric == "train":
                rows[name]["train_ms"] = round(t, 3)
                rows[name]["train_tok_s"] = round(tokens / t * 1e3)
            elif metric == "prefill":
                rows[name]["prefill_tok_s"] = round(tokens / t * 1e3)
            else:
                rows[name]["decode_tok_s"] = round(inputs[0].shape[0] * new_tokens / t * 1e3)
    return rows


def cases(quick: bool) -> tuple[Size, list[tuple[int, int]], int, int]:
    """(model size, [(seqlen, batch)], new tokens to decode, timing repetitions) for this machine."""
    if torch.cuda.is_available():
        if quick:
            return GPU_SIZE, [(1024, 8), (4096, 2)], 32, 5
        return GPU_SIZE, [(512, 32), (1024, 16), (2048, 8), (4096, 4), (8192, 2)], 64, 10
    # Each CPU case takes milliseconds and a 2-core machine's timings drift by several percent from one
    # moment to the next: medians of 9 repetitions keep the ratios to torch within about 2 %.
    if quick:
        return CPU_SIZE, [(64, 4), (128, 4)], 8, 9
    return CPU_SIZE, [(64, 8), (128, 8), (256, 4)], 16, 9


def implementations(compile_torch: bool) -> dict[str, tuple[str, str | None]]:
    """name -> (model impl, fastattn backend); torch.compile is marked by backend 'compile'."""
    impls: dict[str, tuple[str, str | None]] = {name: ("fastattn", b) for name, b in kernel_backends().items()}
    impls["torch"] = ("torch", None)
    if compile_torch:
        impls["torch.compile"] = ("torch", "compile")
    return impls


def run(quick: bool = False, models=("gpt", "transformer"), compile_torch: bool | None = None, progress=None):
    """Rows of the e2e table. ``compile_torch`` defaults to on with a GPU and off on a CPU (where compiling
    the model takes minutes)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if compile_torch is None:
        compile_torch = device == "cuda"
    size, shapes, new_tokens, reps = cases(quick)
    impls = implementations(compile_torch)
    rows = []
    for model in models:
        max_len = max(L for L, _ in shapes) + new_tokens + 1
        torch.manual_seed(0)
        weights = build(model, size, "torch", max_len).state_dict()
        for seqlen, batch in shapes:
            inputs = _inputs(model, batch, seqlen, size.vocab, device)
            nets = {}
            for name, (impl, backend) in impls.items():
                net = build(model, size, impl, max_len)
                net.load_state_dict(weights)
                net = net.to(device=device, dtype=dtype)
                if backend == "compile":
                    net = torch.compile(copy.deepcopy(net))
                # torch.compile has no decode row (generate() steps out of the compiled forward).
                nets[name] = ("auto" if backend in (None, "compile") else backend, net, backend != "compile")
            measured = measure_case(model, nets, inputs, new_tokens, reps)
            for name in impls:
                row = dict(model=model, impl=name, seqlen=seqlen, batch=batch, dtype=str(dtype).split(".")[-1])
                row.update(measured[name])
                rows.append(row)
                if progress is not None:
                    progress.step(f"e2e {model} L={seqlen} {name}")
            del nets
    return rows
