"""Public attention entry points: the SDPA drop-in and the native API.

Both check their arguments before any kernel runs, bring them to the canonical ``(Z, H, L, E)`` layout of
``fastattn.ops.attention.function`` (views, no copies, masks never broadcast in memory) and dispatch.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch.nn.attention.bias import CausalBias, CausalVariant
from torch.overrides import handle_torch_function, has_torch_function_variadic

from . import _torch
from ._backend import current_backend, torch_path, use_triton
from ._kernel_log import record
from .mods import BlockMask, MaskMod, ScoreMod, as_mask_mod
from .ops.attention.function import attention_forward
from .ops.attention.spec import MaskSpec, RotarySpec
from .ops.attention.support import triton_refusal
from .ops.common import float32_params
from .posenc import RotaryEmbedding

_SDPA = "scaled_dot_product_attention"


def _require_tensor(api: str, name: str, x, position: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        where = f" (position {position})" if position is not None else ""
        raise TypeError(f"{api}(): argument '{name}'{where} must be Tensor, not {type(x).__name__}")


def _check_qkv(api: str, exc: type[Exception], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Checks shared by both entry points; ``exc`` is the class torch raises for SDPA, ValueError natively."""
    for pos, (name, x) in enumerate((("query", q), ("key", k), ("value", v)), start=1):
        _require_tensor(api, name, x, pos)
    shapes = f"query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)}"
    if min(q.dim(), k.dim(), v.dim()) < 2:
        raise exc(f"{api}: query, key and value must be at least 2-D (..., L, E); got {shapes}")
    if not (q.dtype == k.dtype == v.dtype):
        raise exc(
            f"{api}: query, key and value must have the same dtype; got {q.dtype}, {k.dtype}, {v.dtype} ({shapes})"
        )
    if not (q.device == k.device == v.device):
        raise exc(
            f"{api}: query, key and value must be on one device; got {q.device}, {k.device}, {v.device} ({shapes})"
        )
    if not q.dtype.is_floating_point:
        raise exc(f"{api}: query, key and value must be floating point; got {q.dtype}")
    if q.shape[-1] != k.shape[-1]:
        raise exc(f"{api}: query and key must have the same head dim (last dim); got {shapes}")
    if k.shape[-2] != v.shape[-2]:
        raise exc(f"{api}: key and value must have the same length (dim -2); got {shapes}")


def _check_dropout(api: str, exc: type[Exception], dropout_p, upper_inclusive: bool) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, Real):
        raise TypeError(f"{api}(): argument 'dropout_p' must be float, not {type(dropout_p).__name__}")
    p = float(dropout_p)
    if not (0.0 <= p < 1.0 or (upper_inclusive and p == 1.0)):
        bound = "]" if upper_inclusive else ")"
        raise exc(f"{api}: dropout_p must be in [0, 1{bound}, got {dropout_p}")
    return p


def _check_scale(api: str, scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"{api}(): argument 'scale' must be float, not {type(scale).__name__}")
    return float(scale)


def _check_mask(api: str, exc: type[Exception], name: str, mask, q: torch.Tensor, S: int, allow_bool: bool):
    """A mask/bias must broadcast to the scores ``q.shape[:-1] + (S,)``; returns that expanded view."""
    _require_tensor(api, name, mask)
    if mask.device != q.device:
        raise exc(f"{api}: {name} must be on the device of query ({q.device}), got {mask.device}")
    ok_dtypes = "bool, float32 or the query dtype" if allow_bool else "float32 or the query dtype"
    if not ((allow_bool and mask.dtype == torch.bool) or mask.dtype in (torch.float32, q.dtype)):
        raise exc(f"{api}: {name} dtype must be {ok_dtypes} ({q.dtype}); got {mask.dtype}")
    scores = (*q.shape[:-1], S)
    if mask.dim() < 2:
        # torch's SDPA indexes dim -2 of the mask and fails with IndexError; keep that class, say why.
        raise IndexError(f"{api}: {name} must be at least 2-D (L, S), got shape {tuple(mask.shape)}")
    if not _broadcasts(mask.shape, scores):
        raise exc(
            f"{api}: {name} of shape {tuple(mask.shape)} does not broadcast to the attention scores "
            f"(..., L, S) = {scores}"
        )
    return mask.expand(scores)


