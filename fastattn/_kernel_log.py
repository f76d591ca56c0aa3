"""``fastattn.kernel_log()``: which kernels fastattn launched, and through which backend.

Every launch site calls ``record(op, kernel, backend)``; inside ``with fastattn.kernel_log() as log:`` each
launch appends a ``KernelLaunch`` (``op`` such as ``"attention_fwd"``, ``kernel`` the kernel's name,
``backend`` one of ``"triton"``, ``"gluon"``, ``"cuda"``, ``"torch"``). The entries are the same on a GPU and on
the CPU (Triton's interpreter, the Gluon emulator). While ``torch.compile`` traces nothing is recorded: the
compiled graph's custom ops record when they run.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import NamedTuple

import torch

BACKENDS = ("triton", "gluon", "cuda", "torch")


class KernelLaunch(NamedTuple):
    op: str
    kernel: str
    backend: str


_active: contextvars.ContextVar[tuple[list, ...]] = contextvars.ContextVar("fastattn_kernel_log", default=())


@contextlib.contextmanager
def kernel_log() -> Iterator[list[KernelLaunch]]:
    """Context manager yielding the list of ``KernelLaunch`` entries made inside it (nested logs each get
    every launch of their block)."""
    entries: list[KernelLaunch] = []
    token = _active.set(_active.get() + (entries,))
    try:
        yield entries
    finally:
        _active.reset(token)


def record(op: str, kernel: str, backend: str) -> None:
    if torch.compiler.is_compiling():  # first: Dynamo cannot trace ContextVar.get
        return
    logs = _active.get()
    if not logs:
        return
    entry = KernelLaunch(op, kernel, backend)
    for entries in logs:
        entries.append(entry)
