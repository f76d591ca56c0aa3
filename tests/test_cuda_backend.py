"""The CUDA C++ backend (csrc/, fastattn._C) on a machine without a GPU: every .cu file compiles on its own for
sm_80 and sm_90a without warnings, spills or (attention) stack frames; the extension imports and reports; its
host-side logic (lane maps, tile ranges, online softmax, Welford merge, Philox, sine/cosine) passes host tests
and agrees with the Triton kernels; and the ``cuda`` backend refuses what it cannot take, with the reason."""

from __future__ import annotations

import importlib
import math
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from helpers import DEVICE, randn

import fastattn
from fastattn import _backend
from fastattn.ops.attention.args import dropout_arg
from fastattn.ops.attention.cuda import cuda_refusal, key_padding_mask
from fastattn.ops.attention.tiles import _dropout_keep

CSRC = Path(__file__).resolve().parents[1] / "csrc"
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="no host C++ compiler (g++)")


def _ext():
    try:
        import fastattn._C as ext
    except ImportError as exc:
        pytest.skip(f"fastattn._C is not built here ({exc})")
    return ext


def test_extension_imports_and_reports_without_a_gpu():
    ext = _ext()
    rt = ext.runtime_info()
    assert set(rt) == {"device_count", "device_error", "runtime_version", "archs"}
    assert "90a" in rt["archs"].split(";")
    if not torch.cuda.is_available():
        assert rt["device_count"] == 0 and rt["device_error"], rt  # an error code, not a crash


@pytest.mark.parametrize("module", ["_C", "_C_host"])
def test_bad_parameters_return_an_error_code_before_any_launch(module):
    """Both builds of the launchers (the GPU one and the host emulation) refuse alike."""
    try:
        ext = importlib.import_module(f"fastattn.{module}")
    except ImportError as exc:
        pytest.skip(f"fastattn.{module} is not built here ({exc})")
    assert ext.error_string(ext.norm_forward(0, 0, 0, 0, 0, 0, 1, 8, 8, 8, 1e-5, 0, 0, False, 0)) == "invalid argument"
    strides = [[0, 0, 0]] * 4
    # Head dim 32 is not compiled: refused before anything is read from the (null) pointers.
    code = ext.attention_forward((16, 16, 16, 16, 16), strides, [1, 1, 1, 8, 8, 32], 1.0, [0, 0, 0],
                                 [False, False], 0, 0, 0, 0.0, 0, 0, 1, 0)  # fmt: skip
    assert ext.error_string(code) == "invalid argument"
    code = ext.sinusoidal_forward(0, 0, 0, 1, 1, 8, 8, 8, 0, 1.0, 0, 0)
    assert ext.error_string(code) == "invalid argument"
    # Empty inputs (whose data pointers may be null) are a successful no-op, as torch's ops.
    assert ext.norm_forward(0, 0, 0, 0, 0, 0, 0, 8, 8, 8, 1e-5, 0, 0, False, 0) == 0
    assert ext.sinusoidal_forward(0, 0, 0, 0, 1, 8, 8, 8, 0, 1.0, 0, 0) == 0


def test_info_names_each_backend():
    report = fastattn.info()
    assert {"torch_backend", "triton_backend", "cuda_backend"} <= set(report)
    for name in ("triton_backend", "cuda_backend"):
        assert report[name]["usable"] or report[name]["why"], report[name]
    out = subprocess.run([sys.executable, "-m", "fastattn"], capture_output=True, text=True, check=True)
    assert "cuda" in out.stdout and "triton" in out.stdout


def _nvcc(cu: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["nvcc", "-O3", "-std=c++17", f"-I{CSRC / 'include'}", "-gencode=arch=compute_80,code=sm_80",
         "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v", "-c", str(cu), "-o", "/dev/null"],
        capture_output=True, text=True,
    )  # fmt: skip


