"""Shared test utilities: the device under test, tolerances per dtype, relative errors."""

from __future__ import annotations

import os

import torch

# CPU machines test the kernels through TRITON_INTERPRET=1; a GPU run sets FASTATTN_TEST_DEVICE=cuda.
DEVICE = torch.device(os.environ.get("FASTATTN_TEST_DEVICE", "cpu"))

# Kernel backends under test; "cuda" cases skip (conftest) where the CUDA C++ kernels cannot run.
BACKENDS = ["triton", "cuda", "torch"]


def cuda_backend_skip() -> str | None:
    """Why the CUDA C++ kernels cannot run in this test session, or None: on a GPU they need fastattn._C, on
    the CPU they run through the host emulation, fastattn._C_host."""
    from fastattn.ops.cuda_ext import unavailable

    return unavailable(DEVICE)


# The rule (README): relative error ||out - ref|| / ||ref|| against a float64 reference; fp32 within FP32_TOL; fp16
# and bf16 within 2x the error of PyTorch's own op in that dtype plus a floor, outputs and gradients alike (as in
# flash-attention's tests). The floor, 1/32 of the dtype's epsilon, is about 6 % of the bound on the suite's
# shapes (torch's error there is ~2e-3 in bf16, ~2.5e-4 in fp16): it keeps an exact torch result from making the
# bound 0 without deciding the outcome. Every low-precision check is recorded in RATIOS for the summary.
FP32_TOL = 1e-5
LOW_PRECISION = (torch.float16, torch.bfloat16)
FLOOR = {dt: torch.finfo(dt).eps / 32 for dt in LOW_PRECISION}
RATIOS: list[tuple[str, torch.dtype, float, float]] = []  # (test and what, dtype, error, torch's error)
CURRENT_TEST = [""]  # the running test's node id (set by conftest), for RATIOS


def fp32_tol() -> float:
    """fp32 tolerance: 1e-5 for IEEE products; tf32 tensor cores (only on CUDA, when allowed) get 1e-3."""
    if DEVICE.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return 1e-3
    return FP32_TOL


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
    """``out`` against ``ref`` (float64) by the rule above. ``torch_out`` is PyTorch's own result in ``dtype``
    for the same inputs: required in fp16/bf16; in fp32, where given, it lifts the bound to 2x torch's error
    when torch's own fp32 does no better than FP32_TOL (cancellation, e.g. dq when each row sees one key)."""
    err = rel_err(out, ref)
    if dtype in LOW_PRECISION:
        if torch_out is None:
            raise TypeError(f"{what}: a {dtype} check needs PyTorch's own result in {dtype} (torch_out)")
        torch_err = rel_err(torch_out, ref)
        bound = 2 * torch_err + FLOOR[dtype]
        RATIOS.append((f"{CURRENT_TEST[0]} {what}", dtype, err, torch_err))
        ratio = err / torch_err if torch_err else float("inf")
        assert err <= bound, (
            f"{what}: relative error {err:.3e} > {bound:.3e} = 2 x torch's {torch_err:.3e} + {FLOOR[dtype]:.1e} "
            f"({ratio:.2f}x torch's error)"
        )
        return
    bound = fp32_tol()
    if torch_out is not None:
        bound = max(bound, 2 * rel_err(torch_out, ref))
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.3e}"


def randn(*shape, dtype=torch.float32, requires_grad=False, gen=None) -> torch.Tensor:
    x = torch.randn(*shape, dtype=torch.float32, device="cpu", generator=gen).to(device=DEVICE, dtype=dtype)
    return x.requires_grad_(requires_grad)


