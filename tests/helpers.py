"""Shared test utilities: the device under test, tolerances per dtype, relative errors."""

from __future__ import annotations

import os

import torch

# CPU machines test the kernels through TRITON_INTERPRET=1; a GPU run sets FASTATTN_TEST_DEVICE=cuda.
DEVICE = torch.device(os.environ.get("FASTATTN_TEST_DEVICE", "cpu"))

# Kernel backends under test; "cuda" cases skip (conftest) where the CUDA C++ kernels cannot run.
BACKENDS = ["triton", "cuda", "torch"]


def cuda_backend_skip() -> str | None:
    """Why the CUDA C++ kernels cannot run in this test session, or None."""
    if DEVICE.type != "cuda":
        return "the CUDA C++ kernels run only on a GPU (this session tests on cpu; FASTATTN_TEST_DEVICE=cuda)"
    from fastattn.ops.cuda_ext import unavailable

    return unavailable(DEVICE)


# Relative error ||out - ref|| / ||ref|| against a float64 reference. Low precision must also stay within
# 2x the error of PyTorch's own op in the same dtype (plus this floor), as in flash-attention's tests.
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
LOW_PRECISION_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def fp32_tol() -> float:
    """fp32 tolerance: 1e-5 for IEEE products; tf32 tensor cores (only on CUDA, when allowed) get 1e-3."""
    if DEVICE.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return 1e-3
    return TOL[torch.float32]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in output (unwritten element or NaN produced)"
    out, ref = out.double().cpu(), ref.double().cpu()
    # A reference that is 0 up to rounding (dk when every row sees one key: the gradient cancels exactly in exact
    # arithmetic and to ~1e-7 per element in fp32) makes the ratio meaningless. The floor, RMS 0.2, turns the
    # bound into an absolute one there (fp32: 2e-6 RMS, about 16 ulp of 1.0); it is at or below the RMS of
    # the results of the O(1)-scaled inputs in these tests.
    den = max(ref.norm().item(), 0.2 * ref.numel() ** 0.5)
    return (out - ref).norm().item() / den


def assert_close(
    out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, torch_out: torch.Tensor | None = None, what: str = ""
) -> None:
    """``out`` within the dtype's bound of ``ref`` (float64), and within 2x torch's error when given."""
    err = rel_err(out, ref)
    bound = fp32_tol() if dtype == torch.float32 else TOL[dtype]
    if torch_out is not None:
        torch_err = 2 * rel_err(torch_out, ref) + LOW_PRECISION_FLOOR[dtype]
        # Low precision must also be within 2x torch's error; fp32 may reach it where torch's own fp32 does
        # no better than the table (cancellation, e.g. dq when each row sees a single key).
        bound = max(bound, torch_err) if dtype == torch.float32 else min(bound, torch_err)
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.3e}"


def randn(*shape, dtype=torch.float32, requires_grad=False, gen=None) -> torch.Tensor:
    x = torch.randn(*shape, dtype=torch.float32, device="cpu", generator=gen).to(device=DEVICE, dtype=dtype)
    return x.requires_grad_(requires_grad)
