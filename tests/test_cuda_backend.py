"""The CUDA C++ side (csrc/, fastattn._C): it builds, imports without a GPU, compiles for sm_90a without
spills, its host-side logic passes a host test, and (on a GPU) its kernels match torch."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, assert_close

import fastattn

CSRC = Path(__file__).resolve().parents[1] / "csrc"
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")


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


def test_bad_parameters_return_an_error_code_before_any_launch():
    ext = _ext()
    code = ext.norm_forward(0, 0, 0, 0, 0, 0, 1, 8, 8, 8, 1e-5, 0, 0, False, 0)
    assert ext.error_string(code) == "invalid argument"


def test_info_names_each_backend():
    report = fastattn.info()
    assert {"torch_backend", "triton_backend", "cuda_backend"} <= set(report)
    for name in ("triton_backend", "cuda_backend"):
        assert report[name]["usable"] or report[name]["why"], report[name]
    out = subprocess.run([sys.executable, "-m", "fastattn.info"], capture_output=True, text=True, check=True)
    assert "cuda" in out.stdout and "triton" in out.stdout


@needs_nvcc
def test_sm90a_compile_has_no_spills():
    out = subprocess.run(
        ["nvcc", "-O3", "-std=c++17", f"-I{CSRC / 'include'}", "-gencode=arch=compute_90a,code=sm_90a",
         "-Xptxas", "-v", "-c", str(CSRC / "norm.cu"), "-o", os.devnull],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    report = out.stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
    assert spills and not any(spills), report
    assert "bytes stack frame" in report


@pytest.mark.skipif(shutil.which("g++") is None, reason="no host C++ compiler")
def test_host_logic_of_the_norm_statistics(tmp_path):
    binary = tmp_path / "test_meanvar"
    subprocess.run(
        ["g++", "-O2", "-std=c++17", f"-I{CSRC / 'include'}", str(CSRC / "tests" / "test_meanvar.cpp"), "-o",
         str(binary)],
        check=True,
    )  # fmt: skip
    out = subprocess.run([str(binary)], capture_output=True, text=True)
    assert out.returncode == 0 and "all ok" in out.stdout, out.stdout


DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the CUDA kernels run only on a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows,n", [(7, 1000), (33, 4096), (2, 3)], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_cuda_norm_forward_matches_torch(rows, n, dtype, rms):
    ext = _ext()
    x = torch.randn(rows, n, device="cuda", dtype=dtype)
    w, b = torch.randn(n, device="cuda", dtype=dtype), torch.randn(n, device="cuda", dtype=dtype)
    y = torch.full_like(x, float("nan"))
    mean = torch.empty(rows, device="cuda")
    rstd = torch.empty(rows, device="cuda")
    code = ext.norm_forward(
        x.data_ptr(), w.data_ptr(), 0 if rms else b.data_ptr(), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
        rows, n, x.stride(0), y.stride(0), 1e-5, DTYPE_CODES[dtype], DTYPE_CODES[dtype], rms,
        torch.cuda.current_stream().cuda_stream,
    )  # fmt: skip
    assert code == 0, ext.error_string(code)
    xd = x.double().cpu()
    if rms:
        ref = xd / torch.sqrt((xd * xd).mean(-1, keepdim=True) + 1e-5) * w.double().cpu()
        torch_out = F.rms_norm(x, (n,), w, 1e-5)
    else:
        ref = F.layer_norm(xd, (n,), w.double().cpu(), b.double().cpu(), 1e-5)
        torch_out = F.layer_norm(x, (n,), w, b, 1e-5)
    assert_close(y, ref, dtype, torch_out.cpu(), "y")
