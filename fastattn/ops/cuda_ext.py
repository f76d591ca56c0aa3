"""The CUDA C++ extension ``fastattn._C``: loaded lazily and once, with the reason when it cannot run here.

The extension takes raw pointers and a stream handle, so this module is the one place that turns tensors into
those integers and a returned ``cudaError_t`` code into a Python error.
"""

from __future__ import annotations

import functools
import importlib

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.lru_cache(maxsize=1)
def _load():
    """(module, None) or (None, why the extension cannot be imported)."""
    try:
        return importlib.import_module("fastattn._C"), None
    except ImportError as exc:
        return None, f"fastattn._C is not built ({exc}); it needs nvcc when the package is installed"


def ext():
    module, why = _load()
    if module is None:
        raise RuntimeError(why)
    return module


@functools.lru_cache(maxsize=16)
def _arch_refusal(index: int) -> str | None:
    major, minor = torch.cuda.get_device_capability(index)
    archs = ext().runtime_info()["archs"]
    compiled = [a.rstrip("a") for a in archs.split(";") if a]
    if f"{major}{minor}" not in compiled:
        return f"sm_{major}{minor} is not among the archs fastattn._C was compiled for ({archs})"
    return None


def unavailable(device: torch.device) -> str | None:
    """None when the CUDA kernels can run on ``device``, else why not."""
    if device.type != "cuda":
        return f"they need CUDA tensors, and these are on {device.type}"
    module, why = _load()
    if module is None:
        return why
    return _arch_refusal(device.index if device.index is not None else torch.cuda.current_device())


def launch(t: torch.Tensor, name: str, *args) -> int:
    """Call launcher ``name`` of the extension with ``t``'s device current: the kernels (and their attribute
    settings) go to the current device, and the stream passed is that device's."""
    from .._kernel_log import record

    record(_OPS.get(name, name), name, "cuda")
    with torch.cuda.device(t.device):
        return getattr(ext(), name)(*args)


_OPS = {
    "attention_forward": "attention_fwd", "attention_backward": "attention_bwd", "norm_forward": "norm_fwd",
    "norm_backward": "norm_bwd", "rotary_forward": "apply_rotary", "sinusoidal_forward": "sinusoidal_encoding",
}  # fmt: skip


def check(code: int, op: str) -> None:
    """Raise for a non-zero ``cudaError_t`` returned by a launcher."""
    if code != 0:
        raise RuntimeError(f"fastattn.{op}: CUDA kernel launch failed: {ext().error_string(code)} (code {code})")


def stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def aligned_rows(t: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """``t`` if its unit-stride rows start on 16-byte boundaries (strides multiples of ``multiple`` elements,
    aligned base), else a contiguous copy: the kernels read rows in 16-byte chunks."""
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s % multiple == 0 for s in t.stride()[:-1])
    if ok:
        return t
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    out.copy_(t)
    return out
