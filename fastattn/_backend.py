"""Backend choice: one place decides whether an op runs its CUDA C++, Gluon or Triton kernel, or PyTorch.

``auto`` takes Triton for CUDA tensors (for the SDPA drop-in, torch's own SDPA where the committed GPU
measurements found it faster: ``ops.attention.choice``) and PyTorch on the CPU; ``triton`` asks for the Triton
kernels everywhere they can run (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); ``gluon`` asks for
the Gluon kernels of the attention forward (sm_90, or the Gluon emulator under ``TRITON_INTERPRET=1``), then
Triton for what they do not take; ``cuda`` asks for the CUDA C++ kernels of ``fastattn._C`` (CUDA tensors
only), then Triton for what they do not take; ``torch`` always takes PyTorch. Each step down (CUDA or Gluon to
Triton, Triton to PyTorch) gives its reason in a one-time warning.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("auto", "triton", "gluon", "cuda", "torch")
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastattn_backend", default=None)
_warned: set[str] = set()
_ENV_NAMES: dict[str, str] = {}


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


@torch.compiler.assume_constant_result
def current_backend() -> str:
    """The backend in force: the innermost ``fastattn.backend(...)`` context, else ``FASTATTN_BACKEND``,
    else ``"auto"``. Under ``torch.compile`` it is read once, when the function is traced."""
    name = _override.get()
    if name is not None:
        return name
    raw = _env_value()
    name = _ENV_NAMES.get(raw)
    if name is None:  # checked once per value: this runs several times per op call
        text = os.environ.get("FASTATTN_BACKEND", "auto")
        name = _ENV_NAMES[raw] = _check_name(text.strip().lower() or "auto", "FASTATTN_BACKEND")
    return name


_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("FASTATTN_BACKEND") if _ENV_DATA is not None else None


def _env_value():
    """FASTATTN_BACKEND's raw value (None when unset), read per call (tests and users change it at run time)
    from the mapping behind ``os.environ``, which spares the str encoding and decoding of ``os.environ.get``
    (a microsecond of every op call on the CPU path)."""
    if _ENV_DATA is None:
        return os.environ.get("FASTATTN_BACKEND")
    return _ENV_DATA.get(_ENV_KEY)


def torch_path(device: torch.device) -> bool:
    """Whether every kernel backend steps aside for tensors on ``device`` (``torch``, or ``auto`` off CUDA):
    the public ops then call torch's own op at once, with torch's checks, so the CPU path costs what torch
    costs (the checks and the dispatch below are per call, and at decode sizes they outweigh the op)."""
    name = current_backend()
    return name == "torch" or (name == "auto" and device.type != "cuda")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Context manager that selects the backend (``"auto"``, ``"triton"``, ``"gluon"``, ``"cuda"`` or
    ``"torch"``) in its block."""
    token = _override.set(_check_name(name, "backend"))
    try:
        yield
    finally:
        _override.reset(token)


@torch.compiler.assume_constant_result
def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result
def triton_available() -> str | None:
    """None if Triton imports here, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # Triton ships for Linux only
        return f"triton is not importable ({exc})"
    return None


def warn_once(op: str, reason: str, instead: str = "the PyTorch path") -> None:
    """Warn once per (op, reason) that ``instead`` runs rather than the kernel asked for."""
    key = f"{op}: {instead}: {reason}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"fastattn.{op}: running {instead} because {reason}", RuntimeWarning, stacklevel=3)


def use_cuda(op: str, device: torch.device, refusal: Callable[[], str | None]) -> bool:
    """Whether ``op`` runs its CUDA C++ kernel: only under the ``cuda`` backend, when the extension runs on
    ``device`` and ``refusal()`` (the kernel's own reason for not taking the case, or None) allows. Otherwise,
    under ``cuda``, a one-time warning says why and the caller goes on to Triton."""
    if current_backend() != "cuda":
        return False
    from .ops.cuda_ext import unavailable

    why = unavailable(device) or refusal()
    if why is not None:
        warn_once(op, f"the CUDA kernels cannot run: {why}", instead="the Triton kernels")
        return False
    return True


def use_gluon(op: str, refusal: Callable[[], str | None]) -> bool:
    """Whether ``op`` runs its Gluon kernel: only under the ``gluon`` backend, when ``refusal()`` (the
    kernel's reason for not taking the case, or None) allows; otherwise, under ``gluon``, a one-time warning
    says why and the caller goes on to Triton."""
    if current_backend() != "gluon":
        return False
    why = refusal() or triton_available()
    if why is not None:
        warn_once(op, f"the Gluon kernels cannot run: {why}", instead="the Triton kernels")
        return False
    return True


def no_gluon_kernel(op: str) -> None:
    """For an op with no Gluon kernel, about to run its Triton kernel: under ``gluon``, say so once."""
    if current_backend() == "gluon":
        warn_once(op, f"the Gluon kernels have no {op}", instead="the Triton kernels")


def triton_only(op: str) -> None:
    """For an op the CUDA C++ (or Gluon) kernels do not implement, about to run its Triton kernel: under the
    ``cuda`` or ``gluon`` backend, say so once (the user asked for those kernels)."""
    name = current_backend()
    if name in ("cuda", "gluon"):
        kind = "CUDA C++" if name == "cuda" else "Gluon"
        warn_once(op, f"the {kind} kernels have no {op}", instead="the Triton kernels")


def use_triton(op: str, device: torch.device, refusal: str | None) -> bool:
    """Whether ``op`` runs its Triton kernel for tensors on ``device``.

    ``refusal`` is the kernel's own reason for not taking this case (None if it can). The reasons reach the
    user as a one-time warning whenever the kernel was asked for (``triton``, ``cuda``, or ``auto`` on CUDA)."""
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
