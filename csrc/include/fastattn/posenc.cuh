// Positional encodings: the sinusoidal table added on the fly, and rotary embeddings (forward; the backward
// is the rotation by the opposite angle). Angles pos * freq are formed in fp64 (sincos_reduced in common.cuh),
// as in the Triton kernels. Framework-free: parameter structs and a stream.
#pragma once

#include <cuda_runtime.h>

#include "common.cuh"

namespace fastattn {

struct SinusoidalParams {
  const void* x;       // (rows, d), row stride x_stride; row r is position offset + r % l
  void* y;             // (rows, d), row stride y_stride
  const double* freq;  // (ceil(d / 2)) base^(-2i/d)
  int64_t rows, l, d, x_stride, y_stride, offset;
  float scale;         // y = x * scale + PE
  DType dtype;
};

struct RotaryParams {
  const void* x;        // (rows = N*H*L, e), row stride x_stride
  void* y;              // (rows, e), row stride y_stride
  const int64_t* pos;   // (N or 1, L) positions with row stride pos_stride (0: shared), or nullptr
  const double* freq;   // (rot / 2) base^(-2j/rot)
  int64_t rows, h, l, e, rot, x_stride, y_stride, pos_stride, offset;  // without pos: position offset + l
  float sign;           // +1 forward, -1 the inverse rotation
  bool interleaved;     // GPT-J pairs (2j, 2j+1); else GPT-NeoX pairs (j, j + rot/2)
  DType dtype;
};

cudaError_t sinusoidal_forward(const SinusoidalParams& p, cudaStream_t stream);
cudaError_t rotary_forward(const RotaryParams& p, cudaStream_t stream);

}  // namespace fastattn
