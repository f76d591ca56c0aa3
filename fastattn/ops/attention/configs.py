"""Tile configurations of the attention kernels, and the small autotuner that picks among them on a GPU.

The candidates are sized for Hopper (sm_90): 128-row tiles so that each warpgroup issues m64 wgmma
instructions, 8 warps (two warpgroups) for the forward, and the backward's transposed products keep the
128-row side on the tile each program owns. Under ``TRITON_INTERPRET=1`` a single small config is used:
the interpreter's cost grows with the tile count, and small tiles exercise more tile edges; ``forced``
runs chosen configs instead (the tests run every GPU candidate on the CPU that way).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable

import torch

from ..._backend import interpreting


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False  # streamed tiles (fwd/dq: K, V; dK/dV: Q, dO) through tensor descriptors, sm_90+

    def __str__(self) -> str:
        return f"M{self.block_m}-N{self.block_n}-w{self.num_warps}-s{self.num_stages}{'-tma' if self.tma else ''}"


INTERPRETER_CONFIG = Config(32, 16, 4, 1)
# The interpreter takes the descriptor path when the tensors allow it, like a Hopper GPU, so both get tested.
INTERPRETER_TMA_CONFIG = Config(32, 16, 4, 1, True)


# Rows of fp32 weigh twice those of bf16/fp16 in shared memory and registers: the lists are chosen by the
# row width in 16-bit units, so fp32 at head dim 128 takes the tiles of bf16 at 256.
def _width(block_d: int, elem_size: int) -> int:
    return block_d * elem_size // 2


def fwd_configs(block_d: int, elem_size: int = 2) -> list[Config]:
    """Forward candidates for a padded head dim ``block_d``; the first is the default when not tuning. For
    bf16/fp16 at head dims 64 and 128 every candidate compiles for sm_90 with wgmma and no spills
    (``python -m fastattn.codegen --all-configs``); the last one of each list is the small fallback taken
    when a bias tile pushes the others past the shared-memory limit."""
    w = _width(block_d, elem_size)
    if w <= 64:
        return [Config(128, 128, 8, 3), Config(128, 64, 4, 3), Config(64, 64, 4, 3)]
    if w <= 128:
        return [Config(128, 128, 8, 3), Config(128, 64, 8, 3), Config(128, 128, 8, 2), Config(64, 64, 4, 3)]
    if w <= 256:
        return [Config(128, 64, 8, 2), Config(128, 32, 8, 2), Config(64, 32, 4, 1)]
    return [Config(64, 32, 4, 2), Config(32, 32, 4, 1)]


# Packed / split / paged launches (VARLEN rows, pointer loads only) on sm_90 in 16-bit at head dims up to 128:
# these compile with wgmma and no spills (the codegen rows *_varlen check it); larger tiles spill and a few
# smaller ones crash ptxas 13.0, so the lists are single, checked configs, with the smallest pointer config
# for other widths.
_VARLEN = {"fwd": Config(128, 64, 8, 3), "dkdv": Config(32, 128, 8, 2), "dq": Config(64, 64, 8, 2)}


def varlen_configs(kind: str, block_d: int, elem_size: int = 2) -> list[Config]:
    if _width(block_d, elem_size) <= 128:
        return [_VARLEN[kind]]
    fallback = {"fwd": fwd_configs, "dkdv": dkdv_configs, "dq": dq_configs}[kind]
    return fallback(block_d, elem_size)[-1:]


def tma_fwd_configs(block_d: int, elem_size: int = 2) -> list[Config]:
    """Forward candidates that load K/V with tensor descriptors (the copy engine, mbarrier-completed), tried
    ahead of the others where the tensors allow it. Fewer address registers: 190 instead of 255 at d=128.
    (num_stages=2 with 128-key tiles crashes ptxas 13 on this kernel, so it is left out.)"""
    if elem_size != 2 or block_d > 128:
        return []
    if block_d <= 64:
        return [Config(128, 128, 8, 3, True), Config(128, 64, 8, 3, True), Config(128, 64, 4, 3, True)]
    return [Config(128, 128, 8, 3, True), Config(128, 64, 8, 3, True), Config(128, 64, 8, 4, True)]


def rotary_fwd_configs(block_d: int, elem_size: int = 2) -> list[Config]:
    """Forward candidates with rotary fused in: the turned K tile, its pair partners and the cos/sin tiles
    share the registers with the accumulator, so the key tile is 64 wide (0 spills at d=128 for sm_90;
    d > 128 still spills, 54+ words)."""
    if _width(block_d, elem_size) > 128:
        return fwd_configs(block_d, elem_size)
    if _width(block_d, elem_size) > 64:  # three stages of a 64-key tile and its partners overflow 227 KB
        return [Config(128, 64, 8, 2), Config(128, 32, 8, 3), Config(64, 64, 8, 2), Config(64, 32, 4, 2)]
    return [Config(128, 64, 8, 3), Config(128, 32, 8, 3), Config(64, 64, 8, 2), Config(64, 32, 4, 2)]


def tma_dkdv_configs(block_d: int, elem_size: int = 2) -> list[Config]:
    """dK/dV candidates that stream Q and dO tiles through tensor descriptors (16-bit data, d <= 128).
    (num_stages=2 with 128-key tiles crashes ptxas 13 here; M64-N128 spills at d=128.)"""
    if elem_size != 2 or block_d > 128:
        return []
    if block_d <= 64:
        return [Config(64, 128, 8, 3, True), Config(32, 128, 8, 3, True), Config(64, 64, 8, 3, True)]
    return [Config(32, 128, 8, 3, True), Config(64, 64, 8, 3, True)]


def tma_dq_configs(block_d: int, elem_size: int = 2) -> list[Config]:
    """dQ candidates that stream K and V tiles through tensor descriptors (16-bit data, d <= 128)."""
    if elem_size != 2 or block_d > 128:
        return []
    if block_d <= 64:
        return [Config(128, 64, 8, 3, True), Config(128, 128, 8, 3, True), Config(128, 32, 8, 3, True)]
    return [Config(128, 64, 8, 3, True), Config(128, 128, 8, 2, True), Config(128, 32, 8, 3, True)]


def dkdv_configs(block_d: int, elem_size: int = 2) -> list[Config]:
    """dK/dV candidates: ``block_n`` keys owned by the program, ``block_m`` queries streamed. The program
    holds two fp32 (block_n x head dim) accumulators, so the key tile shrinks as the head dim grows."""
    w = _width(block_d, elem_size)
    if w <= 64:
        return [Config(64, 128, 8, 3), Config(32, 128, 8, 3), Config(32, 64, 4, 3)]
    if w <= 128:
        return [Config(32, 128, 8, 3), Config(64, 64, 8, 3), Config(32, 128, 8, 2), Config(32, 64, 4, 3)]
    if w <= 256:
        return [Config(16, 64, 8, 2), Config(16, 32, 4, 1)]
    return [Config(16, 32, 4, 1)]


def dq_configs(block_d: int, elem_size: int = 2) -> list[Config]:
    """dQ candidates: ``block_m`` queries owned by the program, ``block_n`` keys streamed."""
    w = _width(block_d, elem_size)
    if w <= 64:
        return [Config(128, 64, 8, 3), Config(128, 32, 4, 3), Config(64, 64, 4, 3)]
    if w <= 128:
        return [Config(128, 64, 8, 3), Config(128, 32, 8, 3), Config(64, 64, 4, 2), Config(128, 64, 8, 2)]
    if w <= 256:
        return [Config(64, 64, 8, 2), Config(64, 32, 8, 2), Config(32, 32, 4, 1)]
    return [Config(64, 32, 4, 1), Config(32, 32, 4, 1)]


_TUNED: dict[tuple, Config] = {}
_FORCED: contextvars.ContextVar[dict[str, Config] | None] = contextvars.ContextVar("fastattn_forced", default=None)


@contextlib.contextmanager
def forced(**by_kind: Config) -> Iterator[None]:
    """Run the given config for each kernel kind (``fwd``, ``dkdv``, ``dq``) in this block, on a GPU (no
    tuning) and under the interpreter alike (which otherwise runs one small config). A descriptor config is
    refused where the launch can only take pointers."""
    unknown = set(by_kind) - {"fwd", "dkdv", "dq"}
    if unknown:
        raise ValueError(f"forced: kernel kinds are fwd, dkdv and dq; got {sorted(unknown)}")
    token = _FORCED.set({**(_FORCED.get() or {}), **by_kind})
    try:
        yield
    finally:
        _FORCED.reset(token)


def tuning_enabled() -> bool:
    return os.environ.get("FASTATTN_AUTOTUNE", "1") != "0"


def pick(key: tuple, candidates: list[Config], launch: Callable[[Config], None], device: torch.device) -> Config:
    """The config to run for ``key``: on a GPU, the fastest of ``candidates`` (median of
    ``triton.testing.do_bench``, once per key), or with FASTATTN_AUTOTUNE=0 the first that launches.
    Candidates that need more shared memory than the device has (a bias tile on top) are skipped. A config
    ``forced`` for the kind (``key[0]``) wins."""
    chosen = (_FORCED.get() or {}).get(key[0])
    if chosen is not None:
        if chosen.tma and not candidates[0].tma:
            raise ValueError(f"forced: {chosen} loads through tensor descriptors, which this launch cannot take")
        return chosen
    if interpreting() or device.type != "cuda":
        return INTERPRETER_TMA_CONFIG if candidates[0].tma else INTERPRETER_CONFIG
    if key in _TUNED:
        return _TUNED[key]
    from triton.runtime.errors import OutOfResources, PTXASError

    # A config the assembler cannot build (ptxas 13.0 crashes on a few) is skipped like one that does not fit.
    skip = (OutOfResources, PTXASError)

    if not tuning_enabled() or len(candidates) == 1:
        for cfg in candidates:
            try:
                launch(cfg)
            except skip:
                continue
            _TUNED[key] = cfg
            return cfg
        raise RuntimeError(f"fastattn: no attention config fits the device for {key}")
    import triton.testing

    best, best_ms = None, float("inf")
    for cfg in candidates:
        try:
            ms = triton.testing.do_bench(lambda cfg=cfg: launch(cfg), warmup=5, rep=20, return_mode="median")
        except skip:
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"fastattn: no attention config fits the device for {key}")
    _TUNED[key] = best
    return best


def tuned_configs() -> dict[tuple, Config]:
    """The configs chosen so far in this process (key -> config), for reports."""
    return dict(_TUNED)
