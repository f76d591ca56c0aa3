// Device building blocks of the attention kernels: cp.async tile loads into padded shared memory, and a
// warp's 16-row tile GEMM on mma.sync with its operands read by ldmatrix (lane maps in attention.cuh).
#pragma once

#include "attention.cuh"
#include "dtype.cuh"
#include "mma.cuh"

namespace fastattn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Rows [0, ROWS) of a (rows, D) tile into shared memory (row stride padded(D)); rows at or past `valid`
// are zero-filled without being read. THREADS threads take part; each 16-byte chunk is one cp.async.
template <typename T, int ROWS, int D, int THREADS>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int64_t row_stride, int64_t valid) {
  constexpr int kChunks = D / 8;
  for (int idx = threadIdx.x; idx < ROWS * kChunks; idx += THREADS) {
    const int r = idx / kChunks, c = (idx % kChunks) * 8;
    const bool ok = r < valid;
    cp_async16(smem + r * padded(D) + c, ok ? g + r * row_stride + c : g, ok);
  }
}

enum class AFrom { kRegs, kSmem, kSmemTrans };  // A from registers, [m][k] storage, or [k][m] storage
enum class BFrom { kNK, kKN };                  // B from [n][k] storage (ldmatrix) or [k][n] (ldmatrix.trans)

// acc (16 x 8*NT, fp32 fragments) += A (16 x 16*K16) * B (16*K16 x 8*NT), on one warp. A comes as
// registers `a_regs[K16][4]` or from shared memory `a` (row stride lda); B from shared memory `b` (ldb).
// Operands in shared memory are read one k-step at a time to keep registers for the accumulators.
// One k16 step of warp_mma with the A fragment in hand.
template <typename T, int NT, BFrom B_FROM>
__device__ __forceinline__ void warp_mma_step(float (&acc)[NT][4], const uint32_t (&af)[4], const T* b, int ldb,
                                              int kk, int lane) {
  static_assert(NT % 2 == 0, "B is read two n8 tiles at a time");
#pragma unroll
  for (int np = 0; np < NT / 2; ++np) {
    uint32_t bf[4];
    if constexpr (B_FROM == BFrom::kNK) {
      ldsm_x4(bf, b + b_offset(false, lane, kk, np, ldb));
    } else {
      ldsm_x4_trans(bf, b + b_offset(true, lane, kk, np, ldb));
    }
    mma16816<T>(acc[2 * np], af, bf[0], bf[1]);
    mma16816<T>(acc[2 * np + 1], af, bf[2], bf[3]);
  }
}

// acc (16 x 8*NT, fp32 fragments) += A (16 x 16*K16) * B (16*K16 x 8*NT), on one warp. A comes as
// registers `a_regs[K16][4]` or from shared memory `a` (row stride lda); B from shared memory `b` (ldb).
// Operands in shared memory are read one k-step at a time, and that loop is unrolled only by two, to keep
// registers for the accumulators (the backward at head dim 128 is at the 255-register limit).
template <typename T, int K16, int NT, AFrom A_FROM, BFrom B_FROM>
__device__ __forceinline__ void warp_mma(float (&acc)[NT][4], const uint32_t (*a_regs)[4], const T* a, int lda,
                                         const T* b, int ldb) {
  const int lane = threadIdx.x & 31;
  if constexpr (A_FROM == AFrom::kRegs) {
#pragma unroll
    for (int kk = 0; kk < K16; ++kk) warp_mma_step<T, NT, B_FROM>(acc, a_regs[kk], b, ldb, kk, lane);
  } else {
#pragma unroll 2
    for (int kk = 0; kk < K16; ++kk) {
      uint32_t af[4];
      if constexpr (A_FROM == AFrom::kSmem) {
        ldsm_x4(af, a + a_offset(false, lane, kk, lda));
      } else {
        ldsm_x4_trans(af, a + a_offset(true, lane, kk, lda));
      }
      warp_mma_step<T, NT, B_FROM>(acc, af, b, ldb, kk, lane);
    }
  }
}

template <typename T, int NT>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[NT / 2][4], const float (&acc)[NT][4]) {
  acc_to_a_with<NT>(a, acc, [](float lo, float hi) { return pack2<T>(lo, hi); });
}

template <typename T>
__device__ __forceinline__ const T* head_ptr(const void* base, const Strides3& s, int64_t z, int64_t h) {
  return static_cast<const T*>(base) + z * s.batch + h * s.head;
}

// Key limit of batch z: S, or fewer with per-batch key lengths.
__device__ __forceinline__ int64_t key_limit(const AttentionParams& p, int z) {
  int64_t limit = p.s;
  if (p.seqlens_k != nullptr) {
    const int64_t n = p.seqlens_k[z];
    limit = n < 0 ? 0 : (n < limit ? n : limit);
  }
  return limit;
}

// Whether score (i, j) of batch z takes part (every rule but the tile-level ones already applied).
__device__ __forceinline__ bool takes_part(const AttentionParams& p, int z, int64_t limit, int64_t i, int64_t j) {
  return j < limit && visible(p.vis, i, j) && (p.key_mask == nullptr || p.key_mask[z * p.key_mask_stride + j]);
}

// Dropout keep bits of a warp's accumulator tile (16 rows x 8*NT columns at row0, col0; bit nt*4+e is element
// e of n8 tile nt), rows and columns swapped when TRANSPOSED (the backward's key-major tiles). A rolled loop
// that only sets bits: unrolled, the Philox rounds of every element would be in flight at once and spill.
template <int NT, bool TRANSPOSED>
__device__ __forceinline__ uint32_t dropout_bits(const AttentionParams& p, int bh, int64_t row0, int64_t col0) {
  static_assert(NT * 4 <= 32, "one bit per element of the thread's fragments");
  const int lane = threadIdx.x & 31;
  uint32_t bits = 0;
#pragma unroll 1
  for (int idx = 0; idx < NT * 4; ++idx) {
    const int64_t r = row0 + acc_row(lane, idx & 3), c = col0 + acc_col(lane, idx >> 2, idx & 3);
    const uint32_t i = static_cast<uint32_t>(TRANSPOSED ? c : r), j = static_cast<uint32_t>(TRANSPOSED ? r : c);
    bits |= uint32_t(dropout_keep(p.seed, p.philox_offset, static_cast<uint32_t>(bh), i, j, p.dropout_p)) << idx;
  }
  return bits;
}

}  // namespace fastattn
