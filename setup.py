"""Build entry. The package is pure Python + Triton; when nvcc is found (and FASTATTN_BUILD_CUDA != 0) it
also builds the CUDA extension ``fastattn._C`` from csrc/: the .cu files with nvcc for FASTATTN_CUDA_ARCHS
(default "80;90a"), the pybind11 bindings with the host compiler, linked against the static CUDA runtime.
Nothing in the build needs torch."""

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


class BuildCuda(build_ext):
    """Compiles csrc/*.cu with nvcc into objects that the extension links."""

    def build_extension(self, ext: Extension) -> None:
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
        with ThreadPoolExecutor(max(1, min(len(sources), os.cpu_count() or 1))) as pool:
            list(pool.map(compile_one, sources, objects))
        ext.extra_objects = objects
        ext.define_macros = [("FASTATTN_CUDA_ARCHS", f'"{archs}"')]
        super().build_extension(ext)


def _extensions() -> list[Extension]:
    home = _cuda_home()
    if home is None:
        return []
    import pybind11

    lib = home / "lib64" if (home / "lib64" / "libcudart_static.a").exists() else home / "lib"
    return [
        Extension(
            "fastattn._C",
            sources=[str((CSRC / "bindings.cpp").relative_to(ROOT))],
            include_dirs=[pybind11.get_include(), str(CSRC / "include"), str(home / "include")],
            library_dirs=[str(lib)],
            libraries=["cudart_static", "rt", "dl", "pthread"],
            extra_compile_args=["-O3", "-std=c++17"],
            language="c++",
        )
    ]


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildCuda})
