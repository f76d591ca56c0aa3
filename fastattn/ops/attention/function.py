"""The attention op, ``fastattn::attention_fwd`` / ``attention_bwd`` (torch.library custom ops with fake
implementations and registered autograd, so ``torch.compile`` traces them), over the Triton and CUDA
launchers; and the backend dispatch.

Canonical layout here: q ``(Z, H, L, E)``, k ``(Z, H_kv, S, E)``, v ``(Z, H_kv, S, Ev)``, ``bias`` None or a
``(Z, H, L, S)`` view (broadcast strides allowed), float or bool. The public functions in
``fastattn.attention`` bring their arguments to this form.
"""

from __future__ import annotations

import torch

from ..._backend import current_backend, use_cuda, use_gluon, use_triton, warn_once
from ..._kernel_log import record
from ..common import dropout_seed, float32_params
from .cuda import attention_bwd_cuda, attention_fwd_cuda, cuda_refusal, key_padding_mask
from .gluon import (
    attention_bwd_gluon,
    attention_fwd_gluon,
    gluon_bwd_refusal,
    gluon_refusal,
    layout_refusal,
)
from .reference import attention_reference
from .spec import MaskSpec, RotarySpec
from .support import triton_refusal


def _specs(offset, left, right, rot_dim, rot_base, rot_interleaved, rot_offset):
    rot = RotarySpec(rot_dim, rot_base, rot_interleaved, rot_offset) if rot_dim else None
    return MaskSpec(offset, left, right), rot


# User score / mask functions (``fastattn.mods``) cross the op boundary as a key of this registry (an op takes
# tensors and scalars only); their own tensors and the block mask's states are tensor arguments.
_USER_FNS: dict[str, tuple] = {}


def user_fns_key(score_mod, mask_mod) -> str:
    """The registry key of a (score function, its gradient, mask function) triple; "" for none."""
    fns = (None, None) if score_mod is None else (score_mod.fn, score_mod.grad)
    fns += (None if mask_mod is None else mask_mod.fn,)
    if fns == (None, None, None):
        return ""
    key = "|".join("-" if f is None else f"{getattr(f, '__name__', 'fn')}@{id(f):x}" for f in fns)
    _USER_FNS[key] = fns
    return key


def _user_mods(key: str, score_aux, mask_aux, block_states, L: int, S: int) -> tuple:
    """(ScoreMod, MaskMod, BlockMask) objects for the launcher from the op's arguments."""
    if not key:
        return None, None, None
    from ...mods import BlockMask, MaskMod, ScoreMod

    score_fn, score_grad, mask_fn = _USER_FNS[key]
    sm = None if score_fn is None else ScoreMod(score_fn, score_grad, score_aux)
    mm = None if mask_fn is None else MaskMod(mask_fn, mask_aux)
    bm = None if block_states is None else BlockMask(block_states, mm, L, S)
    return sm, mm, bm


