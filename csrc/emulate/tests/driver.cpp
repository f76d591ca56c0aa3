// A driver of the emulated kernels without Python, for the planted-bug tests (tests/test_cuda_emulator.py):
// they build it with a mutated copy of one kernel source and expect the emulator to stop the run.
//
//   driver attention <fwd|bwd> <d> <L> <S> <causal 0|1>   fp16, 2 heads; checks against a double reference
//   driver norm <rows> <n> <rms 0|1>                        bf16 forward and backward against double
//
// Exit status: 0 when the results match, 1 when they do not (or are not finite), 3 when the emulator stopped
// the kernel (its message on stderr).
#include <cmath>
#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "fastattn/attention.cuh"
#include "fastattn/norm.cuh"
#include "fastattn_emulate_host.h"

using namespace fastattn;

namespace {

std::mt19937 rng(1234);

std::vector<__half> random_half(size_t n, std::vector<double>& as_double) {
  std::normal_distribution<float> dist;
  std::vector<__half> out(n);
  as_double.resize(n);
  for (size_t i = 0; i < n; ++i) {
    out[i] = __float2half_rn(dist(rng));
    as_double[i] = __half2float(out[i]);
  }
  return out;
}

std::vector<fastattn_emu::Buffer> buffers;

template <typename T>
void add(const char* name, std::vector<T>& v, bool writable) {
  buffers.push_back({name, reinterpret_cast<uintptr_t>(v.data()), v.size() * sizeof(T), writable});
}

double rel_error(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

int attention(bool backward, int d, int L, int S, bool causal) {
  const int H = 2;
  std::vector<double> qd, kd, vd, dod;
  auto q = random_half(size_t(H) * L * d, qd), k = random_half(size_t(H) * S * d, kd);
  auto v = random_half(size_t(H) * S * d, vd), dout = random_half(size_t(H) * L * d, dod);
  std::vector<__half> o(size_t(H) * L * d), dq(q.size()), dk(k.size()), dv(v.size());
  std::vector<float> lse(size_t(H) * L), delta(lse.size()), dq_accum(q.size(), 0.f);
  AttentionParams p{};
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.o = o.data(), p.lse = lse.data();
  p.q_stride = p.o_stride = {int64_t(H) * L * d, int64_t(L) * d, d};
  p.k_stride = p.v_stride = {int64_t(H) * S * d, int64_t(S) * d, d};
  p.z = 1, p.h = H, p.hk = H, p.l = L, p.s = S, p.d = d;
  p.scale = 1.f / std::sqrt(float(d));
  p.vis = {S - L, 0, 0, false, causal};
  p.dtype = DType::kFloat16;
  add("q", q, false), add("k", k, false), add("v", v, false), add("o", o, true), add("lse", lse, true);
  fastattn_emu::set_buffers(buffers);
  if (attention_forward(p, nullptr) != cudaSuccess) return 1;
  // The reference, in double: P = softmax(scale QK^T) over the visible keys, O = PV, and the gradients.
  std::vector<double> ref_o(o.size()), ref_dq(q.size(), 0), ref_dk(k.size(), 0), ref_dv(v.size(), 0);
  for (int h = 0; h < H; ++h)
    for (int i = 0; i < L; ++i) {
      std::vector<double> pr(S, 0.0);
      double mx = -INFINITY, sum = 0;
      for (int j = 0; j < S; ++j) {
        if (causal && j > i + S - L) continue;
        double s = 0;
        for (int c = 0; c < d; ++c) s += qd[(size_t(h) * L + i) * d + c] * kd[(size_t(h) * S + j) * d + c];
        pr[j] = s * p.scale;
        mx = std::max(mx, pr[j]);
      }
      for (int j = 0; j < S; ++j) {
        pr[j] = (causal && j > i + S - L) ? 0.0 : std::exp(pr[j] - mx);
        sum += pr[j];
      }
      std::vector<double> dp(S, 0.0);
      double dsum = 0;
      for (int j = 0; j < S; ++j) {
        pr[j] = sum > 0 ? pr[j] / sum : 0;
        for (int c = 0; c < d; ++c) {
          ref_o[(size_t(h) * L + i) * d + c] += pr[j] * vd[(size_t(h) * S + j) * d + c];
          dp[j] += dod[(size_t(h) * L + i) * d + c] * vd[(size_t(h) * S + j) * d + c];
          ref_dv[(size_t(h) * S + j) * d + c] += pr[j] * dod[(size_t(h) * L + i) * d + c];
        }
        dsum += pr[j] * dp[j];
      }
      for (int j = 0; j < S; ++j) {
        const double ds = pr[j] * (dp[j] - dsum) * p.scale;
        for (int c = 0; c < d; ++c) {
          ref_dq[(size_t(h) * L + i) * d + c] += ds * kd[(size_t(h) * S + j) * d + c];
          ref_dk[(size_t(h) * S + j) * d + c] += ds * qd[(size_t(h) * L + i) * d + c];
        }
      }
    }
  auto as_double = [](const std::vector<__half>& x) {
    std::vector<double> out(x.size());
    for (size_t i = 0; i < x.size(); ++i) out[i] = __half2float(x[i]);
    return out;
  };
  double err = rel_error(as_double(o), ref_o);
  std::printf("out %.3g\n", err);
  if (backward) {
    AttentionBwdParams bp{};
    bp.fwd = p;
    bp.dout = dout.data(), bp.delta = delta.data(), bp.dq_accum = dq_accum.data();
    bp.dq = dq.data(), bp.dk = dk.data(), bp.dv = dv.data();
    bp.do_stride = bp.dq_stride = p.q_stride;
    bp.dk_stride = bp.dv_stride = p.k_stride;
    add("dout", dout, false), add("delta", delta, true), add("dq_accum", dq_accum, true);
    add("dq", dq, true), add("dk", dk, true), add("dv", dv, true);
    for (auto& b : buffers)
      if (std::string(b.name) == "o" || std::string(b.name) == "lse") b.writable = false;
    fastattn_emu::set_buffers(buffers);
    if (attention_backward(bp, nullptr) != cudaSuccess) return 1;
    const double eq = rel_error(as_double(dq), ref_dq), ek = rel_error(as_double(dk), ref_dk);
    const double ev = rel_error(as_double(dv), ref_dv);
    std::printf("dq %.3g dk %.3g dv %.3g\n", eq, ek, ev);
    err = std::max({err, eq, ek, ev});
  }
  return err < 5e-3 ? 0 : 1;  // fp16 inputs, fp32 accumulation: errors of a few 1e-4
}

int norm(int rows, int n, bool rms) {
  std::normal_distribution<float> dist;
  std::vector<__nv_bfloat16> x(size_t(rows) * n), y(x.size()), dy(x.size()), dx(x.size()), w(n);
  for (auto& e : x) e = __float2bfloat16_rn(dist(rng));
  for (auto& e : dy) e = __float2bfloat16_rn(dist(rng));
  for (auto& e : w) e = __float2bfloat16_rn(1.f + 0.1f * dist(rng));
  std::vector<float> mean(rows), rstd(rows);
  const int64_t groups = norm_bwd_groups(rows, 4);
  std::vector<float> dw(size_t(groups) * n);
  add("x", x, false), add("weight", w, false), add("y", y, true), add("mean", mean, true), add("rstd", rstd, true);
  add("dy", dy, false), add("dx", dx, true), add("dw_partial", dw, true);
  fastattn_emu::set_buffers(buffers);
  NormParams p{x.data(), w.data(), nullptr, y.data(), mean.data(), rstd.data(), rows, n, n, n, 1e-5f,
               DType::kBFloat16, DType::kBFloat16, rms};
  if (norm_forward(p, nullptr) != cudaSuccess) return 1;
  NormBwdParams bp{x.data(), w.data(), dy.data(), dx.data(), mean.data(), rstd.data(), dw.data(), nullptr,
                   rows, n, n, n, n, groups, DType::kBFloat16, DType::kBFloat16, rms};
  if (norm_backward(bp, nullptr) != cudaSuccess) return 1;
  std::vector<double> got_y, want_y, got_dx, want_dx, got_dw(n, 0), want_dw(n, 0);
  for (int r = 0; r < rows; ++r) {
    double mu = 0, var = 0;
    for (int c = 0; c < n; ++c) mu += __bfloat162float(x[size_t(r) * n + c]);
    mu = rms ? 0 : mu / n;
    for (int c = 0; c < n; ++c) var += std::pow(__bfloat162float(x[size_t(r) * n + c]) - mu, 2);
    const double rs = 1 / std::sqrt(var / n + 1e-5);
    double c1 = 0, c2 = 0;
    std::vector<double> xhat(n), wdy(n);
    for (int c = 0; c < n; ++c) {
      xhat[c] = (__bfloat162float(x[size_t(r) * n + c]) - mu) * rs;
      wdy[c] = double(__bfloat162float(dy[size_t(r) * n + c])) * __bfloat162float(w[c]);
      c1 += xhat[c] * wdy[c] / n;
      c2 += wdy[c] / n;
      want_dw[c] += double(__bfloat162float(dy[size_t(r) * n + c])) * xhat[c];
      got_y.push_back(__bfloat162float(y[size_t(r) * n + c]));
      want_y.push_back(xhat[c] * __bfloat162float(w[c]));
    }
    for (int c = 0; c < n; ++c) {
      got_dx.push_back(__bfloat162float(dx[size_t(r) * n + c]));
      want_dx.push_back((wdy[c] - xhat[c] * c1 - (rms ? 0 : c2)) * rs);
    }
  }
  for (int64_t g = 0; g < groups; ++g)
    for (int c = 0; c < n; ++c) got_dw[c] += dw[size_t(g) * n + c];
  const double ey = rel_error(got_y, want_y), edx = rel_error(got_dx, want_dx), edw = rel_error(got_dw, want_dw);
  std::printf("y %.3g dx %.3g dw %.3g\n", ey, edx, edw);
  return std::max({ey, edx, edw}) < 2e-2 ? 0 : 1;  // bf16 outputs: errors of a few 1e-3
}

}  // namespace

int main(int argc, char** argv) {
  const std::string what = argc > 1 ? argv[1] : "";
  try {
    if (what == "attention" && argc == 7)
      return attention(std::string(argv[2]) == "bwd", std::atoi(argv[3]), std::atoi(argv[4]), std::atoi(argv[5]),
                       std::atoi(argv[6]) != 0);
    if (what == "norm" && argc == 5) return norm(std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[4]) != 0);
  } catch (const fastattn_emu::EmulationError& e) {
    std::fprintf(stderr, "EmulationError: %s\n", e.what());
    return 3;
  }
  std::fprintf(stderr, "usage: driver attention <fwd|bwd> <d> <L> <S> <causal> | driver norm <rows> <n> <rms>\n");
  return 2;
}
