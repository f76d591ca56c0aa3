"""Build entry. The package is pure Python + Triton, with two builds of the C++ kernels of csrc/:

- ``fastattn._C_host``, always (g++ and pybind11, no nvcc, no torch): the kernels compiled as host C++ against
  the emulation of csrc/emulate, so that ``FASTATTN_BACKEND=cuda`` runs them on CPU tensors and checks them
  (barriers, warp operations, cp.async, bounds, races) as they run. The kernel files are compiled with GCC's
  ThreadSanitizer instrumentation, whose hooks the emulator's runtime defines (no ThreadSanitizer is linked).
- ``fastattn._C``, when nvcc is found (and FASTATTN_BUILD_CUDA != 0): the .cu files with nvcc for
  FASTATTN_CUDA_ARCHS (default "80;90a"), the pybind11 bindings with the host compiler, linked against the
  static CUDA runtime.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _cuda_home() -> Path | None:
    nvcc = shutil.which("nvcc")
    if os.environ.get("FASTATTN_BUILD_CUDA", "1") == "0" or nvcc is None:
        return None
    home = os.environ.get("CUDA_HOME")
    if home:
        return Path(home)
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    release = next((w.rstrip(",") for w in out.split() if w[:1].isdigit() and "." in w), None)
    for cand in ([Path(f"/usr/local/cuda-{release}")] if release else []) + [Path("/usr/local/cuda")]:
        if (cand / "include" / "cuda_runtime.h").exists():
            return cand
    return Path(nvcc).resolve().parent.parent


def _gencode(archs: str) -> list[str]:
    flags = []
    for arch in filter(None, archs.replace(",", ";").split(";")):
        flags += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    return flags


# The host build of the kernels: flags shared with the planted-bug tests (tests/test_cuda_emulator.py).
HOST_FLAGS = ["-std=c++17", "-fPIC", "-g1", "-DFASTATTN_HOST_EMULATION", f"-I{CSRC / 'emulate' / 'include'}",
              f"-I{CSRC / 'include'}"]  # fmt: skip
HOST_KERNEL_FLAGS = ["-x", "c++", "-O1", "-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"]


def _parallel(fn, *iterables) -> None:
    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        list(pool.map(fn, *iterables))


class BuildCuda(build_ext):
    """Compiles csrc/*.cu with nvcc (``_C``) or as instrumented host C++ (``_C_host``) into objects that the
    extension links."""

    def build_extension(self, ext: Extension) -> None:
        # Both extensions compile bindings.cpp: each gets its own temp folder, so neither links the other's object.
        base = self.build_temp
        self.build_temp = str(Path(base) / ext.name.rsplit(".", 1)[-1])
        try:
            if ext.name == "fastattn._C_host":
                self._build_host(ext)
            else:
                self._build_cuda(ext)
        finally:
            self.build_temp = base

    def _build_cuda(self, ext: Extension) -> None:
        archs = os.environ.get("FASTATTN_CUDA_ARCHS", "80;90a")
        out_dir = Path(self.build_temp) / "cuda"
        out_dir.mkdir(parents=True, exist_ok=True)
        sources = sorted(CSRC.glob("*.cu"))
        objects = [str(out_dir / (cu.stem + ".o")) for cu in sources]

        def compile_one(cu: Path, obj: str) -> None:
            cmd = ["nvcc", "-O3", "-std=c++17", "-Xcompiler", "-fPIC", f"-I{CSRC / 'include'}", "-c", str(cu),
                   "-o", obj, *_gencode(archs)]  # fmt: skip
            subprocess.run(cmd, check=True)

        # One nvcc per .cu file, as many at once as there are cores: the attention files dominate the build.
        _parallel(compile_one, sources, objects)
        ext.extra_objects = objects
        ext.define_macros = [("FASTATTN_CUDA_ARCHS", f'"{archs}"')]
        super().build_extension(ext)

    def _build_host(self, ext: Extension) -> None:
        out_dir = Path(self.build_temp) / "host"
        out_dir.mkdir(parents=True, exist_ok=True)
        cxx = os.environ.get("CXX", "g++")
        jobs = [(cu, HOST_KERNEL_FLAGS) for cu in sorted(CSRC.glob("*.cu"))]
        jobs.append((CSRC / "emulate" / "runtime.cpp", ["-O2"]))
        objects = [str(out_dir / (src.stem + ".o")) for src, _ in jobs]

        def compile_one(job, obj: str) -> None:
            src, flags = job
            subprocess.run([cxx, *flags, *HOST_FLAGS, "-c", str(src), "-o", obj], check=True)

        _parallel(compile_one, jobs, objects)
        ext.extra_objects = objects
        super().build_extension(ext)


def _csrc_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in CSRC.rglob("*") if p.suffix in (".cu", ".cuh", ".h", ".cpp"))


def _host_extension() -> Extension:
    import pybind11

    return Extension(
        "fastattn._C_host",
        sources=[str((CSRC / "bindings.cpp").relative_to(ROOT))],
        include_dirs=[pybind11.get_include(), str(CSRC / "emulate" / "include"), str(CSRC / "include")],
        define_macros=[("FASTATTN_HOST_EMULATION", "1"), ("FASTATTN_CUDA_ARCHS", '"host"')],
        depends=_csrc_files(),  # rebuilt when any kernel, header or the emulator changes
        libraries=["dl", "pthread"],
        extra_compile_args=["-O1", "-std=c++17"],
        language="c++",
    )


def _extensions() -> list[Extension]:
    exts = [_host_extension()]
    home = _cuda_home()
    if home is None:
        return exts
    import pybind11

    lib = home / "lib64" if (home / "lib64" / "libcudart_static.a").exists() else home / "lib"
    return exts + [
        Extension(
            "fastattn._C",
            sources=[str((CSRC / "bindings.cpp").relative_to(ROOT))],
            include_dirs=[pybind11.get_include(), str(CSRC / "include"), str(home / "include")],
            library_dirs=[str(lib)],
            libraries=["cudart_static", "rt", "dl", "pthread"],
            depends=_csrc_files(),
            extra_compile_args=["-O3", "-std=c++17"],
            language="c++",
        )
    ]


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildCuda})
