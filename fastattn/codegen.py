"""Ahead-of-time compile of the Triton attention kernels for a GPU architecture, with no GPU needed.

``python -m fastattn.codegen --arch sm_90`` compiles the forward, the backward preprocess, dK/dV and dQ kernels
for each head dim, dtype and tile config (and on sm_90 the Gluon attention kernels at their head dims, rows
with ``GLUON_KEYS``: partitions' register budgets and whether wgmma groups stay in flight), and prints per
kernel whether the PTX uses Hopper's ``wgmma``, the registers and spilled words per thread, and the dynamic
shared memory per program. ``--json`` prints the same
rows as a JSON list. The exit code is 1 if any compile failed (the rows that compiled are still printed).

The kernels are specialised as the JIT specialises them for the common case: contiguous tensors (last-dim
strides are the constant 1; pointers and the other integers are multiples of 16, i.e. sequence lengths and
head counts that are), no bias, no window, no dropout, no GQA. ``[causal]`` rows add ``HAS_RIGHT`` (right=0).
Registers and spills (the stack frame in 32-bit words per thread, as Triton's ``n_spills``) come from
``cuobjdump --dump-resource-usage`` of the cubin: ``CompiledKernel.n_regs`` / ``n_spills`` are only filled in
when the cubin is loaded on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .ops.attention.bwd_kernel import (
    _attention_bwd_dkdv_kernel,
    _attention_bwd_dq_kernel,
    _attention_bwd_preprocess_kernel,
)
from .ops.attention.configs import (
    Config,
    dkdv_configs,
    dq_configs,
    fwd_configs,
    rotary_fwd_configs,
    tma_dkdv_configs,
    tma_dq_configs,
    tma_fwd_configs,
    varlen_configs,
)
from .ops.attention.fwd_kernel import _attention_fwd_kernel
from .ops.norm.kernels import _norm_bwd_kernel, _norm_fwd_kernel
from .ops.norm.launch import MAX_TILE
from .ops.norm.launch import _warps as _norm_warps
from .ops.posenc.kernels import _rotary_kernel, _sinusoidal_kernel
from .ops.posenc.launch import sinusoidal_tiles

# atomics: atomic or reduction instructions (atom./red.) in the PTX; 0 means the kernel's result does not depend
# on the order in which programs run (the deterministic-backward claim, checked without a GPU).
KEYS = ("kernel", "head_dim", "dtype", "config", "wgmma", "registers", "spills", "shared_bytes", "atomics")
# Gluon rows add: the warps of all partitions (padded to warpgroups), the register budget each partition sets
# (setmaxnreg, in the order they appear), and whether the main loop keeps a wgmma group in flight while it waits.
GLUON_KEYS = KEYS + ("num_warps", "setmaxnreg", "wgmma_async")
GLUON_HEAD_DIMS = {
    "attention_fwd_gluon": (64, 128, 256),
    "attention_fwd_gluon_softcap_sinks": (128,),
    "attention_bwd_gluon": (64, 128, 256),
}
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# Most dynamic shared memory one program may opt into (227 KB on H100, 163 KB on A100); used for the notes only.
SHARED_LIMIT = {90: 232448, 80: 166912, 86: 101376, 89: 101376}
KERNELS = {
    "attention_fwd": _attention_fwd_kernel,
    "attention_fwd_rotary": _attention_fwd_kernel,  # rotary embeddings fused in (pointer loads, cos/sin tables)
    "attention_bwd_preprocess": _attention_bwd_preprocess_kernel,
    "attention_bwd_dkdv": _attention_bwd_dkdv_kernel,
    "attention_bwd_dq": _attention_bwd_dq_kernel,
    # Packed sequences (VARLEN rows), and for the forward also key splits and a paged cache (decode_attention).
    "attention_fwd_varlen": _attention_fwd_kernel,
    "attention_bwd_dkdv_varlen": _attention_bwd_dkdv_kernel,
    "attention_bwd_dq_varlen": _attention_bwd_dq_kernel,
}
# The launchers try the descriptor (TMA) configs first where the tensors allow, then the pointer ones.
CONFIGS = {
    "attention_fwd": lambda d, size: tma_fwd_configs(d, size) + fwd_configs(d, size),
    "attention_fwd_rotary": rotary_fwd_configs,
    "attention_bwd_dkdv": lambda d, size: tma_dkdv_configs(d, size) + dkdv_configs(d, size),
    "attention_bwd_dq": lambda d, size: tma_dq_configs(d, size) + dq_configs(d, size),
    "attention_fwd_varlen": lambda d, size: varlen_configs("fwd", d, size),  # pointers only
    "attention_bwd_dkdv_varlen": lambda d, size: varlen_configs("dkdv", d, size),
    "attention_bwd_dq_varlen": lambda d, size: varlen_configs("dq", d, size),
}
# Norm kernels: one row per hidden size ("head_dim" column), layer norm with weight and bias, no residual.
NORM_KERNELS = {
    "layer_norm_fwd": _norm_fwd_kernel,
    "layer_norm_bwd": _norm_bwd_kernel,
    "sinusoidal": _sinusoidal_kernel,
    "rotary": _rotary_kernel,
}
NORM_PTRS = {"X", "R", "W", "B", "Y", "S", "DY", "DS_OUT", "DX", "DR"}
NORM_FP32_PTRS = {"MEAN", "RSTD", "DW", "DB"}
# The launcher runs the preprocess with BLOCK_M=64 and the JIT's default num_warps / num_stages.
PREPROCESS_CONFIG = Config(64, 0, 4, 3)
DIVISIBLE = [["tt.divisibility", 16]]


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # as the launcher: tl.dot needs K >= 16


def _capability(arch: str) -> int:
    match = re.fullmatch(r"sm_?(\d+)a?", arch.strip().lower())
    if not match:
        raise ValueError(f"arch must look like sm_90 or sm_80, got {arch!r}")
    return int(match.group(1))


def _attention_launch(kernel: str, head_dim: int, dtype: str, cfg: Config, causal: bool) -> tuple:
    """(JIT function, positional args, keyword args) of an attention kernel as its launcher builds them (with the
    same ``attention_args`` builders), on example CPU tensors: contiguous, lengths and head counts multiples of
    16, no bias, window, dropout or GQA; ``causal`` adds the right limit 0."""
    import torch

    from .ops.attention import launch as launch
    from .ops.attention.args import dropout_arg, mods_arg, operand, rotary_arg, scores_arg, window_arg

    fn = KERNELS[kernel]
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    Z, H, L = 2, 16, 1024
    q = torch.empty(Z, H, L, head_dim, dtype=tdt)
    k, v, out = torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)
    lse = torch.empty(Z, H, L)
    varlen = None
    if kernel.endswith("_varlen"):  # packed rows; the forward also with key splits and a paged cache
        bt = torch.zeros(Z, 64, dtype=torch.int32) if kernel.startswith("attention_fwd") else None
        varlen = launch.Varlen(torch.zeros(Z, 5, dtype=torch.int32), (0, Z * L), 1 if bt is None else 2, 512,
                               (16, 16), bt)  # fmt: skip
        if bt is not None:
            k, v = (torch.empty(128, H, 16, head_dim, dtype=tdt) for _ in range(2))
    rows = launch._rows(varlen, q, H, L, k)
    if kernel == "attention_bwd_preprocess":
        consts = dict(HEAD_DV=head_dim, BLOCK_M=cfg.block_m, BLOCK_DV=_block_d(head_dim))
        return fn, [operand(out), operand(out), lse, H, L, rows], consts
    sc, win = scores_arg(q, None, None, None, None), window_arg(0, None, 0 if causal else None)
    mods = mods_arg(q)
    drop, tile = dropout_arg(0.0, 0, 0), launch._tile(q, k, v, cfg, cfg.tma)
    rows_desc = cfg.block_m if kernel.startswith("attention_bwd_dkdv") else cfg.block_n
    desc = (lambda t: launch._descriptor(t, rows_desc)) if cfg.tma else (lambda t: t)  # noqa: E731
    if kernel.startswith("attention_fwd"):
        rope = rotary_arg(q)
        if kernel == "attention_fwd_rotary":
            rope = rotary_arg(q, (torch.empty(2 * L, head_dim // 2),) * 2, head_dim, 0, False)
        return fn, [operand(q), operand(k, desc(k)), operand(v, desc(v)), operand(out), lse, H, L, L, 0.1, sc, mods,
                    win, drop, rope, rows, tile], {}  # fmt: skip
    if kernel.startswith("attention_bwd_dkdv"):
        return fn, [operand(q, desc(q)), operand(k), operand(v), operand(out, desc(out)), lse, lse, operand(k),
                    operand(v), H, L, L, 0.1, sc, mods, win, drop, rows, tile], {}  # fmt: skip
    return fn, [operand(q), operand(k, desc(k)), operand(v, desc(v)), operand(out), lse, lse, operand(q), q, lse, H, L,
                L, 0.1, sc, mods, win, drop, rows, tile], dict(BIAS_GRAD=False)  # fmt: skip


def jit_source(fn, args: list, kwargs: dict, capability: int) -> ASTSource:
    """The ASTSource the JIT builds for a launch with these arguments, by its own binder (ints equal to 1 become
    constexprs, multiples of 16 get the divisibility attribute, named tuples their fields' types), no GPU needed."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _source(kernel: str, head_dim: int, dtype: str, cfg: Config, causal: bool, capability: int) -> ASTSource:
    if kernel in NORM_KERNELS:
        return _norm_source(kernel, head_dim, dtype, cfg)
    return jit_source(*_attention_launch(kernel, head_dim, dtype, cfg, causal), capability)


def _norm_source(kernel: str, hidden: int, dtype: str, cfg: Config) -> ASTSource:
    """Norm kernels as the launcher runs them on contiguous rows (``cfg.block_m`` = tile, ``block_n`` = tiles)."""
    fn = NORM_KERNELS[kernel]
    if kernel == "sinusoidal":  # rows of d_model = hidden
        block_r, block_d = sinusoidal_tiles(hidden)
        consts: dict = dict(BLOCK_R=block_r, BLOCK_D=block_d)
    elif kernel == "rotary":  # rows of a head of dim 128, full rotary, NeoX pairs
        consts = dict(HAS_POS=False, INTERLEAVED=False, BLOCK_R=32, BLOCK_P=64, BLOCK_E=0)
    else:
        consts = dict(IS_RMS=False, HAS_W=True, HAS_B=True, HAS_RES=False, HAS_DROPOUT=False, BLOCK=cfg.block_m,
                      NUM_CHUNKS=cfg.block_n)  # fmt: skip
    if kernel == "layer_norm_bwd":
        consts["HAS_DS_OUT"] = False
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            continue
        if name in NORM_PTRS:
            signature[name] = f"*{dtype}"
        elif name in NORM_FP32_PTRS:
            signature[name] = "*fp32"
        elif name in ("FREQ", "POS"):
            signature[name] = "*fp64" if name == "FREQ" else "*i64"
        elif name in ("eps", "dropout_p", "scale", "sign"):
            signature[name] = "fp32"
            continue
        else:
            signature[name] = "i32"
            if name in ("M", "rows_per_program", "seed", "rows", "L", "H", "offset"):
                continue  # counts and sizes need not be multiples of 16
        attrs[(i,)] = DIVISIBLE
    return ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)


