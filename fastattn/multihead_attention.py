"""``fastattn.MultiheadAttention``: ``torch.nn.MultiheadAttention`` with its attention on fastattn's kernels.

A subclass, so the constructor, parameters, state dict, ``isinstance`` checks and the weight-returning path
are torch's own. ``forward`` with ``need_weights=False`` (what ``nn.Transformer*`` layers ask for) runs the
in-projections (one GEMM for self-attention), fastattn's fused attention (no L x S tensor unless both an
attention mask and a key padding mask must be merged) and the out-projection, following
``F.multi_head_attention_forward`` step by step, with torch's own argument checks. ``need_weights=True``
returns the L x S weights, so it runs torch's path, which materializes them (and costs what torch's does).

Fully masked rows: torch's module gives NaN on its inference fast path and 0 on its autograd path; this
module reproduces whichever torch would take for the same call.

TorchScript: ``torch.jit.script`` compiles the module as torch's (TorchScript cannot compile fastattn's Python
dispatch), so a scripted module computes what ``torch.nn.MultiheadAttention`` computes, and says so in a
one-time warning when it is scripted. Annotations stay real (no ``from __future__ import annotations``) and
in ``Optional`` form because TorchScript reads them.
"""

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ._attention import scaled_dot_product_attention
from ._backend import warn_once
from .varlen import padded_key_attention


def route_through_module(module: nn.Module, args: tuple[Tensor]) -> None:
    """A no-op forward pre-hook, put on ``out_proj`` of a patched attention module (which forward never
    calls: it multiplies by the weights). ``nn.TransformerEncoderLayer`` skips its fused C++ path (which reads
    the attention weights directly and never calls ``self_attn``) when any submodule has hooks; this keeps
    patched layers calling ``fastattn.MultiheadAttention``. On ``out_proj`` the hook has ``Linear``'s one-tensor
    signature, so ``torch.jit.script`` compiles it (on the attention module itself TorchScript would demand
    the whole argument tuple at every call site)."""
    return None


