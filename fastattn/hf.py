"""Hugging Face transformers on fastattn: ``import fastattn.hf`` registers ``attn_implementation="fastattn"``.

It registers an attention function through transformers' ``AttentionInterface`` and, so that padding masks
are built for the new name, the SDPA mask builder through ``AttentionMaskInterface`` (transformers builds no
mask for a name it does not know). Any model that takes pluggable attention (BERT, GPT-2, Llama-style, ...)
then runs its attention on ``fastattn.scaled_dot_product_attention``: causal, padding masks, GQA without
repeating key/value heads. Models that pass learnable sinks (gpt-oss: ``s_aux``) or logit soft-capping
(Gemma 2: ``softcap``) run on ``fastattn.attention`` with those (sliding windows come in the mask).
transformers is an optional dependency; plain ``import fastattn`` does not import it.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ._attention import attention, scaled_dot_product_attention

NAME = "fastattn"


def fastattn_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query ``(B, H, L, D)``, key/value ``(B, H_kv, S, D)``,
    ``attention_mask`` from the SDPA mask builder (bool, True = attend; or float; or None when causality
    alone describes it); returns ``(output (B, L, H, D), None)``, the semantics of transformers' "sdpa"."""
    if kwargs.get("output_attentions", False):
        raise ValueError("attn_implementation='fastattn' does not return attention weights; use 'eager'")
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' sdpa: the causal flag only when no mask is given and this is not a single-token step.
    causal = bool(causal and attention_mask is None and q_len > 1)
    if causal and kv_len > q_len:  # prefill into an empty static cache: the slots past q_len are unused
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        position_bias = None if position_bias is None else position_bias[..., :q_len]
    if position_bias is not None:
        position_bias = position_bias.to(query.dtype)
        if attention_mask is None and causal:
            keep = torch.ones(q_len, key.shape[2], dtype=torch.bool, device=query.device).tril()
            attention_mask = position_bias.masked_fill(~keep, float("-inf"))
        elif attention_mask is None:
            attention_mask = position_bias
        elif attention_mask.dtype == torch.bool:
            attention_mask = position_bias.masked_fill(~attention_mask, float("-inf"))
        else:
            attention_mask = position_bias + attention_mask
        causal = False
    sinks, softcap = kwargs.get("s_aux"), kwargs.get("softcap")
    if sinks is None and softcap is None:
        out = scaled_dot_product_attention(
            query, key, value, attention_mask, dropout, causal, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
        )
    else:  # causal only without a mask and with as many keys as queries: either alignment is the same
        if attention_mask is not None and attention_mask.dtype == torch.bool:  # the native API adds a float bias
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attention_mask, float("-inf")
            )
        out = attention(query, key, value, causal=causal, bias=attention_mask, dropout_p=dropout, scale=scaling,
                        softcap=softcap, sinks=sinks)  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, fastattn_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
