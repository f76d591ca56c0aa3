// Layer norm / RMSNorm on CUDA. A row is handled by ROW_THREADS threads: one warp (short rows, 8 rows per
// block of 256) or the whole block (long rows). Statistics are fp32: each thread keeps a Welford (count,
// mean, M2) over its elements, merged across the warp by shuffles and across warps through shared memory
// (the merge the host test checks). The backward keeps its rows' partial dw/db sums in registers and writes
// one partial row per group of rows: no atomics, so the gradients are the same from run to run.
#include "fastattn/dtype.cuh"
#include "fastattn/norm.cuh"

namespace fastattn {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ MeanVar warp_merge(MeanVar a) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    MeanVar b;
    b.count = __shfl_xor_sync(0xffffffffu, a.count, offset);
    b.mean = __shfl_xor_sync(0xffffffffu, a.mean, offset);
    b.m2 = __shfl_xor_sync(0xffffffffu, a.m2, offset);
    a = merge(a, b);
  }
  // merge(a, b) and merge(b, a) may round differently: every lane takes lane 0's result, so that the whole
  // row normalizes with the statistics that are stored.
  a.count = __shfl_sync(0xffffffffu, a.count, 0);
  a.mean = __shfl_sync(0xffffffffu, a.mean, 0);
  a.m2 = __shfl_sync(0xffffffffu, a.m2, 0);
  return a;
}

__device__ __forceinline__ float2 warp_sum(float2 a) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    a.x += __shfl_xor_sync(0xffffffffu, a.x, offset);
    a.y += __shfl_xor_sync(0xffffffffu, a.y, offset);
  }
  return a;
}

// Every thread of the row returns the statistics of the whole row.
template <int ROW_THREADS>
__device__ MeanVar row_merge(MeanVar a) {
  a = warp_merge(a);
  if constexpr (ROW_THREADS == 32) {
    return a;
  } else {
    FA_SHARED_ARRAY(MeanVar, partial, kThreads / 32);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) partial[warp] = a;
    __syncthreads();
    return warp_merge(lane < kThreads / 32 ? partial[lane] : MeanVar{});
  }
}

// Sums over the row, in the same order on every thread; callable once per row in a loop.
template <int ROW_THREADS>
__device__ float2 row_sum(float2 a) {
  a = warp_sum(a);
  if constexpr (ROW_THREADS == 32) {
    return a;
  } else {
    FA_SHARED_ARRAY(float2, partial, kThreads / 32);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = a;
    __syncthreads();
    float2 total = make_float2(0.f, 0.f);
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) total = make_float2(total.x + partial[w].x, total.y + partial[w].y);
    __syncthreads();  // the next row's call overwrites the partials
    return total;
  }
}

