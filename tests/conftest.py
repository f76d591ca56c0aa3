"""Test setup: Triton kernels run through the interpreter on CPU machines, and every output buffer the
launchers allocate is poisoned with NaN first, so an element a kernel never writes fails the comparison."""

import os

import pytest

# Both must be set before triton / fastattn are imported: triton.jit reads TRITON_INTERPRET at decoration.
os.environ.setdefault("FASTATTN_POISON", "1")
if os.environ.get("FASTATTN_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI checks a fixed set of property examples (reproducible runs); local runs draw new ones each time.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _skip_cuda_backend_where_it_cannot_run(request):
    """Cases parametrized with backend="cuda" skip, with the reason, where the CUDA kernels cannot run."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "cuda":
        from helpers import cuda_backend_skip

        why = cuda_backend_skip()
        if why is not None:
            pytest.skip(why)
