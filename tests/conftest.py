"""Test setup: Triton kernels run through the interpreter on CPU machines, and every output buffer the
launchers allocate is poisoned with NaN first, so an element a kernel never writes fails the comparison."""

import os

# Both must be set before triton / fastattn are imported: triton.jit reads TRITON_INTERPRET at decoration.
os.environ.setdefault("FASTATTN_POISON", "1")
if os.environ.get("FASTATTN_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI checks a fixed set of property examples (reproducible runs); local runs draw new ones each time.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
