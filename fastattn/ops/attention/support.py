"""What each attention kernel family takes: one table, from which the refusal reasons are produced.

A case the chosen family cannot take runs on the next backend (Gluon -> Triton, CUDA -> Triton, Triton -> the
PyTorch path) with a one-time warning that gives the reason produced here. Imports no triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Features a call may use, with the words a refusal says.
FEATURES = {
    "bias": "bias or mask tensor (other than a bool key padding mask)",
    "key_padding": "bool key padding mask",
    "dropout": "dropout",
    "alibi": "ALiBi",
    "rotary": "fused rotary embeddings",
    "softcap": "logit soft-capping",
    "sinks": "learnable sinks",
    "user_mods": "user score or mask functions (fastattn.mods)",
}


@dataclass(frozen=True)
class Family:
    name: str
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, ...] | int  # the dims taken, or the largest one (any up to it)
    features: frozenset[str]
    same_value_dim: bool  # query and value head dims must be equal


_HALF = (torch.float16, torch.bfloat16)
FAMILIES = {
    "triton": Family("Triton", (*_HALF, torch.float32), 256, frozenset(FEATURES), False),
    "gluon": Family("Gluon", _HALF, (64, 128, 256), frozenset({"softcap", "sinks"}), True),  # forward; see gluon.py
    "cuda": Family("CUDA", _HALF, (64, 128), frozenset({"key_padding", "dropout"}), True),
}


def features_of(bias, dropout_p: float, alibi, rotary, softcap, sinks, key_padding: bool = False,
                user_mods: bool = False) -> set[str]:  # fmt: skip
    """The features a call uses; a bool key padding mask counts as ``key_padding``, not ``bias``."""
    used = {
        "dropout": dropout_p > 0.0,
        "alibi": alibi is not None,
        "rotary": rotary is not None,
        "softcap": softcap is not None,
        "sinks": sinks is not None,
        "user_mods": user_mods,
        "bias": bias is not None and not key_padding,
        "key_padding": bias is not None and key_padding,
    }
    return {name for name, on in used.items() if on}


def _names(dtypes) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def refusal(family: str, q: torch.Tensor, v: torch.Tensor, used: set[str]) -> str | None:
    """Why kernels of ``family`` cannot take this case (dtype, head dims, features), or None."""
    fam = FAMILIES[family]
    if q.dtype not in fam.dtypes:
        return f"the {fam.name} kernels take {_names(fam.dtypes)}, not {q.dtype}"
    e, ev = q.shape[-1], v.shape[-1]
    if fam.same_value_dim and e != ev:
        return f"the {fam.name} kernels take equal query and value head dims (query {e}, value {ev})"
    if isinstance(fam.head_dims, int):
        if max(e, ev) > fam.head_dims:
            return f"the {fam.name} kernels take head dims up to {fam.head_dims} (query {e}, value {ev})"
    elif e not in fam.head_dims:
        return f"the {fam.name} kernels take head dims {fam.head_dims} (query {e}, value {ev})"
    missing = [FEATURES[f] for f in FEATURES if f in used and f not in fam.features]
    if missing:
        return f"the {fam.name} kernels have no {' and no '.join(missing)}"
    return None


def triton_refusal(q: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot take these inputs (dtype, head dims), or None if they can."""
    return refusal("triton", q, v, set())


def support_table() -> str:
    """The Markdown table of the README's "Attention backends" section."""
    names = list(FAMILIES)
    lines = ["| | " + " | ".join(FAMILIES[n].name for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    dtypes = [_names(FAMILIES[n].dtypes) for n in names]
    lines.append("| dtypes | " + " | ".join(dtypes) + " |")
    dims = [f"up to {f.head_dims}" if isinstance(f.head_dims, int) else ", ".join(map(str, f.head_dims))
            for f in (FAMILIES[n] for n in names)]  # fmt: skip
    lines.append("| head dims | " + " | ".join(dims) + " |")
    for feat, words in FEATURES.items():
        lines.append(
            f"| {words} | " + " | ".join("yes" if feat in FAMILIES[n].features else "no" for n in names) + " |"
        )
    return "\n".join(lines)
