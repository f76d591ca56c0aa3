"""PyTorch's own functions and classes, bound once here so that fastattn's fallbacks and baselines always reach
torch's implementation, even after a global drop-in such as
``torch.nn.functional.scaled_dot_product_attention = fastattn.scaled_dot_product_attention`` (a fallback
that looked the name up at call time would call fastattn again, without end)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.activation import MultiheadAttention as TorchMultiheadAttention
from torch.nn.modules.normalization import LayerNorm as TorchLayerNorm
from torch.nn.modules.normalization import RMSNorm as TorchRMSNorm

# The C++ binding that ``F.scaled_dot_product_attention`` is (torch adds only a docstring): swapping the
# attribute of torch.nn.functional does not change it.
scaled_dot_product_attention = torch._C._nn.scaled_dot_product_attention
# Python functions: the objects themselves, taken when fastattn is imported (before any drop-in can name it).
layer_norm = F.layer_norm
rms_norm = F.rms_norm
dropout = F.dropout

__all__ = ["TorchLayerNorm", "TorchMultiheadAttention", "TorchRMSNorm", "dropout", "layer_norm", "rms_norm",
           "scaled_dot_product_attention"]  # fmt: skip
