"""pytest plugin for ``tools/torch_suite.py``: the usual global drop-in of fastattn, done when pytest loads
plugins, before PyTorch's test modules import torch's names."""

import torch

import fastattn

torch.nn.functional.scaled_dot_product_attention = fastattn.scaled_dot_product_attention
torch.nn.MultiheadAttention = fastattn.MultiheadAttention
