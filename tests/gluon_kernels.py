"""Small Gluon kernels for the emulator's tests: a warp-specialized, pipelined matmul ``C = A @ B^T`` (a loader
warp filling a ring of shared stages through bulk tensor copies, a consumer warpgroup on async wgmma, a TMA store
epilogue), with constexpr switches that plant one synchronization bug each."""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

# Planted bugs (BUG constexpr): each breaks one rule the emulator checks (globals a kernel reads are constexpr).
NONE = gl.constexpr(0)
NO_READY_WAIT = gl.constexpr(1)  # the consumer reads a stage without waiting for its copy
ACC_BEFORE_WAIT = gl.constexpr(2)  # the accumulator of an async wgmma is used before warpgroup_mma_wait
NOBODY_ARRIVES = gl.constexpr(3)  # the consumer waits on a barrier nobody arrives on
WRONG_PARITY = gl.constexpr(4)  # the consumer waits for the wrong phase parity
NO_EMPTY_WAIT = gl.constexpr(5)  # the loader refills a stage without waiting for the consumer to release it
SHORT_EXPECT = gl.constexpr(6)  # expect announces fewer bytes than the copies bring
NO_FENCE = gl.constexpr(7)  # the epilogue's generic stores reach the TMA store with no fence_async_shared
BUGS = tuple(
    b.value
    for b in (NO_READY_WAIT, ACC_BEFORE_WAIT, NOBODY_ARRIVES, WRONG_PARITY, NO_EMPTY_WAIT, SHORT_EXPECT, NO_FENCE)
)


@gluon.jit
def _loader(a_desc, b_desc, a_smem, b_smem, ready, empty, K, BUG: gl.constexpr):
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    STAGES: gl.constexpr = a_smem.shape[0]
    off_m = gl.program_id(0) * BLOCK_M
    off_n = gl.program_id(1) * BLOCK_N
    nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
    for i in range(gl.cdiv(K, BLOCK_K)):
        s = i % STAGES
        if BUG != NO_EMPTY_WAIT:
            # The first pass over the ring waits on parity 1, which counts as complete before any phase.
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
        if BUG == SHORT_EXPECT:
            mbarrier.expect(ready.index(s), nbytes - 2)
        else:
            mbarrier.expect(ready.index(s), nbytes)
        tma.async_copy_global_to_shared(a_desc, [off_m, i * BLOCK_K], ready.index(s), a_smem.index(s))
        tma.async_copy_global_to_shared(b_desc, [off_n, i * BLOCK_K], ready.index(s), b_smem.index(s))


@gluon.jit
def _consumer(a_smem, b_smem, ready, empty, spare, c_desc, K, BUG: gl.constexpr, num_warps: gl.constexpr):
    BLOCK_M: gl.constexpr = c_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = c_desc.block_type.shape[1]
    BLOCK_K: gl.constexpr = a_smem.shape[2]
    STAGES: gl.constexpr = a_smem.shape[0]
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout)
    for i in range(gl.cdiv(K, BLOCK_K)):
        s = i % STAGES
        parity = (i // STAGES) & 1
        if BUG == WRONG_PARITY:
            parity = parity ^ 1
        if BUG == NOBODY_ARRIVES:
            mbarrier.wait(spare, 0)
        if BUG != NO_READY_WAIT:
            mbarrier.wait(ready.index(s), parity)
        acc = warpgroup_mma(a_smem.index(s), b_smem.index(s).permute((1, 0)), acc, is_async=True)
        if BUG == ACC_BEFORE_WAIT:
            acc = acc * 1.0
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(empty.index(s))
    c_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M, BLOCK_N], c_desc.layout)
    c_smem.store(acc)
    if BUG != NO_FENCE:
        fence_async_shared()
    tma.async_copy_shared_to_global(c_desc, [gl.program_id(0) * BLOCK_M, gl.program_id(1) * BLOCK_N], c_smem)
    tma.store_wait(0)


@gluon.jit
def ws_matmul_kernel(a_desc, b_desc, c_desc, K, STAGES: gl.constexpr, BUG: gl.constexpr, num_warps: gl.constexpr):
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = a_desc.block_type.shape[1]
    a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    spare = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    mbarrier.init(spare, count=1)
    gl.warp_specialize(
        [
            (_consumer, (a_smem, b_smem, ready, empty, spare, c_desc, K, BUG, num_warps)),
            (_loader, (a_desc, b_desc, a_smem, b_smem, ready, empty, K, BUG)),
        ],
        [1],
        [24],
    )


@gluon.jit
def bounds_kernel(x_ptr, out_ptr, n, EXTRA: gl.constexpr, BLOCK: gl.constexpr, WARPS: gl.constexpr):
    """out[i] = 2 x[i] for i < n, through shared memory; EXTRA > 0 reads that many elements past the end,
    EXTRA < 0 indexes a shared stage that does not exist, WARPS is the warp count its layout claims."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    offs = gl.arange(0, BLOCK, layout)
    mask = offs < n + EXTRA if EXTRA > 0 else offs < n
    x = gl.load(x_ptr + offs, mask=mask, other=0.0)
    smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    stage = 2 if EXTRA < 0 else 1
    smem.index(stage).store(x * 2.0)
    gl.store(out_ptr + offs, smem.index(stage).load(layout), mask=offs < n)
