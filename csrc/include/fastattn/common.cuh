// Shared helpers of the CUDA kernels. Nothing here knows PyTorch: kernels take plain parameter structs.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FA_HOST_DEVICE __host__ __device__
#else
#define FA_HOST_DEVICE
#endif

namespace fastattn {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

FA_HOST_DEVICE inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Welford/Chan merge of two partial (count, mean, M2) statistics: the row reduction of layer norm, written
// once so that the host test checks the same arithmetic the kernel runs.
struct MeanVar {
  float count = 0.f;
  float mean = 0.f;
  float m2 = 0.f;
};

FA_HOST_DEVICE inline MeanVar merge(MeanVar a, MeanVar b) {
  const float n = a.count + b.count;
  if (n == 0.f) return a;
  const float delta = b.mean - a.mean;
  MeanVar out;
  out.count = n;
  out.mean = a.mean + delta * (b.count / n);
  out.m2 = a.m2 + b.m2 + delta * delta * (a.count * b.count / n);
  return out;
}

FA_HOST_DEVICE inline MeanVar push(MeanVar a, float x) {
  MeanVar one;
  one.count = 1.f;
  one.mean = x;
  return merge(a, one);
}

}  // namespace fastattn
