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
def _name_the_running_test(request):
    from helpers import CURRENT_TEST

    CURRENT_TEST[0] = request.node.nodeid


@pytest.fixture(autouse=True)
def _skip_cuda_backend_where_it_cannot_run(request):
    """Cases parametrized with backend="cuda" skip, with the reason, where the CUDA kernels cannot run."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "cuda":
        from helpers import cuda_backend_skip

        why = cuda_backend_skip()
        if why is not None:
            pytest.skip(why)


def pytest_sessionfinish(session):
    """Under pytest-xdist, a worker hands its ratios to the controller, which prints the summary."""
    output = getattr(session.config, "workeroutput", None)
    if output is not None:
        from helpers import RATIOS

        output["fastattn_ratios"] = [(what, str(dt), err, t) for what, dt, err, t in RATIOS]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    import torch
    from helpers import RATIOS

    for what, dt, err, t in getattr(node, "workeroutput", {}).get("fastattn_ratios", []):
        RATIOS.append((what, getattr(torch, dt.replace("torch.", "")), err, t))


def pytest_terminal_summary(terminalreporter):
    """The low-precision rule's ratios, as the README promises: error / torch's error per check, per dtype."""
    from helpers import FLOOR, RATIOS

    if not RATIOS:
        return
    terminalreporter.section("fp16/bf16 errors against float64, as multiples of torch's own (bound: 2x + floor)")
    for dtype in FLOOR:
        rows = [r for r in RATIOS if r[1] == dtype and r[3] > 0]
        exact = sum(1 for r in RATIOS if r[1] == dtype and r[3] == 0)
        if not rows:
            continue
        worst = max(rows, key=lambda r: r[2] / r[3])
        ratios = sorted(err / t for _, _, err, t in rows)
        decided = [r for r in RATIOS if r[1] == dtype and r[2] > 2 * r[3]]  # would fail without the floor
        terminalreporter.write_line(
            f"{str(dtype).replace('torch.', ''):9s} {len(rows)} checks: median {ratios[len(ratios) // 2]:.2f}x, "
            f"max {ratios[-1]:.2f}x ({worst[0]}); {exact} where torch is exact (bound: the floor, "
            f"{FLOOR[dtype]:.1e}); the floor decided {len(decided)}"
            + "".join(f"\n    {what}: error {err:.1e}, torch's {t:.1e}" for what, _, err, t in decided[:5])
        )
