// Attention backward, FlashAttention-2 style. A block of 4 warps owns 64 keys (16 per warp) of one key/value
// head and walks the query tiles that see them, for every query head of its group (grouped-query attention
// without repeating K/V): it recomputes P^T = exp2(K Q^T * scale - LSE) from the saved log-sum-exp, then
// dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q in registers; dQ += dS K is formed
// from dS^T staged in shared memory and added to an fp32 buffer with atomics (converted afterwards).
// Q, dO, LSE and delta tiles are double-buffered with cp.async. A preprocess kernel forms delta = rowsum(dO O).
#include "fastattn/attention_tile.cuh"

namespace fastattn {
namespace {

constexpr int kBlockN = 64, kThreads = 128;

// Query tile: 64 rows at head dim 64; 16 at 128 keeps dK, dV and the score tiles under 255 registers (32 spills).
template <int D>
constexpr int kBwdBlockM = D == 64 ? 64 : 16;

template <int D>
constexpr int bwd_smem_bytes() {
  constexpr int bm = kBwdBlockM<D>;
  return (2 * kBlockN + 4 * bm) * padded(D) * 2 + kBlockN * padded(bm) * 2 + 4 * bm * 4;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_kernel(const AttentionBwdParams bp) {
  constexpr int kBM = kBwdBlockM<D>, kStride = padded(D), kDsStride = padded(kBM);
  constexpr int kNT = kBM / 8, kDT = D / 8;
  constexpr int kQTiles = kBM / 16, kDSplit = 4 / kQTiles, kDPart = D / kDSplit;  // warps of the dQ GEMM
  const AttentionParams& p = bp.fwd;
  FA_DYNAMIC_SHARED(smem_raw);
  T* sk = reinterpret_cast<T*>(smem_raw);
  T* sv = sk + kBlockN * kStride;
  T* sq = sv + kBlockN * kStride;  // two buffers
  T* sdo = sq + 2 * kBM * kStride;  // two buffers
  T* sds = sdo + 2 * kBM * kStride;
  float* slse = reinterpret_cast<float*>(sds + kBlockN * kDsStride);  // two buffers, log2 units
  float* sdelta = slse + 2 * kBM;                                    // two buffers

  const int z = blockIdx.y / p.hk, hk = blockIdx.y % p.hk, group = p.h / p.hk;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t j0 = int64_t(blockIdx.x) * kBlockN;
  const int64_t limit = key_limit(p, z);
  const T* k = head_ptr<T>(p.k, p.k_stride, z, hk);
  const T* v = head_ptr<T>(p.v, p.v_stride, z, hk);
  const Range queries = query_range(p.vis, j0, kBlockN, p.l, kBM);
  const int nm = (j0 < limit && queries.hi > queries.lo) ? static_cast<int>(cdiv(queries.hi - queries.lo, kBM)) : 0;
  const int total = group * nm;

  load_tile<T, kBlockN, D, kThreads>(sk, k + j0 * p.k_stride.row, p.k_stride.row, limit - j0);
  load_tile<T, kBlockN, D, kThreads>(sv, v + j0 * p.v_stride.row, p.v_stride.row, limit - j0);
  auto load_q = [&](int it) {
    const int h = hk * group + it / nm, buf = it & 1;
    const int64_t i0 = queries.lo + int64_t(it % nm) * kBM;
    load_tile<T, kBM, D, kThreads>(sq + buf * kBM * kStride, head_ptr<T>(p.q, p.q_stride, z, h) + i0 * p.q_stride.row,
                                   p.q_stride.row, p.l - i0);
    load_tile<T, kBM, D, kThreads>(sdo + buf * kBM * kStride,
                                   head_ptr<T>(bp.dout, bp.do_stride, z, h) + i0 * bp.do_stride.row,
                                   bp.do_stride.row, p.l - i0);
    const int64_t row = (int64_t(z) * p.h + h) * p.l + i0 + threadIdx.x;
    if (threadIdx.x < kBM) {
      const bool ok = i0 + threadIdx.x < p.l;
      const float lse = ok ? p.lse[row] : -INFINITY;
      // Rows that saw no key have lse = -inf: +inf here makes their P exactly 0.
      slse[buf * kBM + threadIdx.x] = lse == -INFINITY ? INFINITY : lse * kLog2e;
      sdelta[buf * kBM + threadIdx.x] = ok ? bp.delta[row] : 0.f;
    }
  };
  if (total > 0) load_q(0);
  cp_async_commit();

  float dk[kDT][4] = {}, dv[kDT][4] = {};
  const float scale_log2 = p.scale * kLog2e, keep_scale = 1.f / (1.f - p.dropout_p);
  const int64_t key0 = j0 + warp * 16;  // this warp's keys

  for (int it = 0; it < total; ++it) {
    if (it + 1 < total) {
      load_q(it + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int buf = it & 1, h = hk * group + it / nm, bh = z * p.h + h;
    const int64_t i0 = queries.lo + int64_t(it % nm) * kBM;
    const T* sqb = sq + buf * kBM * kStride;
    const T* sdob = sdo + buf * kBM * kStride;
    const float* lse2 = slse + buf * kBM;
    const float* delta = sdelta + buf * kBM;

    // Scores transposed: rows are this warp's 16 keys, columns the tile's queries.
    float pt[kNT][4] = {};
    warp_mma<T, D / 16, kNT, AFrom::kSmem, BFrom::kNK>(pt, nullptr, sk + warp * 16 * kStride, kStride, sqb, kStride);
    const bool full = p.key_mask == nullptr && block_fully_visible(p.vis, i0, kBM, j0, kBlockN, p.l, limit);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = acc_col(lane, nt, e);
        float e2 = exp2f(fmaf(pt[nt][e], scale_log2, -lse2[col]));
        if (!full && !takes_part(p, z, limit, i0 + col, key0 + acc_row(lane, e))) e2 = 0.f;
        pt[nt][e] = e2;
      }
    float dpt[kNT][4] = {};
    warp_mma<T, D / 16, kNT, AFrom::kSmem, BFrom::kNK>(dpt, nullptr, sv + warp * 16 * kStride, kStride, sdob,
                                                         kStride);
    uint32_t a[kNT / 2][4];
    if (p.dropout_p > 0.f) {  // dV takes the dropped, rescaled P; dS the kept part of dP
      const uint32_t bits = dropout_bits<kNT, true>(p, bh, key0, i0);
      float pd[kNT][4];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const bool keep = (bits >> (nt * 4 + e)) & 1u;
          pd[nt][e] = keep ? pt[nt][e] * keep_scale : 0.f;
          dpt[nt][e] = keep ? dpt[nt][e] * keep_scale : 0.f;
        }
      acc_to_a<T, kNT>(a, pd);
    } else {
      acc_to_a<T, kNT>(a, pt);
    }
    warp_mma<T, kNT / 2, kDT, AFrom::kRegs, BFrom::kKN>(dv, a, nullptr, 0, sdob, kStride);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) pt[nt][e] *= dpt[nt][e] - delta[acc_col(lane, nt, e)];
    acc_to_a<T, kNT>(a, pt);
    warp_mma<T, kNT / 2, kDT, AFrom::kRegs, BFrom::kKN>(dk, a, nullptr, 0, sqb, kStride);

    // dS^T into shared memory ([key][query]) for the dQ GEMM, which needs it with queries as rows.
#pragma unroll
    for (int kk = 0; kk < kNT / 2; ++kk)
#pragma unroll
      for (int reg = 0; reg < 4; ++reg)
        *reinterpret_cast<uint32_t*>(sds + (warp * 16 + a_row(lane, reg)) * kDsStride + a_col(lane, kk, reg)) =
            a[kk][reg];
    __syncthreads();
    const int qt = warp % kQTiles, part = warp / kQTiles;
    // 32 columns at a time: a wider accumulator here pushes the kernel past 255 registers on sm_80.
#pragma unroll
    for (int c0 = part * kDPart; c0 < (part + 1) * kDPart; c0 += 32) {
      float dq[4][4] = {};
      warp_mma<T, kBlockN / 16, 4, AFrom::kSmemTrans, BFrom::kKN>(dq, nullptr, sds + qt * 16, kDsStride, sk + c0,
                                                                  kStride);
      float* dq_rows = bp.dq_accum + (int64_t(bh) * p.l + i0 + qt * 16) * D + c0;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (i0 + qt * 16 + acc_row(lane, e) < p.l)
            atomicAdd(dq_rows + acc_row(lane, e) * D + acc_col(lane, nt, e), dq[nt][e] * p.scale);
    }
    __syncthreads();  // the next iteration's load overwrites the buffers read here
  }
  cp_async_wait<0>();

  T* dk_out = static_cast<T*>(bp.dk) + z * bp.dk_stride.batch + hk * bp.dk_stride.head;
  T* dv_out = static_cast<T*>(bp.dv) + z * bp.dv_stride.batch + hk * bp.dv_stride.head;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t j = key0 + acc_row(lane, 2 * r);
    if (j >= p.s) continue;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      const int c = acc_col(lane, dt, 0);
      *reinterpret_cast<uint32_t*>(dk_out + j * bp.dk_stride.row + c) =
          pack2<T>(dk[dt][2 * r] * p.scale, dk[dt][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dv_out + j * bp.dv_stride.row + c) = pack2<T>(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  }
}

// delta[row] = sum_d dO[row, d] * O[row, d] in fp32; a warp per row.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_delta_kernel(const AttentionBwdParams bp) {
  const AttentionParams& p = bp.fwd;
  const int64_t row = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (row >= int64_t(p.z) * p.h * p.l) return;
  const int64_t i = row % p.l, bh = row / p.l, z = bh / p.h, h = bh % p.h;
  const T* o = head_ptr<T>(p.o, p.o_stride, z, h) + i * p.o_stride.row;
  const T* d_o = head_ptr<T>(bp.dout, bp.do_stride, z, h) + i * bp.do_stride.row;
  float sum = 0.f;
  for (int c = threadIdx.x % 32; c < D; c += 32) sum += to_float(o[c]) * to_float(d_o[c]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (threadIdx.x % 32 == 0) bp.delta[row] = sum;
}

// dq = dq_accum in the input dtype, through dq's strides.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(const AttentionBwdParams bp) {
  const AttentionParams& p = bp.fwd;
  const int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x;  // one pair of columns per thread
  if (idx >= int64_t(p.z) * p.h * p.l * (D / 2)) return;
  const int64_t row = idx / (D / 2), c = (idx % (D / 2)) * 2;
  const int64_t i = row % p.l, bh = row / p.l, z = bh / p.h, h = bh % p.h;
  const float* src = bp.dq_accum + row * D + c;
  T* dst = static_cast<T*>(bp.dq) + z * bp.dq_stride.batch + h * bp.dq_stride.head + i * bp.dq_stride.row + c;
  *reinterpret_cast<uint32_t*>(dst) = pack2<T>(src[0], src[1]);
}

template <typename T, int D>
cudaError_t launch_bwd(const AttentionBwdParams& bp, cudaStream_t stream) {
  const AttentionParams& p = bp.fwd;
  const int64_t rows = int64_t(p.z) * p.h * p.l;
  if (rows > 0) {
    FA_LAUNCH(static_cast<unsigned>(cdiv(rows, kThreads / 32)), kThreads, 0, stream,
              attention_bwd_delta_kernel<T, D>)(bp);
  }
  constexpr int smem = bwd_smem_bytes<D>();
  auto kernel = attention_bwd_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  if (p.s > 0) {
    const dim3 grid(static_cast<unsigned>(cdiv(p.s, kBlockN)), static_cast<unsigned>(p.z * p.hk));
    FA_LAUNCH(grid, kThreads, smem, stream, kernel)(bp);
  }
  if (rows > 0) {
    FA_LAUNCH(static_cast<unsigned>(cdiv(rows * (D / 2), kThreads)), kThreads, 0, stream,
              attention_bwd_dq_kernel<T, D>)(bp);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_backward(const AttentionBwdParams& bp, cudaStream_t stream) {
  cudaError_t err = check_attention_params(bp.fwd);
  if (err != cudaSuccess) return err;
  if (bp.fwd.z == 0) return cudaSuccess;  // nothing to do, and no grid of zero blocks
  if (bp.dout == nullptr || bp.delta == nullptr || bp.dq_accum == nullptr || bp.dq == nullptr || bp.dk == nullptr ||
      bp.dv == nullptr)
    return cudaErrorInvalidValue;
  for (const Strides3* s : {&bp.do_stride, &bp.dq_stride, &bp.dk_stride, &bp.dv_stride})
    if (!strides_aligned(*s)) return cudaErrorInvalidValue;
  for (const void* ptr : {bp.dout, static_cast<const void*>(bp.dq), static_cast<const void*>(bp.dk),
                          static_cast<const void*>(bp.dv)})
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return cudaErrorInvalidValue;
  if (reinterpret_cast<uintptr_t>(bp.dq_accum) % 16 != 0) return cudaErrorInvalidValue;
  const bool bf16 = bp.fwd.dtype == DType::kBFloat16;
  if (bp.fwd.d == 64) return bf16 ? launch_bwd<__nv_bfloat16, 64>(bp, stream) : launch_bwd<__half, 64>(bp, stream);
  return bf16 ? launch_bwd<__nv_bfloat16, 128>(bp, stream) : launch_bwd<__half, 128>(bp, stream);
}

}  // namespace fastattn