@needs_nvcc
def test_every_cu_file_compiles_alone_without_warnings_or_spills():
    """Each .cu file alone, with only csrc/include (no torch), for sm_80 and sm_90a: no warning, no spill in any
    kernel, and no stack frame in the attention kernels (a stack frame there means local memory traffic)."""
    files = sorted(CSRC.glob("*.cu"))
    assert {f.stem for f in files} >= {"attention_fwd", "attention_bwd", "norm", "posenc"}
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(files, pool.map(_nvcc, files)))
    for cu, out in results.items():
        assert out.returncode == 0, out.stderr
        assert "warning" not in out.stderr.lower(), out.stderr
        kernels = re.findall(r"Compiling entry function '(\w+)' for '(sm_\w+)'\s+.*?\n\s+(\d+) bytes stack frame, "
                             r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stderr)  # fmt: skip
        assert {arch for _, arch, *_ in kernels} == {"sm_80", "sm_90a"}, out.stderr
        for name, arch, stack, stores, loads in kernels:
            assert int(stores) == 0 and int(loads) == 0, f"{cu.name}: {name} spills on {arch}"
            if "attention" in name:
                assert int(stack) == 0, f"{cu.name}: {name} has a {stack}-byte stack frame on {arch}"


def _cuda_include() -> str:
    out = subprocess.run(["nvcc", "--dryrun", "-x", "cu", "-c", "/dev/null", "-o", "/dev/null"],
                         capture_output=True, text=True)  # fmt: skip
    found = re.search(r'INCLUDES="-I([^"]+)"', out.stdout + out.stderr)
    if found is None:
        pytest.skip("nvcc did not report its include directory")
    return found.group(1).strip()


@needs_gxx
@needs_nvcc
@pytest.mark.parametrize("name", ["test_meanvar", "test_attention_logic"])
def test_host_logic_of_the_kernels(tmp_path, name):
    """csrc/tests/*.cpp compiled by the host compiler against the kernels' __host__ __device__ functions."""
    binary = tmp_path / name
    subprocess.run(
        ["g++", "-O1", "-std=c++17", "-Wall", "-Werror", f"-I{CSRC / 'include'}", f"-I{_cuda_include()}",
         str(CSRC / "tests" / f"{name}.cpp"), "-o", str(binary)],
        check=True,
    )  # fmt: skip
    out = subprocess.run([str(binary)], capture_output=True, text=True)
    assert out.returncode == 0 and "all ok" in out.stdout, out.stdout[-3000:]


@triton.jit
def _keep_kernel(OUT, drop, bh, ROWS: tl.constexpr, COLS: tl.constexpr):
    i = tl.arange(0, ROWS)[:, None]
    j = tl.arange(0, COLS)[None, :]
    keep = _dropout_keep(drop, bh, i, j)
    tl.store(OUT + i * COLS + j, keep.to(tl.int8))


@pytest.mark.parametrize("seed,offset,bh,p", [(0, 0, 0, 0.5), (2**61 + 12345, 7, 5, 0.3), (987654321, 0, 40, 0.9)])
def test_cuda_dropout_draws_the_triton_kernels_bits(seed, offset, bh, p):
    """The CUDA kernels' Philox (run here on the host) keeps exactly the scores the Triton kernels keep."""
    ext = _ext()
    rows, cols = 32, 64
    host = torch.frombuffer(bytearray(ext.dropout_keep_host(seed, offset, bh, rows, cols, p)), dtype=torch.int8)
    out = torch.full((rows, cols), -1, dtype=torch.int8, device=DEVICE)
    _keep_kernel[(1,)](out, dropout_arg(p, seed, offset), bh, ROWS=rows, COLS=cols)
    assert torch.equal(out.cpu().view(-1), host)
    assert abs(host.float().mean().item() - (1 - p)) < 0.1  # and it is a dropout mask at rate p


@pytest.mark.parametrize("pos", [0, 1, 37, 1000, 65535, 1_000_003, -5])
@pytest.mark.parametrize("freq", [1.0, 0.7, 1e-4])
def test_cuda_sine_cosine_are_exact_at_large_positions(pos, freq):
    s, c = _ext().sincos_host(float(pos), freq)
    assert abs(s - math.sin(pos * freq)) < 4e-7 and abs(c - math.cos(pos * freq)) < 4e-7