def torch_result(fn, tensors, dout: torch.Tensor | None = None):
    """PyTorch's own op ``fn`` on fresh leaves of ``tensors`` (same dtype and device; None entries pass through):
    its output and, given ``dout`` (float64, cast to the output's dtype), the gradients of the leaves that
    require grad: what the low-precision rule compares against."""
    leaves = [t if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    out = fn(*leaves)
    if dout is None:
        return out.detach(), []
    wrt = [t for t in leaves if t is not None and t.requires_grad]
    return out.detach(), list(torch.autograd.grad(out, wrt, dout.to(out.device, out.dtype)))


def torch_rotary(x: torch.Tensor, pos: torch.Tensor, rot: int, interleaved: bool) -> torch.Tensor:
    """Rotary as PyTorch code does it in x's dtype: cos/sin tables from fp32 angles, cast to x's dtype, then
    ``a cos - b sin``, ``b cos + a sin`` on the pairs: "PyTorch's own op in that dtype" for the rule."""
    inv = 1.0 / 10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    angle = pos.to(torch.float32)[..., None] * inv.to(pos.device)  # (N|1, L, rot/2)
    cos, sin = (f(angle).to(x.dtype)[:, None] for f in (torch.cos, torch.sin))
    head, rest = x[..., :rot], x[..., rot:]
    a, b = (head[..., 0::2], head[..., 1::2]) if interleaved else (head[..., : rot // 2], head[..., rot // 2 :])
    ra, rb = a * cos - b * sin, b * cos + a * sin
    turned = torch.stack((ra, rb), -1).flatten(-2) if interleaved else torch.cat((ra, rb), -1)
    return torch.cat((turned, rest), -1)


def formula_rotary(x: torch.Tensor, pos: torch.Tensor, rot: int, interleaved: bool) -> torch.Tensor:
    """Pair j of the first ``rot`` columns turns by pos / 10000^(2j/rot): pairs (j, j + rot/2) or (2j, 2j+1)."""
    x = x.double().clone()
    out = x.clone()
    for j in range(rot // 2):
        a, b = (2 * j, 2 * j + 1) if interleaved else (j, j + rot // 2)
        theta = pos.double()[:, None, :] / 10000 ** (2 * j / rot)  # pos (N|1, L) -> (N|1, 1, L)
        c, s = torch.cos(theta), torch.sin(theta)
        out[..., a] = x[..., a] * c - x[..., b] * s
        out[..., b] = x[..., b] * c + x[..., a] * s
    return out


def torch_sdpa(*args, **kwargs):
    """torch's own SDPA (bound by fastattn at import, so a drop-in swap in a test cannot reach it)."""
    from fastattn import _torch

    return _torch.scaled_dot_product_attention(*args, **kwargs)


def reference(q, k, v, offset=0, left=None, right=None, bias=None, scale=None):
    """Attention in float64, written independently of fastattn's own reference: query i sees key j when
    ``i + offset - left <= j <= i + offset + right`` (None: no limit), by torch's float64 SDPA with that mask
    (and a float bias added), GQA by head groups; q, k, v are float64 CPU tensors (N, H|H_kv, L|S, E). Returns
    ``(out, lse)``: rows that see no key give 0 and lse -inf (fastattn's documented result)."""
    L, S = q.shape[-2], k.shape[-2]
    i, j = torch.arange(L)[:, None] + offset, torch.arange(S)[None, :]
    keep = torch.ones(L, S, dtype=torch.bool)
    if left is not None:
        keep &= j >= i - left
    if right is not None:
        keep &= j <= i + right
    mask = keep if bias is None else bias.masked_fill(~keep, float("-inf"))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch_sdpa(q, k, v, mask, scale=scale, enable_gqa=True)
    group = q.shape[1] // k.shape[1]
    scores = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * scale
    scores = scores.masked_fill(~keep, float("-inf")) if bias is None else scores + mask
    lse = torch.logsumexp(scores, -1)
    return torch.where(torch.isfinite(lse)[..., None], out, 0.0), lse


def grad_out(shape, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random incoming gradient as float64 holding values of ``dtype``: the kernel, torch's op and the float64
    reference then all get the same gradient, and rounding it is no one's error."""
    return torch.randn(shape, dtype=torch.float64, generator=generator).to(dtype).double()
