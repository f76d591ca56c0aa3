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


def measure(model: str, impl: str, net, inputs, new_tokens: int, reps: int, decode: bool) -> dict:
    """Times of one implementation on one case (``net`` already on the device, in its dtype)."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def train_step():
        opt.zero_grad(set_to_none=True)
        _loss(net, inputs).backward()
        opt.step()

    row: dict = {}
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    row["train_ms"] = round(_median_ms(train_step, reps), 3)
    if torch.cuda.is_available():
        row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    tokens = inputs[0].numel()
    row["train_tok_s"] = round(tokens / row["train_ms"] * 1e3)
    with torch.no_grad():
        row["prefill_tok_s"] = round(tokens / _median_ms(lambda: net(*inputs), reps) * 1e3)
    if decode:
        base = net._orig_mod if hasattr(net, "_orig_mod") else net
        if model == "gpt":
            gen = lambda: base.generate(inputs[0], new_tokens)  # noqa: E731
        else:
            gen = lambda: base.generate(inputs[0], new_tokens, bos_id=1)  # noqa: E731
        ms = _median_ms(gen, max(1, reps // 2), warmup=1)
        row["decode_tok_s"] = round(inputs[0].shape[0] * new_tokens / ms * 1e3)
    return row


def cases(quick: bool) -> tuple[Size, list[tuple[int, int]], int, int]:
    """(model size, [(seqlen, batch)], new tokens to decode, timing repetitions) for this machine."""
    if torch.cuda.is_available():
        if quick:
            return GPU_SIZE, [(1024, 8), (4096, 2)], 32, 5
        return GPU_SIZE, [(512, 32), (1024, 16), (2048, 8), (4096, 4), (8192, 2)], 64, 10
    if quick:
        return CPU_SIZE, [(64, 4), (128, 4)], 8, 3
    return CPU_SIZE, [(64, 8), (128, 8), (256, 4)], 16, 5


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
            for name, (impl, backend) in impls.items():
                net = build(model, size, impl, max_len)
                net.load_state_dict(weights)
                net = net.to(device=device, dtype=dtype)
                if backend == "compile":
                    net = torch.compile(copy.deepcopy(net))
                row = dict(model=model, impl=name, seqlen=seqlen, batch=batch, dtype=str(dtype).split(".")[-1])
                try:
                    with fastattn.backend(backend if backend not in (None, "compile") else "auto"):
                        row.update(measure(model, impl, net, inputs, new_tokens, reps, decode=backend != "compile"))
                except Exception as exc:  # one implementation failing must not lose the others' rows
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:80]}"
                rows.append(row)
                if progress is not None:
                    progress.step(f"e2e {model} L={seqlen} {name}")
                del net
    return rows
