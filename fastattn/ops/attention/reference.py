"""Plain PyTorch attention: the reference of the kernels (tests run it in float64) and the PyTorch path of
``fastattn.attention`` (run in float32 for half inputs). It materializes the L x S scores, so it is for
checking and for the CPU, not for speed."""

from __future__ import annotations

import functools

import torch

from .spec import MaskSpec


def visible_mask(L: int, S: int, mask: MaskSpec, device: torch.device) -> torch.Tensor | None:
    """(L, S) bool, True where query i may see key j under ``mask``; None when every score takes part."""
    if mask.left is None and mask.right is None:
        return None
    i = torch.arange(L, device=device)[:, None] + mask.offset
    j = torch.arange(S, device=device)[None, :]
    ok = torch.ones(L, S, dtype=torch.bool, device=device)
    if mask.left is not None:
        ok &= j >= i - mask.left
    if mask.right is not None:
        ok &= j <= i + mask.right
    return ok


def _autocast_off(fn):
    """Run ``fn(q, ...)`` with autocast off on q's device: the matrix products stay in the compute dtype (under
    autocast they would be re-cast to bf16/fp16 after the upcast)."""

    @functools.wraps(fn)
    def wrapper(q, *args, **kwargs):
        with torch.autocast(q.device.type, enabled=False):
            return fn(q, *args, **kwargs)

    return wrapper


@_autocast_off
def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    mask: MaskSpec = MaskSpec(),
    dropout_p: float = 0.0,
    keep: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    alibi: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q kᵀ · scale + bias, masked) · v`` and its log-sum-exp.

    q ``(Z, H, L, E)``, k ``(Z, H_kv, S, E)``, v ``(Z, H_kv, S, Ev)``, H a multiple of H_kv (GQA); ``bias``
    broadcastable to ``(Z, H, L, S)``, float (added) or bool (True = take part); ``alibi`` slopes (H,) or
    (Z, H) add ``-slope * |i + offset - j|``. Dropout draws from torch's
    RNG unless ``keep`` (bool, broadcastable to the scores) gives the kept elements. Fully masked rows give
    0 and lse = -inf. ``softcap`` c turns the scaled scores s into ``c tanh(s / c)`` before bias, ALiBi and
    masks; ``sinks`` (H,) logits join each row's softmax without a value (they enter the LSE; a row with no
    visible key gives 0 and lse = its sink). Returns ``out`` in q's dtype and ``lse`` float32 ``(Z, H, L)``;
    autograd flows (to the sinks too).
    """
    cdt = compute_dtype or (torch.float64 if q.dtype == torch.float64 else torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    if group > 1:
        kc, vc = kc.repeat_interleave(group, dim=1), vc.repeat_interleave(group, dim=1)
    s = torch.matmul(qc, kc.transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s.masked_fill(~bias, float("-inf")) if bias.dtype == torch.bool else s + bias.to(cdt)
    if alibi is not None:  # slopes (H,) or (Z, H): -slope * |i + offset - j|
        i = torch.arange(q.shape[-2], device=q.device)[:, None] + mask.offset
        dist = (i - torch.arange(k.shape[-2], device=q.device)[None, :]).abs().to(cdt)
        slopes = alibi.to(cdt).reshape(-1 if alibi.dim() == 2 else 1, q.shape[1], 1, 1)
        s = s - slopes * dist
    ok = visible_mask(q.shape[-2], k.shape[-2], mask, q.device)
    if ok is not None:
        s = s.masked_fill(~ok, float("-inf"))
    if sinks is not None:  # one more logit per row, without a value
        s = torch.cat([s, sinks.to(cdt).reshape(1, -1, 1, 1).expand(*s.shape[:-1], 1)], dim=-1)
    # A fully masked row (every score -inf, e.g. by a float -inf bias) gives 0 and lse = -inf; its scores are
    # replaced by 0 before the softmax so that no NaN (exp(-inf - (-inf))) reaches any gradient.
    seen = (s > float("-inf")).any(-1, keepdim=True)
    s = torch.where(seen, s, 0.0)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]) * seen
    lse = lse.masked_fill(~seen[..., 0], float("-inf"))
    if sinks is not None:
        p = p[..., :-1]
    if dropout_p > 0.0:
        if keep is None:
            keep = torch.rand_like(p) >= dropout_p
        p = p.masked_fill(~keep, 0.0) / (1.0 - dropout_p)
    out = torch.matmul(p, vc)
    return out.to(q.dtype), lse.float()