def _resource_usage(cubin: bytes, name: str) -> tuple[int, int]:
    """(registers, spilled 32-bit words) per thread from the cubin, as the driver reports them on a GPU."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], check=True, capture_output=True, text=True)
    match = re.search(rf"Function {re.escape(name)}:\s*\n\s*REG:(\d+) STACK:(\d+).*?LOCAL:(\d+)", out.stdout)
    if not match:
        raise RuntimeError(f"no resource usage for {name} in cuobjdump output:\n{out.stdout}")
    # Triton's n_spills is CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES / 4, the per-thread local memory. ptxas puts spills
    # in the stack frame (STACK; LOCAL stays 0), and these kernels make no calls, so the frame is all spills.
    regs, stack, local = (int(g) for g in match.groups())
    return regs, (stack + local) // 4


def _reason(e: BaseException) -> str:
    """One line for a failed compile: the innermost cause (a CompilationError of a nested @jit function wraps the
    callee's), its message rather than the source excerpt, and for ptxas the first and last lines of its log."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = getattr(e, "error_message", None) or str(e)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()] or [""]
    return f"{type(e).__name__}: {' / '.join(dict.fromkeys([lines[0], lines[-1]]))}"[:240]


def compile_gluon(kernel, args: list, constexprs: dict, num_warps: int, arch: str = "sm_90", maxnreg=None) -> dict:
    """Compile a ``@gluon.jit`` kernel ahead of time; ``args`` are example values of its non-constexpr
    parameters in order (tensors, descriptors, ints), whose types make the signature as the JIT would.
    Returns a row: total ``num_warps`` (partitions padded to warpgroups), ``setmaxnreg`` (the register budgets
    set, in order), ``wgmma``, ``wgmma_async`` (a wait that leaves a wgmma group in flight), registers,
    spills, shared_bytes, atomics."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    signature, values = {}, iter(args)
    for name in kernel.arg_names:
        signature[name] = "constexpr" if name in constexprs else mangle_type(next(values))
    options = {"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})}
    with contextlib.redirect_stdout(io.StringIO()):
        compiled = triton.compile(
            GluonASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", _capability(arch), 32),
            options=options,
        )  # fmt: skip
    ptx = compiled.asm["ptx"]
    registers, spills = _resource_usage(compiled.asm["cubin"], compiled.metadata.name)
    budgets = [int(n) for n in re.findall(r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx)]
    return dict(
        kernel=compiled.metadata.name,
        wgmma="wgmma.mma_async" in ptx,
        registers=registers,
        spills=spills,
        shared_bytes=compiled.metadata.shared,
        atomics=len(re.findall(r"(?<![\w.%])(?:atom|red)\.", ptx)),
        num_warps=compiled.metadata.num_warps,
        setmaxnreg=list(dict.fromkeys(budgets)),
        wgmma_async=bool(re.search(r"wgmma\.wait_group\.sync\.aligned\s+[1-9]", ptx)),
    )


def _gluon_launch(kernel: str, head_dim: int, dtype: str, causal: bool):
    """(JIT function, example arguments, constexprs, label) of a Gluon kernel as its launcher calls it."""
    import torch

    from .ops.attention import gluon as launch

    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    x = torch.empty(2, 4, 1024, head_dim, dtype=tdt)  # shapes do not matter: the kernels take them at run time
    f32 = torch.empty(2, 4, 1024)
    flags = dict(HAS_LEFT=False, HAS_RIGHT=causal, LOADER_REGS=launch.LOADER_REGS, CONSUMER_REGS=launch.CONSUMER_REGS)
    if kernel.startswith("attention_fwd_gluon"):
        from .ops.attention.gluon_fwd import attention_fwd_gluon_kernel as fn

        block_n, stages = launch._tiles(head_dim)
        descs = [launch._descriptor(x, launch.BLOCK_M)] + [launch._descriptor(x, block_n)] * 2
        args = descs + [x, f32, f32, 16, 16, 16, 2, 4, 1024, 1024, 1, 0.1, 0.1, 0.1, 0, 0, 0]
        features = kernel.endswith("_softcap_sinks")  # Gemma 2 / gpt-oss: both features on
        consts = dict(flags, HAS_SOFTCAP=features, HAS_SINKS=features, HEAD_DV=head_dim, BLOCK_M=launch.BLOCK_M,
                      BLOCK_N=block_n, STAGES=stages)  # fmt: skip
        label = f"M2x{launch.BLOCK_M}-N{block_n}-s{stages}-ws"
    else:
        from .ops.attention.gluon_bwd import attention_bwd_gluon_kernel as fn

        bm, bn, split_d = launch.bwd_blocks(head_dim)
        descs = [launch._descriptor(x, bm)] * 2 + [launch._descriptor(x, bn if split_d else bn // 2)] * 2
        args = descs + [f32, f32, f32, x, x] + [16] * 9 + [4, 1024, 1024, 1, 0.1, 0.1, 0, 0, 0]
        consts = dict(flags, BLOCK_M=bm, BLOCK_N=bn, STAGES=launch.BWD_STAGES, SPLIT_D=split_d)
        keys = f"N{bn}-splitd" if split_d else f"N2x{bn // 2}"
        label = f"M{bm}-{keys}-s{launch.BWD_STAGES}-ws"
    return fn, args, consts, label


def _compile_gluon_job(job: tuple[str, bool, int, str, int]) -> dict:
    kernel, causal, head_dim, dtype, capability = job
    fn, args, consts, label = _gluon_launch(kernel, head_dim, dtype, causal)
    row: dict = dict(kernel=kernel + ("[causal]" if causal else ""), head_dim=head_dim, dtype=dtype, config=label)
    try:
        row.update(compile_gluon(fn, args, consts, num_warps=4, arch=f"sm_{capability}"))
        row["kernel"] = kernel + ("[causal]" if causal else "")
    except Exception as e:  # one bad compile must not hide the other rows
        row.update({k: None for k in GLUON_KEYS if k not in row})
        row["error"] = _reason(e)
    return {k: row[k] for k in GLUON_KEYS} | ({"error": row["error"]} if "error" in row else {})


def _compile_one(job: tuple) -> dict:
    if len(job) == 5:
        return _compile_gluon_job(job)
    kernel, causal, head_dim, dtype, cfg, capability = job
    if kernel in NORM_KERNELS:
        label = f"B{cfg.block_m}x{cfg.block_n}-w{cfg.num_warps}"
    elif cfg.block_n == 0:  # preprocess
        label = f"M{cfg.block_m}-w{cfg.num_warps}-s{cfg.num_stages}"
    else:
        label = str(cfg)
    row: dict = dict(kernel=kernel + ("[causal]" if causal else ""), head_dim=head_dim, dtype=dtype, config=label)
    try:
        # On failure Triton prints the whole PTX to stdout, which would corrupt --json; the exception has the log.
        with contextlib.redirect_stdout(io.StringIO()):
            compiled = triton.compile(
                _source(kernel, head_dim, dtype, cfg, causal, capability),
                target=GPUTarget("cuda", capability, 32),
                options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
            )
        registers, spills = _resource_usage(compiled.asm["cubin"], compiled.metadata.name)
        if kernel in NORM_KERNELS and "ld.global.v4" not in compiled.asm["ptx"]:
            row["note"] = "no 16-byte vector loads in the PTX"
        row.update(
            wgmma="wgmma" in compiled.asm["ptx"],
            registers=registers,
            spills=spills,
            shared_bytes=compiled.metadata.shared,
            atomics=len(re.findall(r"(?<![\w.%])(?:atom|red)\.", compiled.asm["ptx"])),
        )
    except Exception as e:  # one bad config must not hide the others' rows
        row.update(wgmma=None, registers=None, spills=None, shared_bytes=None, atomics=None)
        row["error"] = _reason(e)
    return row


def _jobs(
    capability: int,
    head_dims: tuple[int, ...],
    dtypes: tuple[str, ...],
    all_configs: bool,
    causal: bool,
    norm_hidden: tuple[int, ...] = (),
) -> list[tuple[str, bool, int, str, Config, int]]:
    jobs = []
    for hidden in norm_hidden:
        block, chunks = min(triton.next_power_of_2(hidden), MAX_TILE), triton.cdiv(hidden, MAX_TILE)
        cfg = Config(block, chunks, _norm_warps(block), 1)
        norm_jobs = [(k, cfg) for k in ("layer_norm_fwd", "layer_norm_bwd")]
        norm_jobs.append(("sinusoidal", Config(sinusoidal_tiles(hidden)[1], 1, 4, 1)))  # the launcher's 4 warps
        jobs += [(k, False, hidden, dtype, c, capability) for dtype in dtypes for k, c in norm_jobs]
    if norm_hidden:
        jobs += [("rotary", False, 128, dtype, Config(128, 1, 4, 1), capability) for dtype in dtypes]
    for head_dim in head_dims:
        if not 1 <= head_dim <= 256:
            raise ValueError(f"head dims 1..256 are compiled, not {head_dim}")
        for dtype in dtypes:
            for kernel in KERNELS:
                if kernel not in CONFIGS:
                    jobs.append((kernel, False, head_dim, dtype, PREPROCESS_CONFIG, capability))
                    continue
                configs = CONFIGS[kernel](_block_d(head_dim), 4 if dtype == "fp32" else 2)
                if not all_configs:  # the default of each load path: pointers, and descriptors where offered
                    configs = [c for i, c in enumerate(configs) if c.tma not in {p.tma for p in configs[:i]}]
                for variant in (False, True) if causal else (False,):
                    jobs += [(kernel, variant, head_dim, dtype, cfg, capability) for cfg in configs]
    return jobs


def compile_rows(
    arch: str = "sm_90",
    head_dims: tuple[int, ...] = (64, 128),
    dtypes: tuple[str, ...] = ("bf16",),
    all_configs: bool = False,
    causal: bool = True,
    workers: int = 2,
    norm_hidden: tuple[int, ...] = (1024, 4096, 16384),
    gluon: bool = True,
) -> list[dict]:
    """Compile every kernel (default config, or all candidates) and return one row per compile: the ``KEYS``,
    plus ``error`` (and None values) for a compile that failed."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("fastattn.codegen compiles real kernels: unset TRITON_INTERPRET (the CLI does that itself)")
    capability = _capability(arch)
    unknown = [d for d in dtypes if d.strip().lower() not in DTYPES]
    if unknown:
        raise ValueError(f"dtypes are bf16, fp16 and fp32, not {', '.join(unknown)}")
    dtypes = tuple(DTYPES[d.strip().lower()] for d in dtypes)
    jobs: list[tuple] = list(_jobs(capability, tuple(head_dims), dtypes, all_configs, causal, tuple(norm_hidden)))
    if gluon and capability == 90:  # the Gluon kernels are written for sm_90 (wgmma, setmaxnreg), 16-bit inputs
        for kernel, dims in GLUON_HEAD_DIMS.items():
            for dtype in (d for d in dtypes if d != "fp32"):
                variants = (False, True) if causal else (False,)
                jobs += [(kernel, c, d, dtype, capability) for d in dims for c in variants]
    if workers <= 1 or len(jobs) == 1:
        return [_compile_one(job) for job in jobs]
    # Each compile is single-threaded (MLIR passes, then ptxas); spawn, as forking after torch's import is unsafe.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_one, jobs))


def format_table(rows: list[dict]) -> str:
    cells = [list(KEYS)] + [
        ["-" if r[k] is None else str(r[k]) for k in KEYS] + ([f"error: {r['error']}"] if "error" in r else [])
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells if i < len(c)) for i in range(len(KEYS))]
    return "\n".join(" | ".join(c.ljust(w) for c, w in zip(line, widths + [0])).rstrip() for line in cells)


