"""The host emulation of the CUDA kernels (csrc/emulate) catches what it is there to catch: each planted bug
is a one-line change to a copy of a real kernel source, built with the C++ driver csrc/emulate/tests/driver.cpp
(no Python, no torch) and run on a small case; the unchanged sources pass the same runs against double
references. The bugs are those of the issue that built the emulator: a __syncthreads removed, a cp.async
wait_group count off by one, a shared-memory index off by one on the last tile, a shuffle mask without one
lane, a race between a shared write and another thread's read, and a global read past the last ragged tile.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from filelock import FileLock

CSRC = Path(__file__).resolve().parents[1] / "csrc"
KERNELS = ("attention_fwd", "attention_bwd", "norm")

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no host C++ compiler (g++)")

# The flags of setup.py's host build (the kernel files with the instrumentation whose hooks the emulator defines).
FLAGS = ["-std=c++17", "-fPIC", "-g1", "-DFASTATTN_HOST_EMULATION", f"-I{CSRC / 'emulate' / 'include'}",
         f"-I{CSRC / 'include'}"]  # fmt: skip
KERNEL_FLAGS = ["-x", "c++", "-O1", "-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"]


def _compile(src: Path, obj: Path, kernel: bool) -> None:
    extra = KERNEL_FLAGS if kernel else ["-O2"]
    out = subprocess.run(["g++", *extra, *FLAGS, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="session")
def objects() -> Path:
    """The driver, the runtime and the unchanged kernels as objects, built once per machine and source state
    (xdist workers share them through a lock)."""
    sources = sorted(CSRC.rglob("*.c*")) + sorted(CSRC.rglob("*.h"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + " ".join(FLAGS).encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"fastattn-emulator-{digest}"
    out.mkdir(exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not (out / "done").exists():
            _compile(CSRC / "emulate" / "runtime.cpp", out / "runtime.o", kernel=False)
            _compile(CSRC / "emulate" / "tests" / "driver.cpp", out / "driver.o", kernel=False)
            for name in KERNELS:
                _compile(CSRC / f"{name}.cu", out / f"{name}.o", kernel=True)
            (out / "done").touch()
    return out


def _driver(objects: Path, tmp: Path, kernel: str | None = None, old: str = "", new: str = "") -> Path:
    """The driver linked with the unchanged kernels, or with ``kernel``'s source changed from ``old`` to ``new``
    (compiled from a copy in its own folder, so that its #includes still find csrc/include)."""
    objs = {name: objects / f"{name}.o" for name in KERNELS}
    if kernel is not None:
        text = (CSRC / f"{kernel}.cu").read_text()
        assert text.count(old) >= 1, f"the planted change does not apply to {kernel}.cu: {old!r}"
        src = tmp / f"{kernel}.cu"
        src.write_text(text.replace(old, new, 1))
        objs[kernel] = tmp / f"{kernel}.o"
        _compile(src, objs[kernel], kernel=True)
    exe = tmp / "driver"
    cmd = ["g++", "-o", str(exe), str(objects / "driver.o"), str(objects / "runtime.o"), *map(str, objs.values())]
    out = subprocess.run([*cmd, "-ldl", "-lpthread"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return exe


def _run(exe: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LC_ALL": "C"})  # fmt: skip


CASES = [("attention", "fwd", 64, 100, 130, 0), ("attention", "bwd", 64, 100, 130, 1),
         ("attention", "bwd", 128, 77, 128, 0), ("attention", "bwd", 128, 150, 60, 1),
         ("norm", 37, 512, 0), ("norm", 9, 8192, 1)]  # fmt: skip


def test_the_unchanged_kernels_pass_the_driver(objects, tmp_path):
    """The control: every run below without a planted bug completes and matches its double reference."""
    exe = _driver(objects, tmp_path)
    for case in CASES:
        out = _run(exe, *case)
        assert out.returncode == 0, f"{case}: {out.stdout}{out.stderr}"


# (id, kernel file, text, replacement, driver arguments, what the emulator must say)
PLANTED = [
    ("syncthreads-removed-before-the-tile-is-read", "attention_fwd",
     "    }\n    __syncthreads();\n    const int64_t j0", "    }\n    const int64_t j0",
     ("attention", "fwd", 64, 100, 130, 0), "race on shared"),
    ("syncthreads-removed-before-the-buffer-is-refilled", "attention_fwd",
     "__syncthreads();  // the next iteration", "// (planted: no barrier)", ("attention", "fwd", 64, 100, 200, 0),
     "race on shared"),
    ("wait-group-count-off-by-one", "attention_fwd", "cp_async_wait<1>()", "cp_async_wait<2>()",
     ("attention", "fwd", 64, 100, 130, 0), "before the cp.async of thread"),
    ("wait-group-count-off-by-one-backward", "attention_bwd", "cp_async_wait<1>()", "cp_async_wait<2>()",
     ("attention", "bwd", 64, 100, 130, 0), "before the cp.async of thread"),
    ("shared-index-off-by-one-on-the-last-tile", "attention_fwd",
     "const T* svb = sv + (it & 1) * kBlockN * kStride;",
     "const T* svb = sv + ((it & 1) + (it + 1 == n_tiles)) * kBlockN * kStride;",
     ("attention", "fwd", 64, 100, 128, 0), "out-of-bounds shared read"),
    ("shuffle-mask-without-one-lane", "norm", "b.mean = __shfl_xor_sync(0xffffffffu",
     "b.mean = __shfl_xor_sync(0x7fffffffu", ("norm", 37, 512, 0), "whose own lane the mask does not name"),
    ("shared-write-races-another-threads-read", "norm",
     "    __syncthreads();  // the next row's call overwrites the partials\n", "", ("norm", 9, 8192, 0),
     "race on shared partial"),
    ("global-read-past-the-last-ragged-tile", "attention_fwd",
     "load_tile<T, kBlockN, D, kThreads>(sk + buf * kBlockN * kStride, k + j0 * p.k_stride.row, p.k_stride.row,\n"
     "                                       limit - j0);",
     "load_tile<T, kBlockN, D, kThreads>(sk + buf * kBlockN * kStride, k + j0 * p.k_stride.row, p.k_stride.row,\n"
     "                                       limit - j0 + 1);", ("attention", "fwd", 64, 100, 130, 0),
     "out-of-bounds global cp.async read"),
]  # fmt: skip


@pytest.mark.parametrize("kernel,old,new,args,message", [p[1:] for p in PLANTED], ids=[p[0] for p in PLANTED])
def test_a_planted_bug_is_caught(objects, tmp_path, kernel, old, new, args, message):
    out = _run(_driver(objects, tmp_path, kernel, old, new), *args)
    assert out.returncode == 3, f"the planted bug was not caught: {out.stdout}{out.stderr}"
    assert message in out.stderr, out.stderr
    if shutil.which("addr2line"):  # source lines come from binutils' addr2line
        assert f"{kernel}.cu:" in out.stderr, f"the report names no line of the kernel: {out.stderr}"


def test_the_emulation_runs_clean_under_address_sanitizer(tmp_path):
    """The emulator's own runtime and the kernels built with AddressSanitizer and UBSan (instead of the access
    hooks: GCC takes one of the two instrumentations per file): the control runs complete with no report."""
    cmd = ["g++", "-x", "c++", "-O0", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", *FLAGS]
    sources = [CSRC / "emulate" / "runtime.cpp", CSRC / "emulate" / "tests" / "driver.cpp",
               *(CSRC / f"{name}.cu" for name in KERNELS)]  # fmt: skip
    objs = [tmp_path / f"{src.stem}.o" for src in sources]
    jobs = [subprocess.Popen([*cmd, "-c", str(s), "-o", str(o)], stderr=subprocess.PIPE, text=True)
            for s, o in zip(sources, objs)]  # fmt: skip
    for job in jobs:
        assert job.wait() == 0, job.stderr.read()
    exe = tmp_path / "driver"
    out = subprocess.run(["g++", "-fsanitize=address,undefined", "-o", str(exe), *map(str, objs), "-ldl", "-lpthread"],
                         capture_output=True, text=True)  # fmt: skip
    if out.returncode != 0 and "asan" in out.stderr.lower():
        pytest.skip(f"no AddressSanitizer runtime here: {out.stderr[-200:]}")
    assert out.returncode == 0, out.stderr
    for case in (CASES[1], CASES[5]):  # attention forward and backward, the norms' block path
        run = subprocess.run([str(exe), *map(str, case)], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"})  # fmt: skip
        assert run.returncode == 0 and "runtime error" not in run.stderr, f"{case}: {run.stdout}{run.stderr}"
