"""``fastattn.patch(model)``: put fastattn's modules into an existing model, in place."""

from __future__ import annotations

import logging
import sys
import warnings

import torch.nn as nn

from ._torch import TorchLayerNorm, TorchMultiheadAttention, TorchRMSNorm
from .multihead_attention import MultiheadAttention, route_through_module
from .norms import LayerNorm, RMSNorm

# torch module -> its fastattn subclass (no state of its own: a class swap keeps everything else).
SWAPS = {TorchLayerNorm: LayerNorm, TorchRMSNorm: RMSNorm}

logger = logging.getLogger("fastattn")


def patch(model: nn.Module) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` in ``model`` (also inside ``nn.Transformer`` and its encoder and
    decoder layers) by ``fastattn.MultiheadAttention``, and every ``nn.LayerNorm`` / ``nn.RMSNorm`` by
    ``fastattn.LayerNorm`` / ``fastattn.RMSNorm``, in place, and return ``model``. Hugging Face models
    inside it (or ``model`` itself) are switched to ``attn_implementation="fastattn"``.

    The modules keep their parameters (the same tensors, so optimizers and weight tying still hold), buffers,
    device, dtype, training mode and hooks: ``fastattn.MultiheadAttention`` is a subclass with no state of
    its own, so each module only changes class. Each also gets a no-op forward pre-hook (on its ``out_proj``),
    which keeps ``nn.TransformerEncoderLayer`` from its fused C++ path that would bypass the module. The
    qualified names of the replaced modules are logged (logger ``"fastattn"``) and kept in
    ``model.fastattn_patched``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch() expects an nn.Module, got {type(model).__name__}")
    replaced = []
    for name, module in model.named_modules():
        if type(module) is TorchMultiheadAttention:
            module.__class__ = MultiheadAttention
            module.out_proj.register_forward_pre_hook(route_through_module)
            replaced.append(name or "<root>")
        elif type(module) in SWAPS:
            module.__class__ = SWAPS[type(module)]
            replaced.append(name or "<root>")
    replaced += _patch_transformers(model)
    previous = getattr(model, "fastattn_patched", [])
    model.fastattn_patched = previous + replaced
    logger.info("fastattn.patch: replaced %d modules: %s", len(replaced), ", ".join(replaced) or "-")
    return model


def _patch_transformers(model: nn.Module) -> list[str]:
    """Switch the outermost Hugging Face models in ``model`` to ``attn_implementation="fastattn"``; returns
    ``"<name>:attn_implementation"`` for each. transformers is only touched if the caller imported it."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return []
    from . import hf  # noqa: F401  (registers the "fastattn" implementation)

    done: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, transformers.PreTrainedModel):
            continue
        if any(name == d or name.startswith(d + ".") for d in done if d):
            continue  # set_attn_implementation on the outer model already reached it
        try:
            module.set_attn_implementation(hf.NAME)
        except (ValueError, ImportError) as exc:  # a model without pluggable attention
            warnings.warn(f"fastattn.patch: {name or type(module).__name__} keeps its attention: {exc}", stacklevel=3)
            continue
        done.append(name)
    return [f"{name or '<root>'}:attn_implementation" for name in done]