template <typename T, typename TW, int VEC, int ROW_THREADS>
__global__ void __launch_bounds__(kThreads) norm_forward_kernel(NormParams p) {
  const int64_t row = int64_t(blockIdx.x) * (kThreads / ROW_THREADS) + threadIdx.x / ROW_THREADS;
  const int tid = threadIdx.x % ROW_THREADS;
  if (ROW_THREADS == 32 && row >= p.rows) return;  // whole warps leave; block rows are never out of range
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
  T* y = static_cast<T*>(p.y) + row * p.y_stride;
  const TW* w = static_cast<const TW*>(p.weight);
  const TW* b = static_cast<const TW*>(p.bias);

  // RMSNorm needs the mean of squares: the same merge with the mean pinned to 0 gives M2 = sum(x^2).
  MeanVar mv;
  for (int64_t c = int64_t(tid) * VEC; c < p.n; c += int64_t(ROW_THREADS) * VEC) {
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
  const MeanVar total = row_merge<ROW_THREADS>(mv);
  const float mean = p.rms ? 0.f : total.mean;
  const float rstd = rsqrtf(total.m2 / float(p.n) + p.eps);
  if (tid == 0) {
    if (p.mean) p.mean[row] = mean;
    if (p.rstd) p.rstd[row] = rstd;
  }
  for (int64_t c = int64_t(tid) * VEC; c < p.n; c += int64_t(ROW_THREADS) * VEC) {
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

// dx = rstd * (w*dy - xhat * mean(xhat * w*dy) - mean(w*dy)) (layer norm; RMSNorm drops the last term).
template <typename T, typename TW, int ROW_THREADS>
__global__ void __launch_bounds__(kThreads) norm_backward_kernel(NormBwdParams p) {
  constexpr int VEC = kNormVecBytes / sizeof(T), ITERS = kNormBwdIters;
  const int64_t group = int64_t(blockIdx.x) * (kThreads / ROW_THREADS) + threadIdx.x / ROW_THREADS;
  const int tid = threadIdx.x % ROW_THREADS;
  if (ROW_THREADS == 32 && group >= p.groups) return;
  const int64_t per = cdiv(p.rows, p.groups), r_begin = group * per;
  const int64_t r_end = r_begin + per < p.rows ? r_begin + per : p.rows;
  const TW* w = static_cast<const TW*>(p.weight);
  const float inv_n = 1.f / float(p.n);

  float dw[ITERS][VEC] = {}, db[ITERS][VEC] = {};
  for (int64_t row = r_begin; row < r_end; ++row) {
    const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
    const T* dy = static_cast<const T*>(p.dy) + row * p.dy_stride;
    const float mean = p.rms ? 0.f : p.mean[row], rstd = p.rstd[row];
    float xhat[ITERS][VEC], wdy[ITERS][VEC];
    float2 sums = make_float2(0.f, 0.f);
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t c = (int64_t(it) * ROW_THREADS + tid) * VEC;
      if (c >= p.n) continue;
      const Pack<T, VEC> xp = *reinterpret_cast<const Pack<T, VEC>*>(x + c);
      const Pack<T, VEC> gp = *reinterpret_cast<const Pack<T, VEC>*>(dy + c);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const float g = to_float(gp.v[v]);
        xhat[it][v] = (to_float(xp.v[v]) - mean) * rstd;
        wdy[it][v] = w ? g * to_float(w[c + v]) : g;
        sums.x += xhat[it][v] * wdy[it][v];
        sums.y += wdy[it][v];
        dw[it][v] += g * xhat[it][v];
        db[it][v] += g;
      }
    }
    sums = row_sum<ROW_THREADS>(sums);
    const float c1 = sums.x * inv_n, c2 = p.rms ? 0.f : sums.y * inv_n;
    T* dx = static_cast<T*>(p.dx) + row * p.dx_stride;
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int64_t c = (int64_t(it) * ROW_THREADS + tid) * VEC;
      if (c >= p.n) continue;
      Pack<T, VEC> out;
#pragma unroll
      for (int v = 0; v < VEC; ++v) out.v[v] = from_float<T>((wdy[it][v] - xhat[it][v] * c1 - c2) * rstd);
      *reinterpret_cast<Pack<T, VEC>*>(dx + c) = out;
    }
  }
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {
    const int64_t c = (int64_t(it) * ROW_THREADS + tid) * VEC;
    if (c >= p.n) continue;
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      if (p.dw_partial) p.dw_partial[group * p.n + c + v] = dw[it][v];
      if (p.db_partial) p.db_partial[group * p.n + c + v] = db[it][v];
    }
  }
}

