// Attention forward, FlashAttention-2 style: a block of 4 warps owns 64 queries (16 per warp) of one head and
// streams 64-key tiles of K and V through double-buffered shared memory (cp.async); S = QK^T and O += PV run
// on mma.sync m16n8k16 with fp32 accumulators; the online softmax keeps a running max and sum per row in
// registers (log2 domain, scale folded into exp2). Tiles entirely invisible to the block are never loaded;
// element masks run only on tiles that are not entirely visible.
#include "fastattn/attention_tile.cuh"

namespace fastattn {
namespace {

constexpr int kBlockM = 64, kBlockN = 64, kThreads = 128;

template <int D>
constexpr int fwd_smem_bytes() {
  return (kBlockM + 4 * kBlockN) * padded(D) * 2;  // Q, then K and V in two buffers each
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2) attention_fwd_kernel(const AttentionParams p) {
  constexpr int kStride = padded(D), kNT = kBlockN / 8, kDT = D / 8;
  FA_DYNAMIC_SHARED(smem_raw);
  T* sq = reinterpret_cast<T*>(smem_raw);
  T* sk = sq + kBlockM * kStride;
  T* sv = sk + 2 * kBlockN * kStride;

  const int bh = blockIdx.y, z = bh / p.h, h = bh % p.h, hk = h / (p.h / p.hk);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t i0 = int64_t(blockIdx.x) * kBlockM;
  const int64_t limit = key_limit(p, z);
  const T* q = head_ptr<T>(p.q, p.q_stride, z, h);
  const T* k = head_ptr<T>(p.k, p.k_stride, z, hk);
  const T* v = head_ptr<T>(p.v, p.v_stride, z, hk);
  const Range keys = key_range(p.vis, i0, kBlockM, limit, kBlockN);
  const int n_tiles = keys.hi > keys.lo ? static_cast<int>(cdiv(keys.hi - keys.lo, kBlockN)) : 0;

  auto load_kv = [&](int it) {
    const int64_t j0 = keys.lo + int64_t(it) * kBlockN;
    const int buf = it & 1;
    load_tile<T, kBlockN, D, kThreads>(sk + buf * kBlockN * kStride, k + j0 * p.k_stride.row, p.k_stride.row,
                                       limit - j0);
    load_tile<T, kBlockN, D, kThreads>(sv + buf * kBlockN * kStride, v + j0 * p.v_stride.row, p.v_stride.row,
                                       limit - j0);
  };
  load_tile<T, kBlockM, D, kThreads>(sq, q + i0 * p.q_stride.row, p.q_stride.row, p.l - i0);
  if (n_tiles > 0) load_kv(0);
  cp_async_commit();

  float acc[kDT][4] = {};
  float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.f, 0.f};
  const float scale_log2 = p.scale * kLog2e;
  const int64_t row0 = i0 + warp * 16;

  for (int it = 0; it < n_tiles; ++it) {
    if (it + 1 < n_tiles) {
      load_kv(it + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int64_t j0 = keys.lo + int64_t(it) * kBlockN;
    const T* skb = sk + (it & 1) * kBlockN * kStride;
    const T* svb = sv + (it & 1) * kBlockN * kStride;

    float s[kNT][4] = {};
    // Q is re-read from shared memory each tile: holding it in registers spills at head dim 128.
    warp_mma<T, D / 16, kNT, AFrom::kSmem, BFrom::kNK>(s, nullptr, sq + warp * 16 * kStride, kStride, skb, kStride);
    // Rows past L are computed but never stored, so only the key side decides whether to mask.
    if (p.key_mask != nullptr || !block_fully_visible(p.vis, i0, kBlockM, j0, kBlockN, INT64_MAX, limit)) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (!takes_part(p, z, limit, row0 + acc_row(lane, e), j0 + acc_col(lane, nt, e))) s[nt][e] = -INFINITY;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const SoftmaxStep step = softmax_step(m_row[r], mx * scale_log2);
      m_row[r] = step.m;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float e = exp2f(fmaf(s[nt][2 * r + c], scale_log2, -step.shift));
          s[nt][2 * r + c] = e;
          sum += e;
        }
      l_row[r] = l_row[r] * step.alpha + sum;  // a quad's partial sums: reduced once, at the end
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        acc[dt][2 * r] *= step.alpha;
        acc[dt][2 * r + 1] *= step.alpha;
      }
    }
    if (p.dropout_p > 0.f) {  // after the sum: dropout acts on the normalized probabilities
      const uint32_t keep = dropout_bits<kNT, false>(p, bh, row0, j0);
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (!((keep >> (nt * 4 + e)) & 1u)) s[nt][e] = 0.f;
    }
    uint32_t pf[kNT / 2][4];
    acc_to_a<T, kNT>(pf, s);
    warp_mma<T, kNT / 2, kDT, AFrom::kRegs, BFrom::kKN>(acc, pf, nullptr, 0, svb, kStride);
    __syncthreads();  // the next iteration's load overwrites the buffer read here
  }
  cp_async_wait<0>();

  // Rows that saw no key (l == 0) give 0 and lse = -inf, as the Triton kernels and torch's SDPA.
  T* o = static_cast<T*>(p.o) + z * p.o_stride.batch + h * p.o_stride.head;
  const float keep_scale = 1.f / (1.f - p.dropout_p);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_row[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int64_t i = row0 + acc_row(lane, 2 * r);
    if (i >= p.l) continue;
    const float inv = l > 0.f ? keep_scale / l : 0.f;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      const uint32_t pair = pack2<T>(acc[dt][2 * r] * inv, acc[dt][2 * r + 1] * inv);
      *reinterpret_cast<uint32_t*>(o + i * p.o_stride.row + acc_col(lane, dt, 0)) = pair;
    }
    if ((lane & 3) == 0) p.lse[int64_t(bh) * p.l + i] = l > 0.f ? (m_row[r] + log2f(l)) * kLn2 : -INFINITY;
  }
}

template <typename T, int D>
cudaError_t launch_fwd(const AttentionParams& p, cudaStream_t stream) {
  constexpr int smem = fwd_smem_bytes<D>();
  auto kernel = attention_fwd_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(cdiv(p.l, kBlockM)), static_cast<unsigned>(p.z * p.h));
  FA_LAUNCH(grid, kThreads, smem, stream, kernel)(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_forward(const AttentionParams& p, cudaStream_t stream) {
  const cudaError_t err = check_attention_params(p);
  if (err != cudaSuccess) return err;
  if (p.l == 0 || p.z == 0 || p.h == 0) return cudaSuccess;
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.d == 64) return bf16 ? launch_fwd<__nv_bfloat16, 64>(p, stream) : launch_fwd<__half, 64>(p, stream);
  return bf16 ? launch_fwd<__nv_bfloat16, 128>(p, stream) : launch_fwd<__half, 128>(p, stream);
}

}  // namespace fastattn