# The op's arguments after the tensors (bias, ALiBi slopes, sink logits, the user functions' tensors and block
# mask, the dropout seed): scale, softcap, the user functions' key, visibility (offset, left, right),
# dropout_p, the rotary spec (dim 0 = none, base, interleaved, offset) and the kernel backend ("triton",
# "gluon" or "cuda").
@torch.library.custom_op("fastattn::attention_fwd", mutates_args=())
def attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, alibi: torch.Tensor | None,
    sinks: torch.Tensor | None, score_aux: torch.Tensor | None, mask_aux: torch.Tensor | None,
    block_states: torch.Tensor | None, seed: torch.Tensor, scale: float, softcap: float | None, user_fns: str,
    offset: int, left: int | None, right: int | None, dropout_p: float, rot_dim: int, rot_base: float,
    rot_interleaved: bool, rot_offset: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(out, lse)`` by the Triton or CUDA kernels (canonical layout, see the module docstring)."""
    mask, rot = _specs(offset, left, right, rot_dim, rot_base, rot_interleaved, rot_offset)
    sm, mm, bm = _user_mods(user_fns, score_aux, mask_aux, block_states, q.shape[2], k.shape[2])
    s = int(seed.item())
    if backend == "cuda":
        return attention_fwd_cuda(q, k, v, key_padding_mask(bias), scale, mask, dropout_p, s)
    if backend == "gluon":
        why = layout_refusal(query=q, key=k, value=v)
        if why is None:
            return attention_fwd_gluon(q, k, v, scale, mask, softcap, float32_params(sinks))
        warn_once("attention", f"the Gluon kernels cannot run: {why}", instead="the Triton kernels")
    from .launch import attention_fwd  # triton: only once a kernel runs

    return attention_fwd(
        q, k, v, bias, scale, mask, dropout_p, s, alibi=alibi, rotary=rot, softcap=softcap, sinks=float32_params(sinks),
        score_mod=sm, mask_mod=mm, block_mask=bm,
    )  # fmt: skip


@attention_fwd_op.register_fake
def _(q, k, v, bias, alibi, sinks, score_aux, mask_aux, block_states, seed, scale, softcap, user_fns, offset, left,
      right, dropout_p, rot_dim, rot_base, rot_interleaved, rot_offset, backend):  # fmt: skip
    Z, H, L, _ = q.shape
    return q.new_empty((Z, H, L, v.shape[-1])), q.new_empty((Z, H, L), dtype=torch.float32)


@torch.library.custom_op("fastattn::attention_bwd", mutates_args=())
def attention_bwd_op(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    bias: torch.Tensor | None, alibi: torch.Tensor | None, sinks: torch.Tensor | None,
    score_aux: torch.Tensor | None, mask_aux: torch.Tensor | None, block_states: torch.Tensor | None,
    seed: torch.Tensor, scale: float, softcap: float | None, user_fns: str, offset: int, left: int | None,
    right: int | None, dropout_p: float, rot_dim: int, rot_base: float, rot_interleaved: bool, rot_offset: int,
    backend: str, bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dq, dk, dv, dbias, dsinks)``; dbias is the float32 ``(Z, H, L, S)`` score gradient when ``bias_grad``,
    dsinks the float32 (H,) gradient of the sink logits; each an empty tensor when not asked for."""
    mask, rot = _specs(offset, left, right, rot_dim, rot_base, rot_interleaved, rot_offset)
    sm, mm, bm = _user_mods(user_fns, score_aux, mask_aux, block_states, q.shape[2], k.shape[2])
    s = int(seed.item())
    if backend in ("cuda", "gluon") and torch.are_deterministic_algorithms_enabled():
        # Their dQ adds partial sums with atomics in whatever order the blocks finish; the Triton backward owns
        # each gradient row (no atomics), and takes their forwards' out and lse as they are.
        warn_once(
            "attention backward",
            f"the {backend} backward is not bit-reproducible (atomic dQ) and torch.use_deterministic_algorithms is on",
            instead="the Triton kernels",
        )
        backend = "triton"
    if backend == "cuda":
        dq, dk, dv = attention_bwd_cuda(dout, q, k, v, out, lse, key_padding_mask(bias), scale, mask, dropout_p, s)
        return dq, dk, dv, q.new_empty(0), q.new_empty(0)
    if backend == "gluon":  # the Gluon forward took the case: no bias, dropout, ALiBi or rotary
        why = gluon_bwd_refusal(dout, q, k, v, softcap, sinks)
        if why is None:
            dq, dk, dv = attention_bwd_gluon(dout, q, k, v, out, lse, scale, mask)
            return dq, dk, dv, q.new_empty(0), q.new_empty(0)
        # The Gluon forward's out and lse are what the Triton backward takes.
        warn_once("attention backward", f"the Gluon backward cannot run: {why}", instead="the Triton kernels")
    if rot is not None:  # the backward kernels take rotated q/k; their gradients turn back afterwards
        q, k = _rotate(q, rot, _q_offset(rot, q, k), 1.0), _rotate(k, rot, rot.offset, 1.0)
    from .launch import attention_bwd

    dq, dk, dv, dbias, dsinks = attention_bwd(
        dout, q, k, v, out, lse, bias, scale, mask, dropout_p, s, bias_grad=bias_grad, alibi=alibi, softcap=softcap,
        sinks=float32_params(sinks), score_mod=sm, mask_mod=mm, block_mask=bm,
    )  # fmt: skip
    if rot is not None:
        dq, dk = _rotate(dq, rot, _q_offset(rot, q, k), -1.0), _rotate(dk, rot, rot.offset, -1.0)
    return dq, dk, dv, q.new_empty(0) if dbias is None else dbias, q.new_empty(0) if dsinks is None else dsinks


@attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, bias, alibi, sinks, score_aux, mask_aux, block_states, seed, scale, softcap, user_fns,
      offset, left, right, dropout_p, rot_dim, rot_base, rot_interleaved, rot_offset, backend, bias_grad):  # fmt: skip
    Z, H, L, _ = q.shape
    dbias = q.new_empty((Z, H, L, k.shape[2]), dtype=torch.float32) if bias_grad else q.new_empty(0)
    dsinks = q.new_empty((H,), dtype=torch.float32) if sinks is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias, dsinks


