"""What the ops share: the dtypes their kernels take, the dropout seed of a call, output buffers. Imports no
triton."""

from __future__ import annotations

import os

import torch
from torch._subclasses.fake_tensor import FakeTensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dropout_seed(dropout_p: float) -> torch.Tensor:
    """The Philox seed of one call, as a 0-d int64 CPU tensor: drawn from torch's default CPU generator
    (reproducible under ``torch.manual_seed``, no device sync), and a tensor so that ``torch.compile`` neither
    specializes on it nor breaks the graph to read it."""
    if dropout_p > 0.0:
        return torch.randint(0, 2**62, (), dtype=torch.int64)
    return torch.zeros((), dtype=torch.int64)


def new_buffer(shape, dtype, device) -> torch.Tensor:
    """An output buffer; NaN-poisoned under FASTATTN_POISON=1 so tests catch elements never written."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("FASTATTN_POISON") == "1":
        out.fill_(float("nan"))
    return out


def float32_params(t: torch.Tensor | None) -> torch.Tensor | None:
    """Per-head parameters (ALiBi slopes, sink logits) as the kernels read them: detached contiguous float32."""
    return None if t is None else t.detach().to(torch.float32).contiguous()


def rows2d(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """x as (rows, n) (n: the last dim by default) with a unit last stride: a view where strides allow, else a
    contiguous copy."""
    x2 = x.reshape(-1, x.shape[-1] if n is None else n)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def host_readable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read on the host for free: a CPU tensor (no device to wait for), outside
    tracing and FakeTensorMode (where a read is a graph break, or impossible)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and not isinstance(t, FakeTensor)