def _check_key_padding_mask(mask: torch.Tensor, src_len: int, bsz: int) -> None:
    if mask.shape[0] != bsz:
        raise AssertionError(f"Expected key_padded_mask.shape[0] to be {bsz}, but got {mask.shape[0]}")
    if mask.shape[1] != src_len:
        raise AssertionError(f"Expected key_padded_mask.shape[1] to be {src_len}, but got {mask.shape[1]}")


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in for :class:`torch.nn.MultiheadAttention` (same constructor, parameters and forward).

    Shapes as torch: query ``(L, N, E)`` (``(N, L, E)`` with ``batch_first``, ``(L, E)`` unbatched), key and
    value ``(S, N, kdim/vdim)``; returns ``(attn_output, attn_weights or None)``.
    """

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Optional[Tensor]]:
        if torch.jit.is_scripting():  # torch's own computation: TorchScript cannot compile fastattn's dispatch
            batched = query.dim() == 3
            if self.batch_first and batched:
                query, key, value = query.transpose(1, 0), key.transpose(1, 0), value.transpose(1, 0)
            out, weights = F.multi_head_attention_forward(
                query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
                self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight,
                self.out_proj.bias, training=self.training, key_padding_mask=key_padding_mask,
                need_weights=need_weights, attn_mask=attn_mask, use_separate_proj_weight=not self._qkv_same_embed_dim,
                q_proj_weight=self.q_proj_weight, k_proj_weight=self.k_proj_weight,
                v_proj_weight=self.v_proj_weight, average_attn_weights=average_attn_weights, is_causal=is_causal,
            )  # fmt: skip
            return (out.transpose(1, 0) if self.batch_first and batched else out), weights
        return self._fastattn_forward(
            query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )

    def __prepare_scriptable__(self) -> nn.Module:
        warn_once(
            "MultiheadAttention",
            "TorchScript cannot compile fastattn's dispatch (torch.compile can)",
            instead="torch's nn.MultiheadAttention computation in the scripted module",
        )
        return self

    @torch.jit.unused
    def _fastattn_forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor],
        need_weights: bool,
        attn_mask: Optional[Tensor],
        average_attn_weights: bool,
        is_causal: bool,
    ) -> tuple[Tensor, Optional[Tensor]]:
        if need_weights:
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
            )
        fast = self._torch_fast_path(query, key, value, key_padding_mask, attn_mask)
        if query.is_nested or key.is_nested or value.is_nested:
            if not fast:  # torch refuses nested input off its fast path: let it say so
                return super().forward(query, key, value, key_padding_mask, False, attn_mask, True, is_causal)
            out = [self._attend(x, x, x, None, None, False, nan_rows=True) for x in query.unbind()]
            return torch.nested.as_nested_tensor(out, layout=query.layout), None
        return self._attend(query, key, value, key_padding_mask, attn_mask, is_causal, nan_rows=fast), None

    def _torch_fast_path(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """Whether ``nn.MultiheadAttention.forward`` would take its fused inference path for this call
        (the conditions torch checks, in the same terms)."""
        if (attn_mask is not None and torch.is_floating_point(attn_mask)) or (
            key_padding_mask is not None and torch.is_floating_point(key_padding_mask)
        ):
            return False
        if not torch.backends.mha.get_fastpath_enabled() or query.dim() != 3:
            return False
        if query is not key or key is not value:
            return False
        if self.in_proj_weight is None or self.in_proj_bias is None:
            return False
        if query.dtype != self.in_proj_weight.dtype or query.dtype != self.in_proj_bias.dtype:
            return False
        if self.training or self.num_heads % 2 or not self.batch_first or not self._qkv_same_embed_dim:
            return False
        if self.bias_k is not None or self.bias_v is not None or self.add_zero_attn:
            return False
        if query.is_nested and (key_padding_mask is not None or attn_mask is not None):
            return False
        if torch.is_autocast_enabled():
            return False
        tensors = (query, self.in_proj_weight, self.in_proj_bias, self.out_proj.weight, self.out_proj.bias)
        if torch.overrides.has_torch_function(tensors):
            return False
        if any(t is not None and t.device.type not in ("cpu", "cuda") for t in tensors):
            return False
        return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))

    def _attend(self, query, key, value, key_padding_mask, attn_mask, is_causal, nan_rows: bool) -> torch.Tensor:
        """The ``need_weights=False`` computation of ``F.multi_head_attention_forward`` on fastattn."""
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        if self.batch_first and is_batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        heads, head_dim = self.num_heads, self.head_dim

        # A bool padding mask, kept to attend over packed keys (True = padding, as torch's); its float form
        # (0 / -inf) is what every other path takes.
        kpm_bool = key_padding_mask if key_padding_mask is not None and key_padding_mask.dtype == torch.bool else None
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        if is_causal and attn_mask is None and not nan_rows:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        # torch's autograd path trusts the hint (the mask is causal) unless a padding mask must be merged in;
        # its inference path ignores the hint and applies the mask.
        causal = is_causal and key_padding_mask is None and not nan_rows
        if causal:
            attn_mask = None
        else:
            attn_mask = F._canonical_mask(
                mask=attn_mask,
                mask_name="attn_mask",
                other_type=None,
                other_name="",
                target_type=query.dtype,
                check_other=False,
            )
        if embed_dim != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}")
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
            q, k, v = F._in_projection_packed(query, key, value, self.in_proj_weight, self.in_proj_bias)
        else:
            if key.shape[:2] != value.shape[:2]:
                raise AssertionError(
                    f"key's sequence and batch dims {key.shape[:2]} do not match value's {value.shape[:2]}"
                )
            b_q, b_k, b_v = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            q, k, v = F._in_projection(
                query, key, value, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight, b_q, b_k, b_v
            )

        src_len = key.shape[0]
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, src_len)}."
                    )
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (bsz * heads, tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                        f"{(bsz * heads, tgt_len, src_len)}."
                    )
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
            kpm_bool = None if kpm_bool is None else F.pad(kpm_bool, (0, 1))  # the bias key is real

        # (L, N, E) -> (N, H, L, head_dim): views of the projections, no copies.
        q = q.view(tgt_len, bsz, heads, head_dim).permute(1, 2, 0, 3)
        k = k.view(k.shape[0], bsz, heads, head_dim).permute(1, 2, 0, 3)
        v = v.view(v.shape[0], bsz, heads, head_dim).permute(1, 2, 0, 3)
        if self.add_zero_attn:
            zeros = torch.zeros((bsz, heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
            kpm_bool = None if kpm_bool is None else F.pad(kpm_bool, (0, 1))  # the zero key is real
        src_len = k.shape[2]

        dropout_p = self.dropout if self.training else 0.0
        # A key padding mask alone that leaves much of the batch empty: attend over the packed real keys.
        if kpm_bool is not None and attn_mask is None and not causal and not nan_rows:
            _check_key_padding_mask(key_padding_mask, src_len, bsz)
            out = padded_key_attention(q, k, v, ~kpm_bool.reshape(bsz, src_len), dropout_p)
            if out is not None:
                return self._project_out(out, tgt_len, bsz, embed_dim, is_batched)
        # Masks stay broadcast ((1|N, 1|H, L, S) and (N, 1, 1, S)); only both together are summed.
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1 else attn_mask.view(bsz, heads, -1, src_len)
        if key_padding_mask is not None:
            _check_key_padding_mask(key_padding_mask, src_len, bsz)
            kpm = key_padding_mask.view(bsz, 1, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm

        out = scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, causal)
        if nan_rows and attn_mask is not None:
            # torch's fused inference path leaves NaN where a query row sees no key.
            empty = torch.isneginf(attn_mask).all(dim=-1, keepdim=True)
            out = out.masked_fill(empty, float("nan"))
        return self._project_out(out, tgt_len, bsz, embed_dim, is_batched)

    def _project_out(self, out, tgt_len: int, bsz: int, embed_dim: int, is_batched: bool) -> torch.Tensor:
        """(N, H, L, head_dim) attention output -> the module's output layout, through out_proj."""
        out = out.permute(2, 0, 1, 3).reshape(tgt_len * bsz, embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(tgt_len, bsz, -1)
        if not is_batched:
            return out.squeeze(1)
        return out.transpose(1, 0) if self.batch_first else out