def _setup_context(ctx, inputs, output):
    q, k, v, bias, alibi, sinks, score_aux, mask_aux, block_states, seed, *args = inputs
    ctx.save_for_backward(q, k, v, bias, alibi, sinks, score_aux, mask_aux, block_states, seed, *output)
    ctx.args = args
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dout, _dlse):
    q, k, v, bias, alibi, sinks, score_aux, mask_aux, block_states, seed, out, lse = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias, dsinks = torch.ops.fastattn.attention_bwd(
        dout, q, k, v, out, lse, bias, alibi, sinks, score_aux, mask_aux, block_states, seed, *ctx.args, bias_grad
    )
    dsinks = dsinks.to(sinks.dtype) if sinks is not None and ctx.needs_input_grad[5] else None
    # One gradient per input: q, k, v, bias, alibi (none: slopes are not learned), sinks, then none for the user
    # functions' tensors, the block mask, the seed and the scalars.
    return (dq, dk, dv, dbias if bias_grad else None, None, dsinks) + (None,) * (len(ctx.needs_input_grad) - 6)


attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def attention_forward(
    op: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    mask: MaskSpec,
    dropout_p: float,
    alibi: torch.Tensor | None = None,
    rotary: RotarySpec | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    score_mod=None,
    mask_mod=None,
    block_mask=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` through the CUDA kernels (``cuda`` backend), the Gluon kernels (``gluon``) or the Triton
    kernels when the backend and the case allow (the ``fastattn::attention_fwd`` op), else through the PyTorch
    reference (float32 compute for half inputs)."""
    backend = None
    user = score_mod is not None or mask_mod is not None
    gluon_why = lambda: gluon_refusal(q, k, v, bias, dropout_p, alibi, rotary, softcap, sinks, user)  # noqa: E731
    cuda_why = lambda: cuda_refusal(q, k, v, bias, scale, alibi, rotary, dropout_p, softcap, sinks, user)  # noqa: E731
    if use_cuda(op, q.device, cuda_why):
        backend = "cuda"
    elif use_gluon(op, gluon_why) or (_measured_gluon(q, k, v, mask) and gluon_why() is None):
        backend = "gluon"
    elif use_triton(op, q.device, triton_refusal(q, v)):
        backend = "triton"
    elif user:
        raise ValueError(
            f"{op}: score_mod / mask_mod are @triton.jit functions and run in the Triton kernels, which do not run "
            f"here ({triton_refusal(q, v) or 'the backend is ' + current_backend()}); on the CPU use "
            "TRITON_INTERPRET=1 with fastattn.backend('triton')"
        )
    if backend is not None:
        rot = rotary or RotarySpec(0)
        states = None if block_mask is None else block_mask.states
        return torch.ops.fastattn.attention_fwd(
            q, k, v, bias, alibi, sinks, getattr(score_mod, "aux", None), getattr(mask_mod, "aux", None), states,
            dropout_seed(dropout_p), scale, softcap, user_fns_key(score_mod, mask_mod), mask.offset, mask.left,
            mask.right, dropout_p, rot.dim, rot.base, rot.interleaved, rot.offset, backend,
        )  # fmt: skip
    if rotary is not None:
        q, k = (
            _rotate(q, rotary, _q_offset(rotary, q, k), 1.0, kernel=False),
            _rotate(k, rotary, rotary.offset, 1.0, kernel=False),
        )
    record(op if op.startswith("attention") else "attention_fwd", "attention_reference", "torch")
    return attention_reference(q, k, v, bias, scale, mask, dropout_p, alibi=alibi, softcap=softcap, sinks=sinks)


def _measured_gluon(q, k, v, mask: MaskSpec) -> bool:
    """Under ``auto`` on a GPU: whether the committed measurements found the Gluon kernels fastest for this
    class (full or bottom-right causal attention: the classes the benchmarks measure)."""
    if current_backend() != "auto" or mask.left is not None or mask.right not in (None, 0):
        return False
    from .choice import measured_for

    causal = mask.right == 0
    if causal and mask.offset != k.shape[2] - q.shape[2]:
        return False
    return measured_for(q, k, v, causal) == "gluon"


def _q_offset(rot: RotarySpec, q: torch.Tensor, k: torch.Tensor) -> int:
    return rot.offset + k.shape[2] - q.shape[2]  # query i is aligned with key i + S - L


def _rotate(x: torch.Tensor, rot: RotarySpec, offset: int, sign: float, kernel: bool = True) -> torch.Tensor:
    """x (N, H, L, E) turned by ``sign`` times the rotary angles at positions offset + l."""
    from ..posenc.reference import rotary_reference

    if kernel:
        from ..posenc.launch import rotary_fwd

        return rotary_fwd(x, None, offset, rot.base, rot.interleaved, rot.dim, sign)
    pos = torch.arange(offset, offset + x.shape[2], device=x.device)[None]
    return rotary_reference(x, pos, rot.base, rot.interleaved, rot.dim, sign, compute_dtype=torch.float32)
