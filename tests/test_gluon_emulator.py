"""The Gluon emulator (fastattn.testing.gluon_emulate): correct kernels give exactly the result of the same
arithmetic in PyTorch, and each planted synchronization bug is caught with an error that names it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

import gluon_kernels as gk  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor  # noqa: E402

from fastattn.testing import DeadlockError, EmulationError, RaceError, gluon_emulate  # noqa: E402


def _desc(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}[t.dtype]
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dtype))


def _matmul(bug: int, M: int, N: int, K: int, stages: int = 2, block=(64, 64, 64), seed: int = 0):
    BM, BN, BK = block
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g).bfloat16()
    b = torch.randn(N, K, generator=g).bfloat16()
    c = torch.full((M, N), float("nan"))
    grid = (-(-M // BM), -(-N // BN))
    info = gluon_emulate(gk.ws_matmul_kernel)[grid](
        _desc(a, [BM, BK]), _desc(b, [BN, BK]), _desc(c, [BM, BN]), K, stages, bug, num_warps=4
    )
    # The same arithmetic in PyTorch: per tile, float32 products of bf16 operands summed chunk by chunk
    # (the copy engine fills rows and columns past the tensor with zeros).
    pad = lambda x, r, k: torch.nn.functional.pad(x, (0, k - x.shape[1], 0, r - x.shape[0]))  # noqa: E731
    ap, bp = pad(a, grid[0] * BM, -(-K // BK) * BK), pad(b, grid[1] * BN, -(-K // BK) * BK)
    ref = torch.empty(grid[0] * BM, grid[1] * BN)
    for i in range(0, ref.shape[0], BM):
        for j in range(0, ref.shape[1], BN):
            acc = torch.zeros(BM, BN)
            for k in range(0, ap.shape[1], BK):
                acc = acc + ap[i : i + BM, k : k + BK].float() @ bp[j : j + BN, k : k + BK].float().T
            ref[i : i + BM, j : j + BN] = acc
    return c, ref[:M, :N], info


@pytest.mark.parametrize("M, N, K, stages", [(128, 64, 192, 2), (96, 128, 320, 3), (64, 64, 64, 2)])
def test_correct_kernel_is_exact(M, N, K, stages):
    c, ref, info = _matmul(gk.NONE.value, M, N, K, stages)
    assert torch.equal(c, ref)  # bit for bit: the same float32 operations in the same order
    assert info.partitions == [("default", 4), ("worker0:_loader", 1)]
    assert info.programs == -(-M // 64) * -(-N // 64)


PLANTED = {
    gk.NO_READY_WAIT.value: (RaceError, ["operand A", "nothing has written"]),
    gk.ACC_BEFORE_WAIT.value: (RaceError, ["accumulator of the async warpgroup_mma", "before warpgroup_mma_wait"]),
    gk.NOBODY_ARRIVES.value: (
        DeadlockError,
        ["deadlock", "default:_consumer", "waits on mbarrier", "parity 0", "worker0:_loader", "1 of 1 arrivals"],
    ),  # fmt: skip
    gk.WRONG_PARITY.value: (RaceError, ["operand A", "default:_consumer"]),
    gk.NO_EMPTY_WAIT.value: (RaceError, ["bulk tensor copy into", "no barrier ordering that read before this write"]),
    gk.SHORT_EXPECT.value: (EmulationError, ["2 more bytes arrived than mbarrier.expect announced"]),
    gk.NO_FENCE.value: (RaceError, ["fence_async_shared"]),
}


@pytest.mark.parametrize("bug", gk.BUGS)
def test_planted_bug_is_caught(bug):
    error, words = PLANTED[bug]
    with pytest.raises(error) as exc:
        _matmul(bug, 128, 64, 256, stages=2)
    for word in words:
        assert word in str(exc.value), str(exc.value)


def test_wrong_parity_after_the_first_pass_is_caught():
    """A wait of the wrong parity once the ring has turned: the stage it reads is still being refilled (or was
    filled for another phase) when it reads."""
    with pytest.raises((RaceError, DeadlockError)):
        _matmul(gk.WRONG_PARITY.value, 64, 64, 512, stages=2)


def test_bounds_and_layouts():
    x = torch.randn(100)
    out = torch.full((100,), float("nan"))
    gluon_emulate(gk.bounds_kernel)[(1,)](x, out, 100, 0, 128, 4, num_warps=4)
    assert torch.equal(out, x * 2)
    with pytest.raises(EmulationError, match="gl.load out of bounds"):
        gluon_emulate(gk.bounds_kernel)[(1,)](x, out, 100, 1, 128, 4, num_warps=4)
    with pytest.raises(EmulationError, match="shared memory index 2 out of range"):
        gluon_emulate(gk.bounds_kernel)[(1,)](x, out, 100, -1, 128, 4, num_warps=4)
    with pytest.raises(EmulationError, match="spans 2 warps"):
        gluon_emulate(gk.bounds_kernel)[(1,)](x, out, 100, 0, 128, 2, num_warps=4)


def test_the_test_kernel_compiles_for_sm90():
    """The kernels above are real Gluon: they compile for sm_90 with a loader partition under its own register
    budget, async wgmma and bulk tensor copies (no GPU needed)."""
    from fastattn.codegen import compile_gluon

    a, b = torch.empty(128, 192, dtype=torch.bfloat16), torch.empty(64, 192, dtype=torch.bfloat16)
    c = torch.empty(128, 64)
    row = compile_gluon(
        gk.ws_matmul_kernel, [_desc(a, [64, 64]), _desc(b, [64, 64]), _desc(c, [64, 64]), 192],
        dict(STAGES=2, BUG=0, num_warps=4), num_warps=4,
    )  # fmt: skip
    assert row["wgmma"] and row["spills"] == 0
    assert not row["wgmma_async"]  # it waits for each wgmma: no group stays in flight (the check sees both ways)
    assert len(row["setmaxnreg"]) >= 2
