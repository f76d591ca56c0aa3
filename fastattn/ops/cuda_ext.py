"""The CUDA C++ extensions: ``fastattn._C`` (the kernels for the GPU) and ``fastattn._C_host`` (the same
kernels built as host C++ against the emulation of ``csrc/emulate``, which runs them on CPU tensors and checks
their barriers, warp operations, cp.async waits, bounds and shared-memory races as they run). Each is loaded
lazily and once, with the reason when it cannot run here.

The extensions take raw pointers and a stream handle, so this module is the one place that turns tensors into
those integers (and, for the emulation, into the buffers the kernels may touch) and a returned ``cudaError_t``
code into a Python error.
"""

from __future__ import annotations

import functools
import importlib

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# "SMs" the launchers size their grids for on the CPU: a few, so that multi-group paths run at small shapes.
HOST_SMS = 4


@functools.lru_cache(maxsize=2)
def _load(host: bool = False):
    """(module, None) or (None, why the extension cannot be imported)."""
    name = "fastattn._C_host" if host else "fastattn._C"
    try:
        return importlib.import_module(name), None
    except ImportError as exc:
        need = "g++ and pybind11" if host else "nvcc"
        return None, f"{name} is not built ({exc}); it needs {need} when the package is installed"


def ext(device: torch.device | None = None):
    """The extension for tensors on ``device`` (the GPU build unless ``device`` is the CPU)."""
    module, why = _load(device is not None and device.type == "cpu")
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
    """None when the CUDA kernels can run on ``device`` (a GPU, or the CPU through the host emulation), else
    why not."""
    if device.type == "cpu":
        return _load(True)[1]
    if device.type != "cuda":
        return f"they need CUDA tensors (or CPU tensors, for the host emulation), and these are on {device.type}"
    module, why = _load()
    if module is None:
        return why
    return _arch_refusal(device.index if device.index is not None else torch.cuda.current_device())


def _span(t: torch.Tensor) -> int:
    """Bytes from ``t``'s first element to one past its last (what its strides reach)."""
    if t.numel() == 0:
        return 0
    return (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()


def launch(t: torch.Tensor, name: str, *args, reads: dict | None = None, writes: dict | None = None) -> int:
    """Call launcher ``name`` of the extension with ``t``'s device current: the kernels (and their attribute
    settings) go to the current device, and the stream passed is that device's. On the CPU, ``reads`` and
    ``writes`` (name -> tensor or None) are the only memory the emulated kernels may read, and write."""
    from .._kernel_log import record

    record(_OPS.get(name, name), name, "cuda")
    if t.device.type == "cpu":
        module = ext(t.device)
        buffers = [(n, b.data_ptr(), _span(b), w) for bufs, w in ((reads, False), (writes, True))
                   for n, b in (bufs or {}).items() if b is not None]  # fmt: skip
        module.set_buffers(buffers)
        return getattr(module, name)(*args)
    with torch.cuda.device(t.device):
        return getattr(ext(), name)(*args)


_OPS = {
    "attention_forward": "attention_fwd", "attention_backward": "attention_bwd", "norm_forward": "norm_fwd",
    "norm_backward": "norm_bwd", "rotary_forward": "apply_rotary", "sinusoidal_forward": "sinusoidal_encoding",
}  # fmt: skip


def check(code: int, op: str, t: torch.Tensor | None = None) -> None:
    """Raise for a non-zero ``cudaError_t`` returned by a launcher (for tensors like ``t``)."""
    if code != 0:
        message = ext(None if t is None else t.device).error_string(code)
        raise RuntimeError(f"fastattn.{op}: CUDA kernel launch failed: {message} (code {code})")


def stream(t: torch.Tensor) -> int:
    return 0 if t.device.type == "cpu" else torch.cuda.current_stream(t.device).cuda_stream


def multiprocessors(t: torch.Tensor) -> int:
    if t.device.type == "cpu":
        return HOST_SMS
    return torch.cuda.get_device_properties(t.device).multi_processor_count


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
