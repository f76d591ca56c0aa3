"""fastattn: fused kernels for Transformers, in Triton and CUDA C++, as PyTorch ops (torch.library custom ops).

``scaled_dot_product_attention`` is a drop-in for torch's; ``attention`` is the native entry with bottom-right
causal alignment, sliding windows, a differentiable bias, soft-capping, learnable sinks, the user's own score
and mask functions (``ScoreMod``, ``MaskMod``, ``create_block_mask``: ``fastattn.mods``) and the log-sum-exp;
``varlen_attention`` takes packed sequences and ``decode_attention`` a key/value cache. ``backend`` selects where
ops run (``"auto"``, ``"triton"``, ``"gluon"``, ``"cuda"``, ``"torch"``; also ``FASTATTN_BACKEND``), and
``kernel_log()`` records which kernels ran. ``MultiheadAttention`` is a drop-in for ``nn.MultiheadAttention``,
and ``patch(model)`` swaps it into an existing model. ``fastattn.models`` holds
reference models, ``fastattn.distributed`` ring attention, ``fastattn.bench`` the ``fastattn-bench`` tool.
"""

from ._attention import attention, scaled_dot_product_attention
from ._backend import backend, current_backend
from ._info import info
from ._kernel_log import kernel_log
from ._patch import patch
from .decode import decode_attention
from .mods import BlockMask, MaskMod, ScoreMod, create_block_mask
from .multihead_attention import MultiheadAttention
from .norms import LayerNorm, RMSNorm, add_layer_norm, add_rms_norm, layer_norm, rms_norm
from .posenc import RotaryEmbedding, SinusoidalPositionalEncoding, alibi_slopes, apply_rotary, sinusoidal_encoding
from .varlen import pad, unpad, varlen_attention

__all__ = [
    "BlockMask",
    "LayerNorm",
    "MaskMod",
    "MultiheadAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "ScoreMod",
    "SinusoidalPositionalEncoding",
    "add_layer_norm",
    "add_rms_norm",
    "alibi_slopes",
    "apply_rotary",
    "attention",
    "backend",
    "create_block_mask",
    "current_backend",
    "decode_attention",
    "info",
    "kernel_log",
    "layer_norm",
    "pad",
    "patch",
    "rms_norm",
    "scaled_dot_product_attention",
    "sinusoidal_encoding",
    "unpad",
    "varlen_attention",
]
__version__ = "0.1.0"
