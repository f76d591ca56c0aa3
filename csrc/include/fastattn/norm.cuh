// Layer norm / RMSNorm forward and backward: fp32 statistics (Welford merge across threads), 16-byte vector
// accesses, a warp per row for rows of up to kWarpRowMax(dtype) elements and a block per row above that;
// deterministic weight/bias gradients (per-group partial sums, summed in a fixed order by the caller).
// Framework-free: parameter structs and a stream.
#pragma once

#include <cuda_runtime.h>

#include "common.cuh"

namespace fastattn {

struct NormParams {
  const void* x;        // (rows, n), row stride x_stride elements, unit column stride
  const void* weight;   // (n) or nullptr, dtype w_dtype
  const void* bias;     // (n) or nullptr, dtype w_dtype
  void* y;              // (rows, n), row stride y_stride
  float* mean;          // (rows) fp32, may be nullptr
  float* rstd;          // (rows) fp32, may be nullptr
  int64_t rows;
  int64_t n;
  int64_t x_stride;
  int64_t y_stride;
  float eps;
  DType dtype;
  DType w_dtype;
  bool rms;
};

struct NormBwdParams {
  const void* x;        // (rows, n): what the forward normalized
  const void* weight;   // (n) or nullptr, dtype w_dtype
  const void* dy;       // (rows, n)
  void* dx;             // (rows, n)
  const float* mean;    // (rows) fp32 (ignored for RMSNorm)
  const float* rstd;    // (rows) fp32
  float* dw_partial;    // (groups, n) fp32 or nullptr: group g's sum of dy * xhat over its rows
  float* db_partial;    // (groups, n) fp32 or nullptr: group g's sum of dy
  int64_t rows, n, x_stride, dy_stride, dx_stride;
  int64_t groups;       // see norm_bwd_groups
  DType dtype;
  DType w_dtype;
  bool rms;
};

// Bytes of one vector access and the elements a thread keeps in registers per row in the backward.
constexpr int kNormVecBytes = 16;
constexpr int kNormBwdIters = 4;

FA_HOST_DEVICE inline int64_t norm_vec(DType t) { return t == DType::kFloat32 ? 4 : 8; }

// Threads per row: a warp for short rows, else the whole block of 256.
FA_HOST_DEVICE inline int norm_row_threads(DType t, int64_t n) { return n <= 32 * norm_vec(t) * kNormBwdIters ? 32 : 256; }

// Widest row the backward takes (its partial sums live in registers).
FA_HOST_DEVICE inline int64_t norm_bwd_max_n(DType t) { return 256 * norm_vec(t) * kNormBwdIters; }

// Row groups of the backward: consecutive rows share a group, which owns one row of the partial sums.
// `target` is about the number of groups that fill the GPU (a few per SM).
FA_HOST_DEVICE inline int64_t norm_bwd_groups(int64_t rows, int64_t target) {
  if (rows <= 0) return 1;
  const int64_t per = cdiv(rows, target < 1 ? 1 : target);
  return cdiv(rows, per);
}

cudaError_t norm_forward(const NormParams& p, cudaStream_t stream);
cudaError_t norm_backward(const NormBwdParams& p, cudaStream_t stream);

}  // namespace fastattn
