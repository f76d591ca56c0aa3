// Host test of the row statistics the CUDA norm kernel runs: per-thread Welford pushes merged in the warp's
// butterfly order and then across warps must equal the two-pass mean and variance.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "fastattn/common.cuh"

using fastattn::MeanVar;

static bool check(int n, int threads, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(3.f, 2.f);
  std::vector<float> x(n);
  for (auto& v : x) v = dist(gen);
  // Each thread strides the row as the kernel does, then lanes merge pairwise (xor 16, 8, 4, 2, 1).
  std::vector<MeanVar> per(threads);
  for (int t = 0; t < threads; ++t)
    for (int c = t; c < n; c += threads) per[t] = fastattn::push(per[t], x[c]);
  for (int offset = 16; offset > 0; offset /= 2)
    for (int w = 0; w < threads; w += 32) {
      std::vector<MeanVar> next(per.begin() + w, per.begin() + w + 32);
      for (int l = 0; l < 32; ++l) next[l] = fastattn::merge(per[w + l], per[w + (l ^ offset)]);
      std::copy(next.begin(), next.end(), per.begin() + w);
    }
  MeanVar total;
  for (int w = 0; w < threads; w += 32) total = fastattn::merge(total, per[w]);
  double mean = 0, var = 0;
  for (float v : x) mean += v;
  mean /= n;
  for (float v : x) var += (v - mean) * (v - mean);
  var /= n;
  const double got_var = total.m2 / n;
  const bool ok = std::fabs(total.mean - mean) <= 1e-5 * (1 + std::fabs(mean)) && std::fabs(got_var - var) <= 1e-4 * var &&
                  total.count == n;
  std::printf("n=%d mean %.7f/%.7f var %.7f/%.7f %s\n", n, total.mean, mean, got_var, var, ok ? "ok" : "FAIL");
  return ok;
}

int main() {
  bool ok = true;
  for (int n : {1, 3, 255, 256, 1000, 4097, 65536}) ok &= check(n, 256, 7u + n);
  std::printf("%s\n", ok ? "all ok" : "FAILED");
  return ok ? 0 : 1;
}
