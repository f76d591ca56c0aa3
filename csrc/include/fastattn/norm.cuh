// Layer norm / RMSNorm forward: one block per row, 16-byte vector loads, fp32 statistics (Welford merge
// across threads), output in the input dtype. Framework-free: a parameter struct and a stream.
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

// Checks the parameters, then launches; returns cudaErrorInvalidValue for bad parameters and the launch's
// error otherwise. Rows must be 16-byte aligned for the vector path; other rows take the scalar path.
cudaError_t norm_forward(const NormParams& p, cudaStream_t stream);

}  // namespace fastattn
