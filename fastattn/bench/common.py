"""Timing and implementation helpers shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

import fastattn


def on_backend(fn: Callable, name: str) -> Callable:
    """``fn`` run under ``fastattn.backend(name)``."""

    def run(*args):
        with fastattn.backend(name):
            return fn(*args)

    return run


def kernel_backends(gluon: bool = False) -> dict[str, str]:
    """Implementation name -> fastattn backend: the Triton kernels on a GPU ("auto", the CPU path, elsewhere),
    with ``gluon`` the Gluon kernels on sm_90 (``fastattn-gluon``: attention only has them), and the CUDA
    C++ kernels where ``fastattn._C`` runs on this GPU."""
    if not torch.cuda.is_available():
        return {"fastattn": "auto"}
    from fastattn.ops.cuda_ext import unavailable

    out = {"fastattn": "triton"}
    if gluon and torch.cuda.get_device_capability()[0] == 9:
        out["fastattn-gluon"] = "gluon"
    if unavailable(torch.device("cuda")) is None:
        out["fastattn-cuda"] = "cuda"
    return out


def time_ms(fn: Callable, *args, backward: torch.Tensor | None = None, reps: int = 5) -> float:
    """Median ms of ``fn(*args)`` (or of its backward with ``backward`` as the output gradient): by
    ``triton.testing.do_bench`` on a GPU; on the CPU by wall clock after a warm-up, over at least ``reps``
    runs."""
    if torch.cuda.is_available():
        import triton.testing

        if backward is None:
            return triton.testing.do_bench(lambda: fn(*args), return_mode="median")
        out = fn(*args)
        return triton.testing.do_bench(lambda: out.backward(backward, retain_graph=True), return_mode="median")

    def once() -> float:
        t0 = time.perf_counter()
        out = fn(*args)
        if backward is not None:
            out.backward(backward)
        return (time.perf_counter() - t0) * 1e3

    once()
    once()  # warm-up: allocator, thread pool
    times: list[float] = []
    budget = time.perf_counter() + 0.25  # short ops get more runs, up to 50, for a stable median
    while len(times) < reps or (len(times) < 50 and time.perf_counter() < budget):
        times.append(once())
    return sorted(times)[len(times) // 2]
