"""Reference models built from fastattn's ops, each also in stock PyTorch (``impl="torch"``) with the same
state dict: the encoder-decoder ``Transformer`` and the decoder-only ``GPT``, both with cached generation."""

from .cache import KVCache
from .gpt import GPT
from .transformer import Transformer

__all__ = ["GPT", "KVCache", "Transformer"]
