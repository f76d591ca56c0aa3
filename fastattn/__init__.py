"""fastattn: fused attention kernels for Transformers, in Triton, as PyTorch autograd ops.

``scaled_dot_product_attention`` is a drop-in for torch's; ``attention`` is the native entry with bottom-right
causal alignment, sliding windows, a differentiable bias and the log-sum-exp. ``backend`` selects where ops
run (``"auto"``, ``"triton"``, ``"torch"``; also ``FASTATTN_BACKEND``).
"""

from ._backend import backend, current_backend
from .attention import attention, scaled_dot_product_attention

__all__ = ["attention", "backend", "current_backend", "scaled_dot_product_attention"]
__version__ = "0.1.0"
