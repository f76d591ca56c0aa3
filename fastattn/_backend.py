"""Backend choice: one place decides whether an op runs its Triton kernel or the PyTorch path.

``auto`` takes Triton for CUDA tensors and PyTorch on the CPU; ``triton`` asks for the kernels everywhere
they can run (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); ``torch`` always takes PyTorch.
When the kernels cannot take a case, the PyTorch path runs and a one-time warning gives the reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastattn_backend", default=None)
_warned: set[str] = set()


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def current_backend() -> str:
    """The backend in force: the innermost ``fastattn.backend(...)`` context, else ``FASTATTN_BACKEND``,
    else ``"auto"``."""
    name = _override.get()
    if name is not None:
        return name
    return _check_name(os.environ.get("FASTATTN_BACKEND", "auto").strip().lower() or "auto", "FASTATTN_BACKEND")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager that selects the backend (``"auto"``, ``"triton"`` or ``"torch"``) in its block."""
    token = _override.set(_check_name(name, "backend"))
    try:
        yield
    finally:
        _override.reset(token)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> str | None:
    """None if Triton imports here, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # Triton ships for Linux only
        return f"triton is not importable ({exc})"
    return None


def warn_once(op: str, reason: str) -> None:
    """Warn once per (op, reason) that the PyTorch path runs instead of the kernel."""
    key = f"{op}: {reason}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"fastattn.{op}: running the PyTorch path because {reason}", RuntimeWarning, stacklevel=3)


def use_triton(op: str, device: torch.device, refusal: str | None) -> bool:
    """Whether ``op`` runs its Triton kernel for tensors on ``device``.

    ``refusal`` is the kernel's own reason for not taking this case (None if it can). The reasons reach the
    user as a one-time warning whenever the kernel was asked for (``triton``, or ``auto`` on CUDA)."""
    name = current_backend()
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return False
    if device.type != "cuda" and not interpreting():
        refusal = refusal or f"tensors on {device.type} need CUDA, or TRITON_INTERPRET=1 for the interpreter"
    refusal = refusal or triton_available()
    if refusal is not None:
        warn_once(op, refusal)
        return False
    return True
