// Positional encodings on CUDA: a thread per (row, pair of columns), since both columns of a pair share
// one angle; the angle in fp64, its sine and cosine by the reduced series of common.cuh.
#include "fastattn/dtype.cuh"
#include "fastattn/posenc.cuh"

namespace fastattn {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) sinusoidal_kernel(SinusoidalParams p) {
  const int64_t pairs = (p.d + 1) / 2;
  const int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= p.rows * pairs) return;
  const int64_t r = idx / pairs, i = idx % pairs;
  float s, c;
  sincos_reduced(static_cast<double>(p.offset + r % p.l), p.freq[i], &s, &c);
  const T* x = static_cast<const T*>(p.x) + r * p.x_stride + 2 * i;
  T* y = static_cast<T*>(p.y) + r * p.y_stride + 2 * i;
  y[0] = from_float<T>(to_float(x[0]) * p.scale + s);
  if (2 * i + 1 < p.d) y[1] = from_float<T>(to_float(x[1]) * p.scale + c);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) rotary_kernel(RotaryParams p) {
  const int64_t half = p.rot / 2, items = half + (p.e - p.rot);  // pairs, then the columns passed through
  const int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= p.rows * items) return;
  const int64_t r = idx / items, j = idx % items;
  const T* x = static_cast<const T*>(p.x) + r * p.x_stride;
  T* y = static_cast<T*>(p.y) + r * p.y_stride;
  if (j >= half) {
    const int64_t c = p.rot + (j - half);
    y[c] = x[c];
    return;
  }
  const int64_t l = r % p.l;
  const int64_t pos = p.pos ? p.pos[(r / (p.h * p.l)) * p.pos_stride + l] : p.offset + l;
  float s, c;
  sincos_reduced(static_cast<double>(pos), p.freq[j], &s, &c);
  s *= p.sign;
  const int64_t c1 = p.interleaved ? 2 * j : j, c2 = p.interleaved ? 2 * j + 1 : j + half;
  const float x1 = to_float(x[c1]), x2 = to_float(x[c2]);
  y[c1] = from_float<T>(x1 * c - x2 * s);
  y[c2] = from_float<T>(x2 * c + x1 * s);
}

template <template <typename> class Launch, typename Params>
cudaError_t by_dtype(const Params& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32:
      return Launch<float>::run(p, stream);
    case DType::kFloat16:
      return Launch<__half>::run(p, stream);
    case DType::kBFloat16:
      return Launch<__nv_bfloat16>::run(p, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
struct LaunchSinusoidal {
  static cudaError_t run(const SinusoidalParams& p, cudaStream_t stream) {
    const int64_t n = p.rows * ((p.d + 1) / 2);
    FA_LAUNCH(static_cast<unsigned>(cdiv(n, kThreads)), kThreads, 0, stream, sinusoidal_kernel<T>)(p);
    return cudaGetLastError();
  }
};

template <typename T>
struct LaunchRotary {
  static cudaError_t run(const RotaryParams& p, cudaStream_t stream) {
    const int64_t n = p.rows * (p.rot / 2 + p.e - p.rot);
    FA_LAUNCH(static_cast<unsigned>(cdiv(n, kThreads)), kThreads, 0, stream, rotary_kernel<T>)(p);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t sinusoidal_forward(const SinusoidalParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.l <= 0 || p.d <= 0) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;  // before the pointer checks: empty tensors may have null data
  if (!p.x || !p.y || !p.freq || cdiv(p.rows * ((p.d + 1) / 2), kThreads) > 0x7fffffff) return cudaErrorInvalidValue;
  return by_dtype<LaunchSinusoidal>(p, stream);
}

cudaError_t rotary_forward(const RotaryParams& p, cudaStream_t stream) {
  if (p.rows < 0 || p.h <= 0 || p.l <= 0 || p.rot < 2 || p.rot % 2 || p.rot > p.e) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;  // before the pointer checks: empty tensors may have null data
  if (!p.x || !p.y || !p.freq || cdiv(p.rows * (p.rot / 2 + p.e - p.rot), kThreads) > 0x7fffffff)
    return cudaErrorInvalidValue;
  return by_dtype<LaunchRotary>(p, stream);
}

}  // namespace fastattn