def _broadcasts(shape, target) -> bool:
    """Whether ``shape`` broadcasts to exactly ``target`` (checked by hand: catching torch's RuntimeError
    would also catch unrelated errors, a RecursionError among them)."""
    if len(shape) > len(target):
        return False
    return all(a in (1, b) for a, b in zip(reversed(shape), reversed(target)))


def _merges_batch(t: torch.Tensor, batch_dims: int) -> bool:
    """Whether the first ``batch_dims`` dims of ``t`` merge into one without a copy (so a broadcast mask
    stays broadcast): each dim's stride must be the next one's stride times its size (size-1 dims aside)."""
    dims = [(n, st) for n, st in zip(t.shape[:batch_dims], t.stride()[:batch_dims]) if n != 1]
    return all(st == n_next * st_next for (_, st), (n_next, st_next) in zip(dims, dims[1:]))


def _autocast(*tensors):
    """Under autocast, the floating inputs in the autocast dtype, as torch's SDPA takes them (it is on the
    lower-precision list of CUDA and CPU autocast); otherwise the inputs unchanged."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    castable = (torch.float32, torch.float16, torch.bfloat16)
    return tuple(t.to(dtype) if t is not None and t.dtype in castable else t for t in tensors)


def _as_4d(x: torch.Tensor) -> torch.Tensor:
    """(..., H, L, E) -> (Z, H, L, E) as a view where strides allow; 2-D/3-D get unit batch/head dims."""
    if x.dim() == 2:
        return x[None, None]
    if x.dim() == 3:
        return x[None]
    return x.reshape(-1, *x.shape[-3:])


def _sdpa_exotic(q, k, v, dropout_p) -> str | None:
    """Inputs torch's SDPA accepts but the kernels do not take; they run through torch's own SDPA."""
    if not (q.dim() == k.dim() == v.dim()) or q.shape[:-3] != k.shape[:-3] or k.shape[:-3] != v.shape[:-3]:
        return "query, key and value have different batch dimensions (torch broadcasts them)"
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        return "a tensor is empty"
    if dropout_p == 1.0:
        return "dropout_p == 1 drops every score"
    if q.dim() >= 3 and k.shape[-3] != v.shape[-3]:
        return "key and value have different head counts"
    return None


def _causal_bias(api: str, bias: CausalBias, q: torch.Tensor, k: torch.Tensor, is_causal: bool) -> MaskSpec:
    """torch's ``CausalBias`` (``causal_upper_left`` / ``causal_lower_right``: no data, a variant and two
    lengths) as the kernels' own causal rule: top-left (offset 0) or bottom-right (offset S - L)."""
    if is_causal:  # torch's CausalBias raises the same
        raise ValueError(f"{api}: a CausalBias attn_mask should not be used with is_causal=True")
    L, S = q.shape[-2], k.shape[-2]
    # As torch decides it: the bias's own lengths choose the variant, query and key give the alignment.
    if bias.variant == CausalVariant.UPPER_LEFT or bias.seq_len_q == bias.seq_len_kv:
        return MaskSpec(offset=0, right=0)
    if bias.variant == CausalVariant.LOWER_RIGHT:
        return MaskSpec(offset=S - L, right=0)
    raise ValueError(f"{api}: CausalBias.variant must be a CausalVariant, got {bias.variant!r}")


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in for :func:`torch.nn.functional.scaled_dot_product_attention`, same signature and semantics.

    Shapes: query ``(..., H, L, E)``, key ``(..., H_kv, S, E)``, value ``(..., H_kv, S, Ev)`` (the head dim may
    be absent: ``(L, E)``); returns ``(..., H, L, Ev)``. ``attn_mask`` broadcastable to ``(..., H, L, S)``: bool
    (True = takes part) or float (added to the scaled scores), never expanded in memory; or torch's
    ``CausalBias`` (``causal_upper_left`` / ``causal_lower_right``), run as the kernels' causal rule of that
    alignment. ``is_causal`` is top-left aligned as in torch (query i sees keys j <= i) and combines with a
    mask. ``enable_gqa`` lets H be a multiple of H_kv. Fully masked rows give 0, as torch does. Errors are
    torch's classes. Other tensor subclasses (and torch function modes) are dispatched through
    ``__torch_function__`` as torch's SDPA does.
    """
    causal_bias = isinstance(attn_mask, CausalBias)
    others = (query, key, value) if causal_bias else (query, key, value, attn_mask)
    if has_torch_function_variadic(*others):
        return handle_torch_function(
            scaled_dot_product_attention, others, query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
            is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
        )  # fmt: skip
    _check_qkv(_SDPA, RuntimeError, query, key, value)
    # The PyTorch path (the CPU under auto): our checks, which name the argument, then torch's op at once.
    fast = not causal_bias and torch_path(query.device)
    spec, bias = None, None
    if causal_bias:
        spec, bias, attn_mask = _causal_bias(_SDPA, attn_mask, query, key, is_causal), attn_mask, None
    elif is_causal:
        spec = MaskSpec(offset=0, right=0)
    if not fast:  # torch's op casts for itself
        query, key, value, attn_mask = _autocast(query, key, value, attn_mask)
    p = _check_dropout(_SDPA, RuntimeError, dropout_p, upper_inclusive=True)
    scale_f = _check_scale(_SDPA, scale, query.shape[-1])
    S = key.shape[-2]
    mask = None if attn_mask is None else _check_mask(_SDPA, RuntimeError, "attn_mask", attn_mask, query, S, True)
    exotic = _sdpa_exotic(query, key, value, p)
    if exotic is None and query.dim() >= 3:
        hq, hk = query.shape[-3], key.shape[-3]
        if hq != hk and not enable_gqa:
            raise RuntimeError(
                f"{_SDPA}: query has {hq} heads and key/value {hk}; pass enable_gqa=True for grouped-query "
                f"attention (query {tuple(query.shape)}, key {tuple(key.shape)})"
            )
        if hq % hk != 0:
            raise RuntimeError(
                f"{_SDPA}: number of heads in key and value ({hk}) must divide the number of heads in query ({hq})"
            )
    if fast or (
        exotic is None and mask is None and not causal_bias and _measured_faster_in_torch(query, key, value, is_causal)
    ):
        record("attention_fwd", "scaled_dot_product_attention", "torch")
        return _torch.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    if not use_triton(_SDPA, query.device, exotic or triton_refusal(query, value)):
        if causal_bias:  # torch's own handling of its bias (its fused bottom-right kernels where they apply)
            return bias._dispatch(query, key, value, bias, dropout_p, False, scale, enable_gqa)
        record("attention_fwd", "scaled_dot_product_attention", "torch")
        return _torch.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    return _sdpa_kernels(query, key, value, mask, spec, p, scale_f)


def _measured_faster_in_torch(query, key, value, is_causal: bool) -> bool:
    """Under ``auto`` on a GPU: whether the committed measurements (``ops.attention.choice``) found torch's own
    SDPA fastest for this class of case (no mask: the class the benchmarks measure)."""
    if current_backend() != "auto" or query.shape[-1] != value.shape[-1]:
        return False
    from .ops.attention.choice import measured_for

    return measured_for(query, key, value, is_causal) == "sdpa"


def _sdpa_kernels(query, key, value, mask, spec: MaskSpec | None, p: float, scale: float) -> torch.Tensor:
    """The checked SDPA call on the kernels, (..., L, E) folded to (Z, H, L, E)."""
    if mask is not None and query.dim() > 4 and not _merges_batch(mask, query.dim() - 3):
        # The mask's batch dims do not fold into one stride (broadcast along some of them only): take the
        # leading dim one index at a time rather than copy the mask out to every batch element.
        return torch.stack([_sdpa_kernels(query[i], key[i], value[i], mask[i], spec, p, scale)
                            for i in range(query.shape[0])])  # fmt: skip
    q4, k4, v4 = _as_4d(query), _as_4d(key), _as_4d(value)
    bias4 = None if mask is None else mask.reshape(q4.shape[0], q4.shape[1], q4.shape[2], key.shape[-2])
    out, _ = attention_forward(_SDPA, q4, k4, v4, bias4, scale, spec or MaskSpec(), p)
    return out.reshape(*query.shape[:-1], value.shape[-1])


def _check_alibi(api: str, slopes, q: torch.Tensor) -> torch.Tensor:
    """ALiBi slopes as a contiguous float32 (H,) or (N, H) tensor on q's device."""
    _require_tensor(api, "alibi_slopes", slopes)
    N, H = q.shape[0], q.shape[1]
    if not slopes.dtype.is_floating_point or tuple(slopes.shape) not in ((H,), (N, H)):
        raise ValueError(f"{api}: alibi_slopes must be floating, of shape ({H},) or ({N}, {H}); got "
                         f"{slopes.dtype} {tuple(slopes.shape)}")  # fmt: skip
    if slopes.device != q.device:
        raise ValueError(
            f"{api}: alibi_slopes is on {slopes.device}, q on {q.device} (fastattn.alibi_slopes(H, device=q.device) "
            f"makes them there)"
        )
    return float32_params(slopes)


