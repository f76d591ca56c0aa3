// The CUDA device environment as host C++, for running csrc/ kernels on a machine without a GPU (g++, no
// nvcc). The fake <cuda_runtime.h>, <cuda_fp16.h> and <cuda_bf16.h> next to this file include it, so the
// kernel sources compile unchanged but for three macros of common.cuh (FA_LAUNCH, FA_SHARED_ARRAY,
// FA_DYNAMIC_SHARED) and the host branch of mma.cuh.
//
// What it checks is in runtime.cpp: the threads of a block are fibers that meet at real __syncthreads
// barriers; warp operations gather the lanes their mask names; cp.async lands at the wait_group that covers
// it; shared memory is poisoned per block; every shared and global access of a kernel translation unit is
// seen (the kernel TUs are compiled with GCC's -fsanitize=thread instrumentation, whose __tsan_* hooks
// runtime.cpp defines instead of linking ThreadSanitizer) and checked for bounds, and shared accesses for
// races between two barriers.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <utility>

#define FASTATTN_EMU_NOSAN __attribute__((no_sanitize_thread, noinline))

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorLaunchOutOfResources = 701,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

// fp16 and bf16 as their bits; conversions round to nearest even, as the device's __float2half_rn.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);  // IEEE round to nearest even
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = uint32_t(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return {static_cast<uint16_t>(u >> 16)};
}
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}

inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

namespace fastattn_emu {

// Position of the running CUDA thread (fiber) and its block.
uint3 thread_idx();
uint3 block_idx();
dim3 block_dim();
dim3 grid_dim();

void syncthreads();
enum class Shfl { kIdx, kXor, kDown, kUp };
uint32_t shfl(Shfl kind, uint32_t mask, uint32_t value, int arg, int width, const char* what);
void ldmatrix_x4(uint32_t* out, const void* smem, bool trans);
void mma_m16n8k16(float* d, const uint32_t* a, uint32_t b0, uint32_t b1, bool bf16);
void cp_async16(void* smem, const void* gmem, int src_bytes);
void cp_async_commit();
void cp_async_wait(int n);
float atomic_add(float* addr, float v);
unsigned char* dynamic_shared();
void* static_shared(const void* key, size_t bytes, const char* name);

// Host side.
cudaError_t set_max_dynamic_shared(const void* fn, int bytes);
cudaError_t take_last_error();
void run_grid(const char* kernel, const void* fn, dim3 grid, dim3 block, size_t smem, void (*entry)(void*),
              void* closure);

template <typename F, typename Tuple>
struct Call {
  F fn;
  Tuple args;
  FASTATTN_EMU_NOSAN static void run(void* self) {
    Call* c = static_cast<Call*>(self);
    std::apply(c->fn, c->args);  // copies the arguments onto the fiber's stack, as a launch copies parameters
  }
};

// kernel<<<grid, block, smem, stream>>>(args...) as FA_LAUNCH(grid, block, smem, stream, kernel)(args...).
template <typename F>
struct Launch {
  const char* name;
  F* fn;
  dim3 grid, block;
  size_t smem;
  template <typename... Args>
  void operator()(Args... args) const {
    Call<F*, std::tuple<Args...>> call{fn, std::tuple<Args...>(args...)};
    run_grid(name, reinterpret_cast<const void*>(fn), grid, block, smem, &decltype(call)::run, &call);
  }
};

template <typename F>
Launch<F> launch(const char* name, F* fn, dim3 grid, dim3 block, size_t smem, cudaStream_t) {
  return {name, fn, grid, block, smem};
}

template <typename T>
T bits_to(uint32_t u) {
  static_assert(sizeof(T) <= 4, "the emulated shuffles move 32-bit values (shuffle wider ones in halves)");
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}
template <typename T>
uint32_t to_bits(T v) {
  static_assert(sizeof(T) <= 4, "the emulated shuffles move 32-bit values (shuffle wider ones in halves)");
  uint32_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

}  // namespace fastattn_emu

#define threadIdx (::fastattn_emu::thread_idx())
#define blockIdx (::fastattn_emu::block_idx())
#define blockDim (::fastattn_emu::block_dim())
#define gridDim (::fastattn_emu::grid_dim())

inline void __syncthreads() { fastattn_emu::syncthreads(); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return fastattn_emu::bits_to<T>(fastattn_emu::shfl(fastattn_emu::Shfl::kXor, mask, fastattn_emu::to_bits(v),
                                                     lane_mask, width, "__shfl_xor_sync"));
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return fastattn_emu::bits_to<T>(
      fastattn_emu::shfl(fastattn_emu::Shfl::kIdx, mask, fastattn_emu::to_bits(v), src, width, "__shfl_sync"));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return fastattn_emu::bits_to<T>(fastattn_emu::shfl(fastattn_emu::Shfl::kDown, mask, fastattn_emu::to_bits(v),
                                                     int(delta), width, "__shfl_down_sync"));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return fastattn_emu::bits_to<T>(fastattn_emu::shfl(fastattn_emu::Shfl::kUp, mask, fastattn_emu::to_bits(v),
                                                     int(delta), width, "__shfl_up_sync"));
}

inline float atomicAdd(float* addr, float v) { return fastattn_emu::atomic_add(addr, v); }

template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* fn, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return fastattn_emu::set_max_dynamic_shared(reinterpret_cast<const void*>(fn), value);
}
inline cudaError_t cudaGetLastError() { return fastattn_emu::take_last_error(); }
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaRuntimeGetVersion(int* version);
