// Flash attention (FlashAttention-2 algorithm) on tensor cores with mma.sync: parameter structs, launchers,
// and the index logic of the kernels as __host__ __device__ functions, so that host tests check it.
#pragma once

#include <cuda_runtime.h>

#include "common.cuh"

namespace fastattn {

// Tensors are (Z, heads, rows, D) with a unit last stride; strides are in elements, for (batch, head, row).
struct Strides3 {
  int64_t batch, head, row;
};

// Which scores take part (the rule of the Triton kernels): query i sees key j iff
// i + offset - left <= j (when has_left), j <= i + offset + right (when has_right), j < the batch's key
// limit (S, or seqlens_k[z] when given), and key_mask[z, j] (when given).
struct Visibility {
  int64_t offset = 0, left = 0, right = 0;
  bool has_left = false, has_right = false;
};

struct AttentionParams {
  const void* q;  // (Z, H, L, D)
  const void* k;  // (Z, HK, S, D), H % HK == 0 (grouped-query attention)
  const void* v;  // (Z, HK, S, D)
  void* o;        // (Z, H, L, D)
  float* lse;     // (Z, H, L) contiguous, natural log; -inf on rows that see no key
  Strides3 q_stride, k_stride, v_stride, o_stride;
  int z, h, hk, l, s, d;
  float scale;
  Visibility vis;
  const int32_t* seqlens_k;  // (Z) or nullptr
  const bool* key_mask;      // (Z, S) with row stride key_mask_stride, true = take part; or nullptr
  int64_t key_mask_stride;
  float dropout_p;
  uint64_t seed;
  uint32_t philox_offset;
  DType dtype;  // kFloat16 or kBFloat16
};

struct AttentionBwdParams {
  AttentionParams fwd;  // q, k, v, o, lse as saved by the forward
  const void* dout;     // (Z, H, L, D)
  Strides3 do_stride;
  float* delta;     // (Z, H, L) fp32 workspace: rowsum(dO * O)
  float* dq_accum;  // (Z, H, L, D) contiguous fp32, zeroed by the caller
  void* dq;         // (Z, H, L, D)
  void* dk;         // (Z, HK, S, D)
  void* dv;         // (Z, HK, S, D)
  Strides3 dq_stride, dk_stride, dv_stride;
};

// Check the parameters, then launch; cudaErrorInvalidValue for what the kernels do not take (head dims other
// than 64 and 128, fp32, misaligned rows), else the launch's error.
cudaError_t attention_forward(const AttentionParams& p, cudaStream_t stream);
cudaError_t attention_backward(const AttentionBwdParams& p, cudaStream_t stream);

inline bool strides_aligned(const Strides3& s) { return s.batch % 8 == 0 && s.head % 8 == 0 && s.row % 8 == 0; }

// What the kernels take: 16-bit data, head dim 64 or 128, rows of 16-byte aligned 16-byte chunks, a positive
// scale, H a multiple of HK, and Z * H within a grid dimension.
inline cudaError_t check_attention_params(const AttentionParams& p) {
  if (!p.q || !p.k || !p.v || !p.o || !p.lse) return cudaErrorInvalidValue;
  if ((p.d != 64 && p.d != 128) || (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16))
    return cudaErrorInvalidValue;
  if (p.z < 0 || p.h <= 0 || p.hk <= 0 || p.h % p.hk != 0 || p.l < 0 || p.s < 0) return cudaErrorInvalidValue;
  if (int64_t(p.z) * p.h > 65535 || cdiv(p.l, 64) > 0x7fffffff) return cudaErrorInvalidValue;
  if (!(p.scale > 0.f) || !(p.dropout_p >= 0.f && p.dropout_p < 1.f) || p.key_mask_stride < 0)
    return cudaErrorInvalidValue;
  for (const Strides3* s : {&p.q_stride, &p.k_stride, &p.v_stride, &p.o_stride})
    if (!strides_aligned(*s)) return cudaErrorInvalidValue;
  for (const void* ptr : {p.q, p.k, p.v, static_cast<const void*>(p.o)})
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return cudaErrorInvalidValue;
  return cudaSuccess;
}

FA_HOST_DEVICE inline bool visible(const Visibility& v, int64_t i, int64_t j) {
  return (!v.has_left || j >= i + v.offset - v.left) && (!v.has_right || j <= i + v.offset + v.right);
}

struct Range {
  int64_t lo, hi;  // [lo, hi), lo rounded down to a tile start; empty when hi <= lo
};

// Keys (rounded out to tiles of `tile`) seen by any query in [i0, i0 + rows), below `limit`.
FA_HOST_DEVICE inline Range key_range(const Visibility& v, int64_t i0, int64_t rows, int64_t limit, int64_t tile) {
  int64_t lo = v.has_left ? i0 + v.offset - v.left : 0;
  int64_t hi = v.has_right ? i0 + rows - 1 + v.offset + v.right + 1 : limit;
  lo = lo < 0 ? 0 : lo;
  hi = hi > limit ? limit : hi;
  return {lo / tile * tile, hi};
}

// Queries (rounded out to tiles of `tile`) that see any key in [j0, j0 + cols), below `rows_total`.
FA_HOST_DEVICE inline Range query_range(const Visibility& v, int64_t j0, int64_t cols, int64_t rows_total,
                                        int64_t tile) {
  int64_t lo = v.has_right ? j0 - v.offset - v.right : 0;
  int64_t hi = v.has_left ? j0 + cols - 1 - v.offset + v.left + 1 : rows_total;
  lo = lo < 0 ? 0 : lo;
  hi = hi > rows_total ? rows_total : hi;
  return {lo / tile * tile, hi};
}

// Whether every (i, j) of the block [i0, i0 + rows) x [j0, j0 + cols) takes part, so that the kernel can
// skip the element mask there (only the edge tiles of a causal or windowed pattern need it).
FA_HOST_DEVICE inline bool block_fully_visible(const Visibility& v, int64_t i0, int64_t rows, int64_t j0,
                                               int64_t cols, int64_t rows_total, int64_t limit) {
  if (i0 + rows > rows_total || j0 + cols > limit) return false;
  if (v.has_left && j0 < i0 + rows - 1 + v.offset - v.left) return false;
  if (v.has_right && j0 + cols - 1 > i0 + v.offset + v.right) return false;
  return true;
}

// One step of the online softmax of a row, in the log2 domain: the running max m meets a tile's max.
// `shift` is what the tile's scores are lowered by before exp2 (0 while the row has seen only masked
// scores, so that exp2(-inf - shift) gives 0 rather than NaN), `alpha` rescales the running sum and output.
struct SoftmaxStep {
  float m, shift, alpha;
};

FA_HOST_DEVICE inline SoftmaxStep softmax_step(float m_old, float tile_max) {
  const float m = m_old > tile_max ? m_old : tile_max;
  const float shift = m == -INFINITY ? 0.f : m;
  return {m, shift, exp2f(m_old - shift)};
}

// Lane -> shared-memory address maps of ldmatrix.x4. Map A gives the four 8x8 matrices at (row, col)
// offsets (0, 0), (8, 0), (0, 8), (8, 8): an m16k16 A operand read row-major, or a k16n16 B operand
// (two n8 tiles) read with .trans from [k][n] storage. Map B gives (0, 0), (0, 8), (8, 0), (8, 8): two
// n8k16 B operands from [n][k] storage, or an m16k16 A operand read with .trans from [k][m] storage.
FA_HOST_DEVICE inline int ldsm_row_a(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
FA_HOST_DEVICE inline int ldsm_col_a(int lane) { return (lane >> 4) * 8; }
FA_HOST_DEVICE inline int ldsm_row_b(int lane) { return (lane & 7) + (lane >> 4) * 8; }
FA_HOST_DEVICE inline int ldsm_col_b(int lane) { return ((lane >> 3) & 1) * 8; }

// Element offsets (from the operand's base) that lane `lane` hands to ldmatrix.x4 at k-step kk: the A
// operand from [m][k] storage (ldmatrix) or [k][m] storage (.trans); the B operand's n16 block np from
// [n][k] storage (ldmatrix) or [k][n] storage (.trans).
FA_HOST_DEVICE inline int a_offset(bool km_storage, int lane, int kk, int lda) {
  return km_storage ? (kk * 16 + ldsm_row_b(lane)) * lda + ldsm_col_b(lane)
                    : ldsm_row_a(lane) * lda + kk * 16 + ldsm_col_a(lane);
}
FA_HOST_DEVICE inline int b_offset(bool kn_storage, int lane, int kk, int np, int ldb) {
  return kn_storage ? (kk * 16 + ldsm_row_a(lane)) * ldb + np * 16 + ldsm_col_a(lane)
                    : (np * 16 + ldsm_row_b(lane)) * ldb + kk * 16 + ldsm_col_b(lane);
}

// Position of A-operand register `reg` (0..3, two 16-bit values from column a_col on) at k-step kk.
FA_HOST_DEVICE inline int a_row(int lane, int reg) { return (lane >> 2) + (reg & 1) * 8; }
FA_HOST_DEVICE inline int a_col(int lane, int kk, int reg) { return kk * 16 + (lane & 3) * 2 + (reg >> 1) * 8; }

// The A operand (16 x 16*NT/2) from fp32 accumulator fragments (16 x 8*NT): an n8 tile pair of the
// accumulator is one k16 step of the operand (FlashAttention-2's register reuse of P). `pack` makes one
// register of two values (the first in the low half).
template <int NT, typename R, typename Pack>
FA_HOST_DEVICE inline void acc_to_a_with(R (&a)[NT / 2][4], const float (&acc)[NT][4], Pack pack) {
  FA_UNROLL
  for (int kk = 0; kk < NT / 2; ++kk) {
    a[kk][0] = pack(acc[2 * kk][0], acc[2 * kk][1]);
    a[kk][1] = pack(acc[2 * kk][2], acc[2 * kk][3]);
    a[kk][2] = pack(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
    a[kk][3] = pack(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
  }
}

// Position of accumulator element e (0..3) of n8 tile nt in a warp's 16-row mma result, for lane `lane`.
FA_HOST_DEVICE inline int acc_row(int lane, int e) { return (lane >> 2) + (e >> 1) * 8; }
FA_HOST_DEVICE inline int acc_col(int lane, int nt, int e) { return nt * 8 + (lane & 3) * 2 + (e & 1); }

// Shared-memory tiles of 16-bit elements are row-major with rows padded by 8 elements (16 bytes): eight
// consecutive rows then start in eight different 16-byte bank groups, so ldmatrix runs without conflicts.
FA_HOST_DEVICE constexpr int padded(int cols) { return cols + 8; }

}  // namespace fastattn
