"""Launchers of the CUDA C++ positional encodings (``csrc/posenc.cu``): the same signatures as the Triton
launchers in ``launch``, so the custom ops in ``function`` take either."""

from __future__ import annotations

import torch

from .. import cuda_ext
from ..common import new_buffer as _new
from ..common import rows2d as _rows
from .reference import inv_freq


def sinusoidal_fwd_cuda(x: torch.Tensor, offset: int, scale: float, base: float) -> torch.Tensor:
    x2 = _rows(x)
    y = _new(x2.shape, x.dtype, x.device)
    L, D = x.shape[-2], x.shape[-1]
    freq = inv_freq((D + 1) // 2, D, base, x.device)
    code = cuda_ext.launch(x, "sinusoidal_forward",
        x2.data_ptr(), y.data_ptr(), freq.data_ptr(), x2.shape[0], L, D,
        x2.stride(0), y.stride(0), offset, scale, cuda_ext.DTYPE_CODES[x.dtype], cuda_ext.stream(x),
        reads={"x": x2, "freq": freq}, writes={"y": y},
    )  # fmt: skip
    cuda_ext.check(code, "sinusoidal_encoding (CUDA)", x)
    return y.view(x.shape)


def rotary_fwd_cuda(x, pos, offset, base, interleaved, rot, sign) -> torch.Tensor:
    """x (N, H, L, E); pos None or int64 (N|1, L)."""
    N, H, L, E = x.shape
    x2 = _rows(x)
    y = _new(x2.shape, x.dtype, x.device)
    if pos is not None:
        pos = pos.contiguous()
    pos_stride = pos.stride(0) if pos is not None and pos.shape[0] > 1 else 0
    freq = inv_freq(max(rot // 2, 1), rot, base, x.device)
    code = cuda_ext.launch(x, "rotary_forward",
        x2.data_ptr(), y.data_ptr(), cuda_ext.ptr(pos), freq.data_ptr(),
        x2.shape[0], H, L, E, rot, x2.stride(0), y.stride(0), pos_stride, offset, sign, interleaved,
        cuda_ext.DTYPE_CODES[x.dtype], cuda_ext.stream(x),
        reads={"x": x2, "pos": pos, "freq": freq}, writes={"y": y},
    )  # fmt: skip
    cuda_ext.check(code, "apply_rotary (CUDA)", x)
    return y.view(x.shape)