def _check_rotary(api: str, rotary, offset, q: torch.Tensor) -> RotarySpec:
    if not isinstance(rotary, RotaryEmbedding):
        raise ValueError(f"{api}: rotary must be a fastattn.RotaryEmbedding, got {type(rotary).__name__}")
    dim, E = rotary.dim, q.shape[-1]
    if not (isinstance(dim, int) and 0 < dim <= E and dim % 2 == 0):
        raise ValueError(f"{api}: rotary dim must be even and at most the head dim {E}, got {dim}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"{api}: rotary_offset must be a non-negative int, got {offset!r}")
    return RotarySpec(dim=dim, base=float(rotary.base), interleaved=bool(rotary.interleaved), offset=offset)


def _check_window(window, causal: bool) -> tuple[int | None, int | None]:
    if window is None:
        return None, (0 if causal else None)
    if not (isinstance(window, (tuple, list)) and len(window) == 2):
        raise ValueError(f"attention: window must be a pair (left, right), got {window!r}")
    for side, w in zip(("left", "right"), window):
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
            raise ValueError(f"attention: window {side} must be a non-negative int or None, got {w!r}")
    left, right = window
    if causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    bias: torch.Tensor | None = None,
    window: tuple[int | None, int | None] | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_lse: bool = False,
    alibi_slopes: torch.Tensor | None = None,
    rotary: RotaryEmbedding | None = None,
    rotary_offset: int = 0,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    score_mod: ScoreMod | None = None,
    mask_mod=None,
    block_mask: BlockMask | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused attention ``softmax(q kᵀ · scale + bias) v`` in the SDPA layout, with what SDPA lacks.

    q ``(N, H, L, E)``, k ``(N, H_kv, S, E)``, v ``(N, H_kv, S, Ev)``, H a multiple of H_kv (GQA). ``causal``
    is bottom-right aligned (query i sees keys j <= i + S - L, as a KV cache needs); ``window=(left, right)``
    keeps keys ``i + S - L - left <= j <= i + S - L + right`` (None: no limit on that side). ``bias``: float,
    broadcastable to ``(N, H, L, S)``, gets its gradient when it requires grad. Rows with no visible key give
    0. ``alibi_slopes`` ``(H,)`` or ``(N, H)`` (see :func:`fastattn.alibi_slopes`) adds ALiBi's
    ``-slope[h] * |i + S - L - j|`` inside the kernel, forward and backward (no gradient for the slopes).
    ``rotary`` (a :class:`fastattn.RotaryEmbedding`) turns q and k inside the forward kernel, key j at position
    ``rotary_offset + j`` and query i at ``rotary_offset + i + S - L`` (rotated copies are not written; the
    backward rotates q and k into temporaries and turns their gradients back).
    ``softcap`` (a positive float; Gemma 2's logit soft-capping) replaces each scaled score s by
    ``softcap * tanh(s / softcap)`` before bias, ALiBi and masks. ``sinks``: a float tensor ``(H,)`` of
    learnable sink logits (gpt-oss): each row's softmax gains one logit ``sinks[h]`` that carries no value,
    ``out_i = sum_j e^(s_ij) v_j / (e^(sinks[h]) + sum_j e^(s_ij))``; it gets its gradient, and the LSE
    includes it (a row with no visible key gives 0 and lse = sinks[h]). ``score_mod`` (a
    :class:`fastattn.ScoreMod`), ``mask_mod`` (a ``@triton.jit`` function or a :class:`fastattn.MaskMod`) and
    ``block_mask`` (from :func:`fastattn.create_block_mask`): the user's own score and mask functions, run
    inside the Triton kernels (see :mod:`fastattn.mods`).
    Returns ``out (N, H, L, Ev)``, and with ``return_lse`` also ``lse (N, H, L)`` float32, the natural
    log-sum-exp of the scaled, biased scores (-inf on rows with no visible key). Bad input: ValueError.
    """
    api = "attention"
    _check_qkv(api, ValueError, q, k, v)
    q, k, v, bias = _autocast(q, k, v, bias)
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ValueError(f"{api}: q, k and v must be 4-D (N, H, L, E); got {shapes}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"{api}: q, k and v must have the same batch size; got {shapes}")
    if k.shape[1] != v.shape[1] or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{api}: k and v need the same number of heads, dividing q's (GQA); got {shapes}")
    if min(q.numel(), k.numel(), v.numel()) == 0:
        raise ValueError(f"{api}: empty tensors are not accepted; got {shapes}")
    p = _check_dropout(api, ValueError, dropout_p, upper_inclusive=False)
    scale_f = _check_scale(api, scale, q.shape[-1])
    left, right = _check_window(window, causal)
    L, S = q.shape[2], k.shape[2]
    bias4 = None if bias is None else _check_mask(api, ValueError, "bias", bias, q, S, allow_bool=False)
    alibi = None if alibi_slopes is None else _check_alibi(api, alibi_slopes, q)
    rope = None if rotary is None else _check_rotary(api, rotary, rotary_offset, q)
    cap = check_softcap(api, softcap)
    sink = None if sinks is None else check_sinks(api, sinks, q)
    sm, mm, bm = _check_mods(api, score_mod, mask_mod, block_mask, q, k)
    spec = MaskSpec(offset=S - L, left=left, right=right)
    out, lse = attention_forward(api, q, k, v, bias4, scale_f, spec, p, alibi, rope, cap, sink, sm, mm, bm)
    return (out, lse) if return_lse else out


def _check_mods(api: str, score_mod, mask_mod, block_mask, q: torch.Tensor, k: torch.Tensor) -> tuple:
    """(ScoreMod, MaskMod, BlockMask) checked against q and k; a block mask brings its mask function."""
    if score_mod is not None and not isinstance(score_mod, ScoreMod):
        raise TypeError(f"{api}(): argument 'score_mod' must be a fastattn.ScoreMod, not {type(score_mod).__name__}")
    if block_mask is not None and not isinstance(block_mask, BlockMask):
        raise TypeError(f"{api}(): argument 'block_mask' must come from fastattn.create_block_mask, not "
                        f"{type(block_mask).__name__}")  # fmt: skip
    # With a block mask, a bare function stands for the block mask's own (which carries its aux tensor).
    mm = mask_mod if block_mask is not None and not isinstance(mask_mod, MaskMod) else as_mask_mod(mask_mod)
    if block_mask is not None:
        if mm is not None and (mm.fn if isinstance(mm, MaskMod) else mm) is not block_mask.mask_mod.fn:
            raise ValueError(f"{api}: block_mask was built from another mask function than mask_mod")
        mm = block_mask.mask_mod  # the same function, with the aux tensor the states were built from
        N, H, L, S = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        bn, bh = block_mask.states.shape[:2]
        if (block_mask.L, block_mask.S) != (L, S) or bn not in (1, N) or bh not in (1, H):
            raise ValueError(f"{api}: block_mask is for (B, H, L, S) = ({bn}, {bh}, {block_mask.L}, {block_mask.S}), "
                             f"the call has ({N}, {H}, {L}, {S})")  # fmt: skip
        if block_mask.states.device != q.device:
            raise ValueError(f"{api}: block_mask is on {block_mask.states.device}, q on {q.device}")
    for name, aux in (("score_mod", getattr(score_mod, "aux", None)), ("mask_mod", getattr(mm, "aux", None))):
        if aux is not None and (not isinstance(aux, torch.Tensor) or aux.device != q.device):
            raise ValueError(f"{api}: the aux tensor of {name} must be a tensor on q's device ({q.device})")
    return score_mod, mm, block_mask


def check_softcap(api: str, softcap) -> float | None:
    """None, or a positive finite float."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, Real):
        raise TypeError(f"{api}(): argument 'softcap' must be float or None, not {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap > 0.0):
        raise ValueError(f"{api}: softcap must be a positive finite float (None: off), got {softcap}")
    return float(softcap)


def check_sinks(api: str, sinks, q: torch.Tensor) -> torch.Tensor:
    """A floating (H,) tensor on q's device (H: the query heads, dim -3 of q)."""
    _require_tensor(api, "sinks", sinks)
    H = q.shape[-3]
    if not sinks.dtype.is_floating_point or tuple(sinks.shape) != (H,):
        raise ValueError(
            f"{api}: sinks must be a floating tensor of shape ({H},) (one logit per query head); got "
            f"{sinks.dtype} {tuple(sinks.shape)}"
        )
    if sinks.device != q.device:
        raise ValueError(f"{api}: sinks is on {sinks.device}, q on {q.device}")
    return sinks
