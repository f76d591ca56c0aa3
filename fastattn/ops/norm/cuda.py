"""Launchers and autograd of the CUDA C++ layer norm / RMSNorm (``csrc/norm.cu``), and which cases they take.

They take plain layer norm / RMSNorm over the trailing ``n`` elements in fp32/fp16/bf16, weights in the data's
dtype or fp32; the fused residual add and dropout are for the Triton kernels. The backward keeps a row's
partial dw/db sums in registers: rows of up to ``norm_bwd_max_n`` elements in multiples of a 16-byte vector.
"""

from __future__ import annotations

import torch

from .. import cuda_ext
from ..common import SUPPORTED_DTYPES
from ..common import new_buffer as _new
from ..common import rows2d as _rows


def cuda_refusal(x, weight, bias, n: int, fused: bool) -> str | None:
    """Why the CUDA norm kernels cannot take this case, or None if they can."""
    if fused:
        return "the fused residual add and dropout are in the Triton kernels only"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"they take float16, bfloat16 and float32, not {x.dtype}"
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.dtype not in (x.dtype, torch.float32):
            return f"{name} must be float32 or the input's dtype ({x.dtype}), not {p.dtype}"
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        return f"they read weight and bias in one dtype, not {weight.dtype} and {bias.dtype}"
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if needs_grad:
        ext, code = cuda_ext.ext(x.device), cuda_ext.DTYPE_CODES[x.dtype]
        vec = 16 // x.element_size()
        if n > ext.norm_bwd_max_n(code):
            return f"their backward keeps rows of up to {ext.norm_bwd_max_n(code)} {x.dtype} elements, not {n}"
        if n % vec:
            return f"their backward reads rows in 16-byte vectors: {n} is not a multiple of {vec}"
    return None


def _w_code(x, weight, bias) -> int:
    p = weight if weight is not None else bias
    return cuda_ext.DTYPE_CODES[x.dtype if p is None else p.dtype]


def norm_fwd_cuda(x, n: int, weight, bias, eps: float, is_rms: bool):
    """``y`` (shape and dtype of x) and fp32 ``mean``, ``rstd`` per row."""
    x2 = _rows(x, n)
    rows = x2.shape[0]
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))  # read with unit stride
    y = _new(x2.shape, x.dtype, x.device)
    mean, rstd = _new((rows,), torch.float32, x.device), _new((rows,), torch.float32, x.device)
    code = cuda_ext.launch(x, "norm_forward",
        x2.data_ptr(), cuda_ext.ptr(weight), cuda_ext.ptr(bias), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
        rows, n, x2.stride(0), y.stride(0), eps, cuda_ext.DTYPE_CODES[x.dtype], _w_code(x, weight, bias), is_rms,
        cuda_ext.stream(x),
        reads={"x": x2, "weight": weight, "bias": bias}, writes={"y": y, "mean": mean, "rstd": rstd},
    )  # fmt: skip
    cuda_ext.check(code, "layer_norm (CUDA forward)", x)
    return y.view(x.shape), mean, rstd


def norm_bwd_cuda(dy, x, n: int, weight, bias, mean, rstd, is_rms: bool):
    """``dx``, and the fp32 sums ``dweight``, ``dbias`` cast to the parameters' dtypes (None where absent)."""
    ext = cuda_ext.ext(x.device)
    vec = 16 // x.element_size()
    x2, dy2 = cuda_ext.aligned_rows(_rows(x, n), vec), cuda_ext.aligned_rows(_rows(dy, n), vec)
    rows = x2.shape[0]
    weight = None if weight is None else weight.contiguous()
    dx = _new(x2.shape, x.dtype, x.device)
    code = cuda_ext.DTYPE_CODES[x.dtype]
    sms = cuda_ext.multiprocessors(x)
    rows_per_block = 256 // ext.norm_row_threads(code, n)  # a group per row-thread team, a few blocks per SM
    groups = ext.norm_bwd_groups(rows, 4 * sms * rows_per_block)
    # Every group writes its whole partial row; with no rows at all nothing is written, so start from zeros then.
    alloc = torch.zeros if rows == 0 else torch.empty
    dw = alloc((groups, n), dtype=torch.float32, device=x.device) if weight is not None else None
    db = alloc((groups, n), dtype=torch.float32, device=x.device) if bias is not None else None
    err = cuda_ext.launch(x, "norm_backward",
        x2.data_ptr(), cuda_ext.ptr(weight), dy2.data_ptr(), dx.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
        cuda_ext.ptr(dw), cuda_ext.ptr(db), rows, n, x2.stride(0), dy2.stride(0), dx.stride(0), groups, code,
        _w_code(x, weight, bias), is_rms, cuda_ext.stream(x),
        reads={"x": x2, "weight": weight, "dy": dy2, "mean": mean, "rstd": rstd},
        writes={"dx": dx, "dw_partial": dw, "db_partial": db},
    )  # fmt: skip
    cuda_ext.check(err, "layer_norm (CUDA backward)", x)
    dweight = None if dw is None else dw.sum(0).to(weight.dtype)
    dbias = None if db is None else db.sum(0).to(bias.dtype)
    return dx.view(x.shape), dweight, dbias