def problems(rows: list[dict], arch: str) -> list[str]:
    """Notes for rows that compiled but would not run well on ``arch``: spills, too much shared memory,
    and (on sm_90+) a matmul kernel without wgmma."""
    capability, notes = _capability(arch), []
    limit = SHARED_LIMIT.get(capability)
    for r in (r for r in rows if "error" not in r):
        what = f"{r['kernel']} d={r['head_dim']} {r['dtype']} {r['config']}"
        if r["spills"]:
            notes.append(f"{what}: spills {r['spills']} words per thread")
        if limit is not None and r["shared_bytes"] > limit:
            notes.append(f"{what}: shared memory {r['shared_bytes']} > {limit} bytes")
        if capability >= 90 and not r["wgmma"] and r["kernel"].startswith(("attention_fwd", "attention_bwd_d")):
            notes.append(f"{what}: no wgmma in the PTX")
        if "note" in r:
            notes.append(f"{what}: {r['note']}")
        if "setmaxnreg" in r and len(r["setmaxnreg"]) < 2:
            notes.append(f"{what}: fewer than two register budgets (no warp specialization?)")
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastattn.codegen", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--arch", default="sm_90", help="target, e.g. sm_90 (Hopper) or sm_80 (Ampere)")
    parser.add_argument("--head-dims", default="64,128", help="comma-separated head dims (1..256)")
    parser.add_argument("--dtypes", default="bf16", help="comma-separated, of bf16, fp16, fp32")
    parser.add_argument("--all-configs", action="store_true", help="every candidate config, not only the default")
    parser.add_argument("--no-causal", action="store_true", help="skip the [causal] variants")
    parser.add_argument("--norm-hidden", default="1024,4096,16384", help="hidden sizes of the norm kernels ('' skips)")
    parser.add_argument("--workers", type=int, default=2, help="compile processes")
    parser.add_argument("--no-gluon", action="store_true", help="skip the Gluon kernels (sm_90 rows)")
    parser.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        # Kernels decorated under the interpreter cannot be compiled: start again without it.
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        cmd = [sys.executable, "-m", "fastattn.codegen", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, env=env).returncode
    try:
        rows = compile_rows(
            args.arch,
            tuple(int(d) for d in args.head_dims.split(",")),
            tuple(args.dtypes.split(",")),
            args.all_configs,
            not args.no_causal,
            args.workers,
            tuple(int(h) for h in args.norm_hidden.split(",") if h),
            gluon=not args.no_gluon,
        )
    except ValueError as e:  # bad --arch / --head-dims / --dtypes
        parser.error(str(e))
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    failed = [r for r in rows if "error" in r]
    for note in problems(rows, args.arch):  # stderr under --json, so that stdout stays one JSON document
        print(f"note: {note}", file=sys.stderr if args.json else sys.stdout)
    if failed:
        print(f"fastattn.codegen: {len(failed)} of {len(rows)} compiles failed for {args.arch}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
