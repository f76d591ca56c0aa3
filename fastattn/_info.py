"""``fastattn.info()``: which backends can run here, and why not (``python -m fastattn`` prints it)."""

from __future__ import annotations

import importlib
import json
import sys

import torch

from ._backend import interpreting, triton_available


def info() -> dict:
    """A dict with, per backend, ``usable`` (bool) and ``why`` (the reason when not), plus versions."""
    out: dict = {"torch": torch.__version__, "cuda_device": None}
    if torch.cuda.is_available():
        out["cuda_device"] = torch.cuda.get_device_name()
    out["torch_backend"] = {"usable": True, "why": ""}
    why_not = triton_available()
    if why_not is None and not torch.cuda.is_available() and not interpreting():
        why_not = "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU tensors, slowly)"
    out["triton_backend"] = {"usable": why_not is None, "why": why_not or ""}
    gluon_why = why_not
    if gluon_why is None and not interpreting():
        cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
        if cap is None or cap[0] != 9:
            gluon_why = "the Gluon kernels are written for sm_90 (Hopper); TRITON_INTERPRET=1 runs them emulated"
    out["gluon_backend"] = {"usable": gluon_why is None, "why": gluon_why or ""}
    try:
        ext = importlib.import_module("fastattn._C")
    except ImportError as exc:
        out["cuda_backend"] = {"usable": False, "why": f"fastattn._C is not built ({exc}); needs nvcc at install"}
    else:
        rt = ext.runtime_info()
        usable = rt["device_count"] > 0
        why = "" if usable else f"no usable CUDA device: {rt['device_error'] or 'none found'}"
        if usable and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            compiled = [a.rstrip("a") for a in rt["archs"].split(";") if a]
            if f"{major}{minor}" not in compiled:
                usable, why = False, f"sm_{major}{minor} is not among the compiled archs {rt['archs']}"
        out["cuda_backend"] = {"usable": usable, "why": why, "archs": rt["archs"], "runtime": rt["runtime_version"]}
    try:  # the same kernels on CPU tensors, through the host emulation (csrc/emulate)
        importlib.import_module("fastattn._C_host")
    except ImportError as exc:
        out["cuda_emulation"] = {"usable": False, "why": f"fastattn._C_host is not built ({exc}); needs g++ at install"}
    else:
        out["cuda_emulation"] = {"usable": True, "why": ""}
    return out


def main() -> int:
    report = info()
    if "--json" in sys.argv[1:]:
        print(json.dumps(report, indent=1))
        return 0
    print(f"torch {report['torch']}, CUDA device: {report['cuda_device'] or 'none'}")
    for name in ("torch_backend", "triton_backend", "gluon_backend", "cuda_backend"):
        entry = report[name]
        state = "usable" if entry["usable"] else f"not usable: {entry['why']}"
        print(f"  {name.replace('_backend', ''):7s} {state}")
    emu = report["cuda_emulation"]
    print(f"  cuda on CPU tensors (host emulation): {'usable' if emu['usable'] else 'not usable: ' + emu['why']}")
    return 0
