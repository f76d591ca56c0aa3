"""``auto``'s choice by measurement: which implementation the committed GPU runs found fastest per class of
case (``choice.json``, built by ``tools/choice_table.py`` from ``benchmarks/results``).

A class is (architecture, dtype, head dim, causal or not, forward alone or forward and backward). Where the
table names ``sdpa``, torch's own SDPA is what ``auto`` runs for the SDPA drop-in (dropping fastattn in then
never makes that case slower than stock torch); ``gluon`` / ``triton`` name our kernels; classes not measured
keep the default (the Triton kernels).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

TABLE = Path(__file__).with_name("choice.json")


@functools.cache
def _classes() -> dict[str, str]:
    try:
        return json.loads(TABLE.read_text())["classes"]
    except FileNotFoundError:  # an install without the table: nothing measured
        return {}


def measured_choice(capability: tuple[int, int], dtype: torch.dtype, head_dim: int, causal: bool,
                    training: bool) -> str | None:  # fmt: skip
    """``"sdpa"``, ``"gluon"``, ``"triton"``, or None where the table has no measurement for the class."""
    name = str(dtype).split(".")[-1]
    key = f"sm{capability[0]}{capability[1]}/{name}/d{head_dim}/{'causal' if causal else 'full'}/"
    return _classes().get(key + ("fwd+bwd" if training else "fwd"))


def measured_for(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> str | None:
    """``measured_choice`` for these tensors: their GPU, dtype and head dim, forward+backward when autograd
    will need gradients; None off CUDA."""
    if not q.is_cuda:
        return None
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return measured_choice(torch.cuda.get_device_capability(q.device), q.dtype, q.shape[-1], causal, training)
