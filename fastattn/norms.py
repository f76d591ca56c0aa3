"""Layer norm and RMSNorm: drop-ins for ``F.layer_norm`` / ``F.rms_norm`` and ``nn.LayerNorm`` / ``nn.RMSNorm``,
and the fused residual variants for pre-norm blocks."""

from __future__ import annotations

from numbers import Integral
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _torch
from ._backend import torch_path, warn_once
from ._kernel_log import record
from .ops.norm.function import norm_forward

Shape = Union[int, list, tuple, torch.Size]


def _shape(api: str, x: torch.Tensor, normalized_shape: Shape) -> tuple[int, ...]:
    """The normalized shape as a tuple, checked against x's trailing dims as torch checks it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{api}(): argument 'input' must be Tensor, not {type(x).__name__}")
    shape = (int(normalized_shape),) if isinstance(normalized_shape, Integral) else tuple(normalized_shape)
    if "rms" in api and x.dim() < len(shape):  # torch's rms_norm raises ValueError for this one
        raise ValueError(f"{api}: input must have at least {len(shape)} dimensions, but got {x.dim()}")
    if len(shape) == 0 or x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape) :]) != shape:
        raise RuntimeError(
            f"{api}: given normalized_shape={list(shape)}, expected input with shape [*, "
            f"{', '.join(map(str, shape))}], but got input of size {list(x.shape)}"
        )
    return shape


def _plain_torch(x: torch.Tensor) -> bool:
    """Whether torch's own op takes ``x`` as it is: the PyTorch path, no autocast (whose policy
    ``norm_forward`` applies) and not nested."""
    return torch_path(x.device) and not x.is_nested and not torch.is_autocast_enabled(x.device.type)


def _nested(fn, x: torch.Tensor, *args) -> torch.Tensor:
    """A nested tensor (torch's encoder builds them for padded batches in inference), component by component."""
    return torch.nested.as_nested_tensor([fn(t, *args) for t in x.unbind()], layout=x.layout)


def _check_param(api: str, name: str, p: torch.Tensor | None, x: torch.Tensor, shape: tuple[int, ...]) -> None:
    if p is None:
        return
    if tuple(p.shape) != shape:
        raise RuntimeError(f"{api}: expected {name} of shape {list(shape)}, but got {list(p.shape)}")
    if p.device != x.device:
        raise RuntimeError(f"{api}: {name} is on {p.device}, input on {x.device}")


def _check_residual(api: str, x: torch.Tensor, residual: torch.Tensor, dropout_p: float) -> None:
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{api}(): argument 'residual' must be Tensor, not {type(residual).__name__}")
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(
            f"{api}: residual must match x in shape, dtype and device; got x {tuple(x.shape)} {x.dtype} "
            f"{x.device}, residual {tuple(residual.shape)} {residual.dtype} {residual.device}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{api}: dropout_p must be in [0, 1), got {dropout_p}")


def layer_norm(
    input: torch.Tensor,
    normalized_shape: Shape,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """:func:`torch.nn.functional.layer_norm` on the Triton kernel: ``input (*, *normalized_shape)``, fp32
    statistics, weight/bias of ``normalized_shape`` (fp32 with 16-bit input allowed)."""
    if isinstance(input, torch.Tensor) and input.is_nested:
        return _nested(layer_norm, input, normalized_shape, weight, bias, eps)
    if isinstance(input, torch.Tensor) and _plain_torch(input):  # torch's op, checks and all
        record("norm_fwd", "layer_norm", "torch")
        return _torch.layer_norm(input, normalized_shape, weight, bias, eps)
    shape = _shape("layer_norm", input, normalized_shape)
    _check_param("layer_norm", "weight", weight, input, shape)
    _check_param("layer_norm", "bias", bias, input, shape)
    return norm_forward("layer_norm", input, shape, weight, bias, eps, is_rms=False)


def rms_norm(
    input: torch.Tensor, normalized_shape: Shape, weight: torch.Tensor | None = None, eps: float | None = None
) -> torch.Tensor:
    """:func:`torch.nn.functional.rms_norm` on the Triton kernel (``eps=None``: the input dtype's epsilon)."""
    if isinstance(input, torch.Tensor) and input.is_nested:
        return _nested(rms_norm, input, normalized_shape, weight, eps)
    if isinstance(input, torch.Tensor) and _plain_torch(input):
        record("norm_fwd", "rms_norm", "torch")
        return _torch.rms_norm(input, normalized_shape, weight, eps)
    shape = _shape("rms_norm", input, normalized_shape)
    _check_param("rms_norm", "weight", weight, input, shape)
    return norm_forward("rms_norm", input, shape, weight, None, eps, is_rms=True)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: Shape,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    dropout_p: float = 0.0,
    training: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layer_norm(s), s)`` with ``s = dropout(x) + residual``, in one pass (pre-norm blocks). Dropout only
    when ``training``; its mask comes from a seed drawn from torch's generator."""
    shape = _shape("add_layer_norm", x, normalized_shape)
    _check_residual("add_layer_norm", x, residual, dropout_p)
    _check_param("add_layer_norm", "weight", weight, x, shape)
    _check_param("add_layer_norm", "bias", bias, x, shape)
    return norm_forward("add_layer_norm", x, shape, weight, bias, eps, False, residual, dropout_p, training)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    normalized_shape: Shape,
    weight: torch.Tensor | None = None,
    eps: float | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(s), s)`` with ``s = dropout(x) + residual``, in one pass."""
    shape = _shape("add_rms_norm", x, normalized_shape)
    _check_residual("add_rms_norm", x, residual, dropout_p)
    _check_param("add_rms_norm", "weight", weight, x, shape)
    return norm_forward("add_rms_norm", x, shape, weight, None, eps, True, residual, dropout_p, training)


def _scripted_as_torch(name: str) -> None:
    warn_once(name, "TorchScript cannot compile fastattn's dispatch (torch.compile can)",
              instead=f"torch's nn.{name} computation in the scripted module")  # fmt: skip


class LayerNorm(nn.LayerNorm):
    """Drop-in for :class:`torch.nn.LayerNorm` (same constructor, parameters, state dict) on the kernel. A
    ``torch.jit.script``-ed copy computes torch's layer norm (with a one-time warning saying so)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return self._fastattn_forward(input)

    @torch.jit.unused
    def _fastattn_forward(self, input: torch.Tensor) -> torch.Tensor:
        if _plain_torch(input):  # the checks are torch's (one call less per norm)
            record("norm_fwd", "layer_norm", "torch")
            return _torch.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def __prepare_scriptable__(self) -> nn.Module:
        _scripted_as_torch("LayerNorm")
        return self


class RMSNorm(nn.RMSNorm):
    """Drop-in for :class:`torch.nn.RMSNorm` (same constructor, parameters, state dict) on the kernel. A
    ``torch.jit.script``-ed copy computes torch's RMSNorm (with a one-time warning saying so)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return self._fastattn_forward(x)

    @torch.jit.unused
    def _fastattn_forward(self, x: torch.Tensor) -> torch.Tensor:
        if _plain_torch(x):
            record("norm_fwd", "rms_norm", "torch")
            return _torch.rms_norm(x, self.normalized_shape, self.weight, self.eps)
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def __prepare_scriptable__(self) -> nn.Module:
        _scripted_as_torch("RMSNorm")
        return self