template <typename T, typename TW>
cudaError_t launch_forward(const NormParams& p, cudaStream_t stream) {
  constexpr int kVec = kNormVecBytes / sizeof(T);
  const bool aligned = reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && reinterpret_cast<uintptr_t>(p.y) % 16 == 0 &&
                       p.n % kVec == 0 && p.x_stride % kVec == 0 && p.y_stride % kVec == 0;
  if (norm_row_threads(p.dtype, p.n) == 32) {
    const unsigned grid = static_cast<unsigned>(cdiv(p.rows, kThreads / 32));
    if (aligned) {
      FA_LAUNCH(grid, kThreads, 0, stream, norm_forward_kernel<T, TW, kVec, 32>)(p);
    } else {
      FA_LAUNCH(grid, kThreads, 0, stream, norm_forward_kernel<T, TW, 1, 32>)(p);
    }
  } else {
    const unsigned grid = static_cast<unsigned>(p.rows);
    if (aligned) {
      FA_LAUNCH(grid, kThreads, 0, stream, norm_forward_kernel<T, TW, kVec, kThreads>)(p);
    } else {
      FA_LAUNCH(grid, kThreads, 0, stream, norm_forward_kernel<T, TW, 1, kThreads>)(p);
    }
  }
  return cudaGetLastError();
}

template <typename T, typename TW>
cudaError_t launch_backward(const NormBwdParams& p, cudaStream_t stream) {
  if (norm_row_threads(p.dtype, p.n) == 32) {
    FA_LAUNCH(static_cast<unsigned>(cdiv(p.groups, kThreads / 32)), kThreads, 0, stream,
              norm_backward_kernel<T, TW, 32>)(p);
  } else {
    FA_LAUNCH(static_cast<unsigned>(p.groups), kThreads, 0, stream, norm_backward_kernel<T, TW, kThreads>)(p);
  }
  return cudaGetLastError();
}

// One switch over (data dtype, weight dtype): weights are the data's dtype or fp32.
template <typename Params, typename Fn>
cudaError_t dispatch(const Params& p, Fn&& fn) {
  const bool w32 = p.w_dtype == DType::kFloat32;
  switch (p.dtype) {
    case DType::kFloat32:
      return fn(float{}, float{});
    case DType::kFloat16:
      return w32 ? fn(__half{}, float{}) : fn(__half{}, __half{});
    case DType::kBFloat16:
      return w32 ? fn(__nv_bfloat16{}, float{}) : fn(__nv_bfloat16{}, __nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

bool valid_dtypes(DType t, DType w) {
  const auto ok = [](DType d) { return d == DType::kFloat32 || d == DType::kFloat16 || d == DType::kBFloat16; };
  return ok(t) && ok(w) && (w == t || w == DType::kFloat32);
}

}  // namespace

cudaError_t norm_forward(const NormParams& p, cudaStream_t stream) {
  if (p.n <= 0 || p.rows < 0 || p.rows > 0x7fffffff || !valid_dtypes(p.dtype, p.w_dtype)) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;  // before the pointer checks: empty tensors may have null data
  if (p.x == nullptr || p.y == nullptr) return cudaErrorInvalidValue;
  return dispatch(p, [&](auto t, auto tw) { return launch_forward<decltype(t), decltype(tw)>(p, stream); });
}

cudaError_t norm_backward(const NormBwdParams& p, cudaStream_t stream) {
  if (p.n <= 0 || p.n > norm_bwd_max_n(p.dtype) || p.rows < 0 || p.groups < 1 || p.groups > 0x7fffffff)
    return cudaErrorInvalidValue;
  if (!valid_dtypes(p.dtype, p.w_dtype)) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;  // before the pointer checks: empty tensors may have null data
  if (p.x == nullptr || p.dy == nullptr || p.dx == nullptr || p.rstd == nullptr || (!p.rms && p.mean == nullptr))
    return cudaErrorInvalidValue;
  // The backward always takes 16-byte vectors: rows, strides and pointers must allow them.
  const int64_t vec = norm_vec(p.dtype);
  if (p.n % vec != 0 || p.x_stride % vec != 0 || p.dy_stride % vec != 0 || p.dx_stride % vec != 0)
    return cudaErrorInvalidValue;
  for (const void* ptr : {p.x, p.dy, static_cast<const void*>(p.dx)})
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return cudaErrorInvalidValue;
  return dispatch(p, [&](auto t, auto tw) { return launch_backward<decltype(t), decltype(tw)>(p, stream); });
}

}  // namespace fastattn
