"""Score and mask functions for ``fastattn.attention(score_mod=..., mask_mod=..., block_mask=...)``: the shipped
examples of :mod:`fastattn.mods` (the tests check each against its definition in float64).

    from fastattn.examples import masks
    doc = torch.tensor([0, 0, 0, 1, 1, ...], dtype=torch.int32, device="cuda")  # document of each position
    mm = fastattn.MaskMod(masks.document, aux=doc)
    bm = fastattn.create_block_mask(mm, None, None, L, L)  # once per batch of documents
    out = fastattn.attention(q, k, v, block_mask=bm)  # the block mask brings its mask function
"""

import triton
import triton.language as tl

from ..mods import ScoreMod

SINK_TOKENS = tl.constexpr(4)  # sliding window with a few always-visible first tokens (StreamingLLM)
WINDOW = tl.constexpr(64)
CAP = tl.constexpr(20.0)  # tanh soft-capping as a ScoreMod (the built-in is attention(softcap=...))


@triton.jit
def document(b, h, q_idx, kv_idx, doc):
    """Packed documents: a query sees the keys of its own document (aux ``doc``: int32 id per position)."""
    return tl.load(doc + q_idx) == tl.load(doc + kv_idx)


@triton.jit
def causal_document(b, h, q_idx, kv_idx, doc):
    """Packed documents, causal inside each."""
    return (tl.load(doc + q_idx) == tl.load(doc + kv_idx)) & (kv_idx <= q_idx)


@triton.jit
def prefix_lm(b, h, q_idx, kv_idx, prefix):
    """Prefix-LM: every query sees the prefix (aux ``prefix``: int32 length per batch element), the rest causally."""
    return (kv_idx < tl.load(prefix + b)) | (kv_idx <= q_idx)


@triton.jit
def sliding_window_with_sinks(b, h, q_idx, kv_idx):
    """Causal sliding window of WINDOW keys plus the first SINK_TOKENS keys, always visible."""
    return (kv_idx <= q_idx) & ((q_idx - kv_idx < WINDOW) | (kv_idx < SINK_TOKENS))


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)  # 2 log2(e): e^2x through exp2


@triton.jit
def tanh_softcap(score, b, h, q_idx, kv_idx):
    return CAP * _tanh(score / CAP)


@triton.jit
def tanh_softcap_grad(score, b, h, q_idx, kv_idx):
    t = _tanh(score / CAP)
    return 1.0 - t * t


TANH_SOFTCAP = ScoreMod(tanh_softcap, tanh_softcap_grad)
