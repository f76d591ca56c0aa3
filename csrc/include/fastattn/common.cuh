// Shared helpers of the CUDA kernels. Nothing here knows PyTorch: kernels take plain parameter structs.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FA_HOST_DEVICE __host__ __device__
#define FA_UNROLL _Pragma("unroll")
#else
#define FA_HOST_DEVICE
#define FA_UNROLL
#endif

// The three spellings that differ between nvcc and the host emulation (csrc/emulate): a kernel launch
// `FA_LAUNCH(grid, block, smem, stream, kernel)(args...)`, a static shared array, and the dynamic shared
// bytes of the launch. In the emulation shared memory is the emulator's, so that it can check every access.
#if defined(FASTATTN_HOST_EMULATION)
#define FA_LAUNCH(grid, block, smem, stream, ...) \
  ::fastattn_emu::launch(#__VA_ARGS__, __VA_ARGS__, grid, block, smem, stream)
#define FA_SHARED_ARRAY(T, name, n) \
  static const char name##_key = 0;  \
  T* const name = static_cast<T*>(::fastattn_emu::static_shared(&name##_key, sizeof(T) * (n), #name))
#define FA_DYNAMIC_SHARED(name) unsigned char* const name = ::fastattn_emu::dynamic_shared()
#else
#define FA_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define FA_SHARED_ARRAY(T, name, n) __shared__ T name[n]
#define FA_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace fastattn {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

FA_HOST_DEVICE inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Philox4x32-10 with the constants and key schedule of Triton's tl.philox (seed split into a low and a high
// 32-bit key), so that the CUDA kernels draw the same dropout bits as the Triton ones for the same seed.
struct Philox4 {
  uint32_t c0, c1, c2, c3;
};

FA_HOST_DEVICE inline uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

FA_HOST_DEVICE inline Philox4 philox(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = mulhi32(0xCD9E8D57u, a2) ^ c1 ^ k0;
    c2 = mulhi32(0xD2511F53u, a0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * a2;
    c3 = 0xD2511F53u * a0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {c0, c1, c2, c3};
}

// Triton's uint_to_uniform_float for 32 bits: the bits as int32, folded to >= 0, times (2^31 - 1)^-1 rounded.
FA_HOST_DEVICE inline float uniform_float(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? -x - 1 : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// Dropout keep-mask of score (i, j) of head bh: counters (j, i, bh, offset), as fastattn's Triton kernels.
FA_HOST_DEVICE inline bool dropout_keep(uint64_t seed, uint32_t offset, uint32_t bh, uint32_t i, uint32_t j, float p) {
  return uniform_float(philox(seed, j, i, bh, offset).c0) >= p;
}

// sin and cos of angle = pos * freq, formed in fp64 and reduced there to r in [-pi/4, pi/4] plus a quadrant,
// then fp32 series: exact to a few fp32 ulp at any position, without the slow path of sin/cos on large
// arguments. The same arithmetic as the Triton kernels' _sincos.
FA_HOST_DEVICE inline void sincos_reduced(double pos, double freq, float* sin_out, float* cos_out) {
  const double a = pos * freq;
  const double k = floor(a * 0.6366197723675814 + 0.5);
  const float r = static_cast<float>(a - k * 1.5707963267341256 - k * 6.077100506506192e-11);
  const int64_t kk = static_cast<int64_t>(k);
  const int quadrant = static_cast<int>(((kk % 4) + 4) % 4);
  const float r2 = r * r;
  const float s = r * (1.f + r2 * (-1.f / 6 + r2 * (1.f / 120 + r2 * (-1.f / 5040 + r2 * (1.f / 362880)))));
  const float c = 1.f + r2 * (-0.5f + r2 * (1.f / 24 + r2 * (-1.f / 720 + r2 * (1.f / 40320 + r2 * (-1.f / 3628800)))));
  *sin_out = quadrant == 0 ? s : quadrant == 1 ? c : quadrant == 2 ? -s : -c;
  *cos_out = quadrant == 0 ? c : quadrant == 1 ? -s : quadrant == 2 ? -c : s;
}

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
