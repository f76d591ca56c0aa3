// Layer norm / RMSNorm forward on CUDA: one block of 256 threads per row. Statistics are fp32: each thread
// keeps a Welford (count, mean, M2) over its elements, merged across the warp by shuffles and across warps
// through shared memory (the same merge the host test checks). The row is then read again (from L1/L2) to
// write the output. 16-byte vector accesses when the row start, stride and length allow.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "fastattn/norm.cuh"

namespace fastattn {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

__device__ __forceinline__ MeanVar warp_merge(MeanVar a) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    MeanVar b;
    b.count = __shfl_xor_sync(0xffffffffu, a.count, offset);
    b.mean = __shfl_xor_sync(0xffffffffu, a.mean, offset);
    b.m2 = __shfl_xor_sync(0xffffffffu, a.m2, offset);
    a = merge(a, b);
  }
  return a;
}

// Every thread returns the merged statistics of the whole block.
__device__ MeanVar block_merge(MeanVar a) {
  __shared__ MeanVar partial[kThreads / 32];
  a = warp_merge(a);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) partial[warp] = a;
  __syncthreads();
  MeanVar total = lane < kThreads / 32 ? partial[lane] : MeanVar{};
  total = warp_merge(total);
  return total;
}

template <typename T, typename TW, int VEC>
__global__ void __launch_bounds__(kThreads) norm_forward_kernel(NormParams p) {
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
  T* y = static_cast<T*>(p.y) + row * p.y_stride;
  const TW* w = static_cast<const TW*>(p.weight);
  const TW* b = static_cast<const TW*>(p.bias);

  // RMSNorm needs the mean of squares: the same merge with the mean pinned to 0 gives M2 = sum(x^2).
  MeanVar mv;
  for (int64_t c = int64_t(threadIdx.x) * VEC; c < p.n; c += int64_t(kThreads) * VEC) {
    const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(x + c);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float v = to_float(pack.v[i]);
      if (p.rms) {
        mv.count += 1.f;
        mv.m2 += v * v;
      } else {
        mv = push(mv, v);
      }
    }
  }
  if (p.rms) mv.mean = 0.f;
  const MeanVar total = block_merge(mv);
  const float mean = p.rms ? 0.f : total.mean;
  const float rstd = rsqrtf(total.m2 / float(p.n) + p.eps);
  if (threadIdx.x == 0) {
    if (p.mean) p.mean[row] = mean;
    if (p.rstd) p.rstd[row] = rstd;
  }
  for (int64_t c = int64_t(threadIdx.x) * VEC; c < p.n; c += int64_t(kThreads) * VEC) {
    const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(x + c);
    Pack<T, VEC> out;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float v = (to_float(pack.v[i]) - mean) * rstd;
      if (w) v *= to_float(w[c + i]);
      if (b) v += to_float(b[c + i]);
      out.v[i] = from_float<T>(v);
    }
    *reinterpret_cast<Pack<T, VEC>*>(y + c) = out;
  }
}

template <typename T, typename TW>
cudaError_t launch(const NormParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && reinterpret_cast<uintptr_t>(p.y) % 16 == 0 &&
                       p.n % kVec == 0 && p.x_stride % kVec == 0 && p.y_stride % kVec == 0;
  const dim3 grid(static_cast<unsigned>(p.rows)), block(kThreads);
  if (aligned) {
    norm_forward_kernel<T, TW, kVec><<<grid, block, 0, stream>>>(p);
  } else {
    norm_forward_kernel<T, TW, 1><<<grid, block, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t norm_forward(const NormParams& p, cudaStream_t stream) {
  if (p.x == nullptr || p.y == nullptr || p.n <= 0 || p.rows < 0 || p.rows > 0x7fffffff) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  const bool w32 = p.w_dtype == DType::kFloat32;
  switch (p.dtype) {
    case DType::kFloat32:
      return launch<float, float>(p, stream);
    case DType::kFloat16:
      return w32 ? launch<__half, float>(p, stream) : launch<__half, __half>(p, stream);
    case DType::kBFloat16:
      return w32 ? launch<__nv_bfloat16, float>(p, stream) : launch<__nv_bfloat16, __nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fastattn