def test_cuda_attention_refusals_name_the_reason():
    q = torch.empty(2, 4, 8, 64, dtype=torch.bfloat16)
    k = v = torch.empty(2, 2, 8, 64, dtype=torch.bfloat16)
    assert cuda_refusal(q, k, v, None, 0.125, None, None) is None
    assert "float32" in cuda_refusal(q.float(), k.float(), v.float(), None, 0.125, None, None)
    q32, k32 = torch.empty(2, 4, 8, 32, dtype=torch.bfloat16), torch.empty(2, 2, 8, 32, dtype=torch.bfloat16)
    assert "head dims" in cuda_refusal(q32, k32, k32, None, 0.125, None, None)
    assert "head dims" in cuda_refusal(q, k, torch.empty(2, 2, 8, 128, dtype=torch.bfloat16), None, 0.1, None, None)
    padding = torch.ones(2, 1, 1, 8, dtype=torch.bool).expand(2, 4, 8, 8)
    assert cuda_refusal(q, k, v, padding, 0.125, None, None) is None
    assert key_padding_mask(padding).shape == (2, 8)
    per_query = torch.ones(2, 1, 8, 8, dtype=torch.bool).expand(2, 4, 8, 8)
    assert "key padding" in cuda_refusal(q, k, v, per_query, 0.125, None, None)
    assert "key padding" in cuda_refusal(q, k, v, torch.zeros(2, 4, 8, 8), 0.125, None, None)
    assert "ALiBi" in cuda_refusal(q, k, v, None, 0.125, torch.ones(4), None)
    assert "positive scale" in cuda_refusal(q, k, v, None, -1.0, None, None)


def test_cuda_backend_steps_down_to_triton_with_the_reason(monkeypatch):
    """Under backend("cuda") with no usable CUDA kernels (here: the extension made unloadable), each op warns
    once why and runs the Triton kernels."""
    from fastattn.ops import cuda_ext

    monkeypatch.setattr(cuda_ext, "_load", lambda host=False: (None, "the extension is not built (this test)"))
    monkeypatch.setattr(cuda_ext, "_arch_refusal", lambda index: None)
    monkeypatch.setattr(_backend, "_warned", set())
    q, k, v = (randn(1, 2, 24, 64, dtype=torch.bfloat16) for _ in range(3))
    x = randn(5, 64)
    with fastattn.backend("cuda"):
        with pytest.warns(RuntimeWarning, match="running the Triton kernels because the CUDA kernels cannot run"):
            out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
        with pytest.warns(RuntimeWarning, match="layer_norm: running the Triton kernels"):
            y = fastattn.layer_norm(x, (64,))
    with fastattn.backend("triton"):
        assert torch.equal(out, fastattn.scaled_dot_product_attention(q, k, v, is_causal=True))
        assert torch.equal(y, fastattn.layer_norm(x, (64,)))


def test_cuda_norm_refusals_name_the_reason():
    from fastattn.ops.norm.cuda import cuda_refusal as norm_refusal

    _ext()
    x = torch.empty(4, 8200, dtype=torch.bfloat16, requires_grad=True)
    assert "Triton kernels only" in norm_refusal(x, None, None, 8200, fused=True)
    assert "8192" in norm_refusal(x, None, None, 8200, fused=False)
    with torch.no_grad():  # forward only: any width
        assert norm_refusal(x, None, None, 8200, fused=False) is None
    x = torch.empty(4, 100, dtype=torch.bfloat16, requires_grad=True)
    assert "multiple of 8" in norm_refusal(x, None, None, 100, fused=False)
    assert "weight" in norm_refusal(x, torch.empty(100, dtype=torch.float16), None, 100, fused=False)
    x = torch.empty(4, 64, dtype=torch.float16)
    mixed = norm_refusal(x, torch.empty(64), torch.empty(64, dtype=torch.float16), 64, fused=False)
    assert "one dtype" in mixed  # the kernel reads weight and bias through one type
