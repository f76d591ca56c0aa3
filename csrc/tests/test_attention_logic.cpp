// Host test of the attention kernels' index logic (attention.cuh), on a machine without a GPU:
//  1. ldmatrix / mma.sync m16n8k16 are emulated as the PTX ISA specifies them (fragment layouts written out
//     here, independently of the kernels' maps); the kernels' lane maps (a_offset, b_offset, acc_row/col,
//     a_row/col, acc_to_a_with) then drive every GEMM shape of the forward and backward, which must equal
//     plain matrix products;
//  2. key_range / query_range / block_fully_visible against brute force over random visibility rules;
//  3. the online-softmax recurrence (softmax_step) over tiles against a direct log-sum-exp, incl. masked
//     scores and rows that see nothing.
#include <array>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "fastattn/attention.cuh"

using namespace fastattn;
using Reg = std::array<float, 2>;  // a 32-bit register: two 16-bit values, the first in the low half

static int failures = 0;
#define CHECK(cond, ...)          \
  do {                            \
    if (!(cond)) {                \
      std::printf(__VA_ARGS__);   \
      std::printf("\n");          \
      ++failures;                 \
    }                             \
  } while (0)

// ldmatrix.x4 from flat storage: lane 8*m + r gives the address of row r of matrix m. Without .trans,
// thread `lane` receives row lane/4, columns 2*(lane%4) and +1 of each matrix; with .trans, rows 2*(lane%4)
// and +1 of column lane/4.
static void ldmatrix_x4(const std::vector<float>& mem, const int (&addr)[32], bool trans, Reg (&out)[32][4]) {
  for (int m = 0; m < 4; ++m)
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, t = lane % 4;
      for (int e = 0; e < 2; ++e) {
        const int row = trans ? 2 * t + e : g, col = trans ? g : 2 * t + e;
        out[lane][m][e] = mem[addr[8 * m + row] + col];
      }
    }
}

// mma.sync.m16n8k16: A fragments a0..a3 hold (g, 2t..), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..); B holds
// (k 2t.., n g), (k 2t+8.., n g); C/D hold (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
static void mma(float (&acc)[32][4], const Reg (&a)[32][4], const Reg (&b)[32][2]) {
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 2; ++e) {
      A[g][2 * t + e] = a[lane][0][e];
      A[g + 8][2 * t + e] = a[lane][1][e];
      A[g][2 * t + 8 + e] = a[lane][2][e];
      A[g + 8][2 * t + 8 + e] = a[lane][3][e];
      B[2 * t + e][g] = b[lane][0][e];
      B[2 * t + 8 + e][g] = b[lane][1][e];
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e / 2) * 8, col = 2 * t + e % 2;
      float s = 0.f;
      for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
      acc[lane][e] += s;
    }
  }
}

// The kernels' warp_mma, lane by lane: acc[lane][nt][e] += A (16 x 16*K16) * B (16*K16 x 8*NT).
using ARegs = std::vector<std::array<std::array<Reg, 4>, 8>>;  // [lane][k step][register]

struct Operand {
  const std::vector<float>* mem;
  int base, ld;
  bool alt;  // A: [k][m] storage (.trans); B: [k][n] storage (.trans)
};

static void warp_mma(std::vector<std::array<std::array<float, 4>, 16>>& acc, int k16, int nt,
                     const ARegs* a_regs, const Operand& a, const Operand& b) {
  for (int kk = 0; kk < k16; ++kk) {
    Reg af[32][4];
    if (a_regs) {
      for (int lane = 0; lane < 32; ++lane)
        for (int r = 0; r < 4; ++r) af[lane][r] = (*a_regs)[lane][kk][r];
    } else {
      int addr[32];
      for (int lane = 0; lane < 32; ++lane) addr[lane] = a.base + a_offset(a.alt, lane, kk, a.ld);
      ldmatrix_x4(*a.mem, addr, a.alt, af);
    }
    for (int np = 0; np < nt / 2; ++np) {
      int addr[32];
      for (int lane = 0; lane < 32; ++lane) addr[lane] = b.base + b_offset(b.alt, lane, kk, np, b.ld);
      Reg bf[32][4];
      ldmatrix_x4(*b.mem, addr, !b.alt ? false : true, bf);
      for (int half = 0; half < 2; ++half) {
        Reg b2[32][2];
        float c[32][4];
        for (int lane = 0; lane < 32; ++lane) {
          b2[lane][0] = bf[lane][2 * half];
          b2[lane][1] = bf[lane][2 * half + 1];
          for (int e = 0; e < 4; ++e) c[lane][e] = acc[lane][2 * np + half][e];
        }
        mma(c, af, b2);
        for (int lane = 0; lane < 32; ++lane)
          for (int e = 0; e < 4; ++e) acc[lane][2 * np + half][e] = c[lane][e];
      }
    }
  }
}

using Acc = std::vector<std::array<std::array<float, 4>, 16>>;  // [lane][nt][e], up to 16 n8 tiles

static std::vector<float> random_matrix(std::mt19937& gen, int rows, int cols, int ld) {
  std::uniform_int_distribution<int> dist(-3, 3);  // small integers: every product and sum exact in fp32
  std::vector<float> m(static_cast<size_t>(rows) * ld, 1e9f);  // padding poisoned
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) m[size_t(r) * ld + c] = float(dist(gen));
  return m;
}

static float at(const std::vector<float>& m, int ld, int r, int c) { return m[size_t(r) * ld + c]; }

// Compare a warp's accumulator (16 x 8*nt) with expected(row, col).
template <typename F>
static void check_acc(const Acc& acc, int nt, F expected, const char* what) {
  int bad = 0;
  for (int lane = 0; lane < 32; ++lane)
    for (int t = 0; t < nt; ++t)
      for (int e = 0; e < 4; ++e) {
        const float want = expected(acc_row(lane, e), acc_col(lane, t, e));
        if (acc[lane][t][e] != want) ++bad;
      }
  CHECK(bad == 0, "%s: %d of %d elements wrong", what, bad, 32 * nt * 4);
}

// Accumulator (16 x 8*NT) -> A fragments of the next GEMM, by the kernels' acc_to_a_with.
template <int NT>
static ARegs to_a(const Acc& acc) {
  ARegs regs(32);
  for (int lane = 0; lane < 32; ++lane) {
    float in[NT][4];
    Reg out[NT / 2][4];
    for (int t = 0; t < NT; ++t)
      for (int e = 0; e < 4; ++e) in[t][e] = acc[lane][t][e];
    acc_to_a_with<NT>(out, in, [](float lo, float hi) { return Reg{lo, hi}; });
    for (int k = 0; k < NT / 2; ++k)
      for (int r = 0; r < 4; ++r) regs[lane][k][r] = out[k][r];
  }
  return regs;
}

static void check_gemm_shapes() {
  std::mt19937 gen(1);
  constexpr int D = 64, N = 64, ldd = padded(D);  // head dim 64, 64 keys, padded rows as in shared memory
  // Forward: S = Q K^T (Q rows [m][d], K rows [n][d]).
  auto q = random_matrix(gen, 16, D, ldd), k = random_matrix(gen, N, D, ldd);
  Acc s(32);
  warp_mma(s, D / 16, N / 8, nullptr, {&q, 0, ldd, false}, {&k, 0, ldd, false});
  check_acc(s, N / 8, [&](int i, int j) {
    float r = 0; for (int d = 0; d < D; ++d) r += at(q, ldd, i, d) * at(k, ldd, j, d); return r; }, "S = Q K^T");
  // Forward: O = P V with P from the accumulator registers, V rows [n][d] read with .trans.
  auto v = random_matrix(gen, N, D, ldd);
  Acc p(32);
  for (int lane = 0; lane < 32; ++lane)
    for (int t = 0; t < 8; ++t)
      for (int e = 0; e < 4; ++e) p[lane][t][e] = float((lane * 7 + t * 3 + e) % 5 - 2);
  auto pa = to_a<N / 8>(p);
  Acc o(32);
  warp_mma(o, N / 16, D / 8, &pa, {}, {&v, 0, ldd, true});
  auto p_at = [&](int i, int j) {  // P's element (i, j) from the fragments
    for (int lane = 0; lane < 32; ++lane)
      for (int e = 0; e < 4; ++e)
        if (acc_row(lane, e) == i && acc_col(lane, j / 8, e) == j) return p[lane][j / 8][e];
    return NAN;
  };
  check_acc(o, D / 8, [&](int i, int d) {
    float r = 0; for (int j = 0; j < N; ++j) r += p_at(i, j) * at(v, ldd, j, d); return r; }, "O = P V");
  // Backward dQ = dS K with dS^T stored [key][query] (A with .trans) and K [key][d] (B with .trans); the
  // dS^T store uses a_row/a_col of registers made by acc_to_a_with.
  constexpr int BM = 16, lds = padded(BM);
  std::vector<float> sds(size_t(N) * lds, 1e9f);
  for (int w = 0; w < N / 16; ++w) {  // each warp's 16 keys x BM queries of dS^T
    Acc dst(32);
    for (int lane = 0; lane < 32; ++lane)
      for (int t = 0; t < BM / 8; ++t)
        for (int e = 0; e < 4; ++e) dst[lane][t][e] = float((w * 31 + lane * 5 + t * 3 + e) % 7 - 3);
    const ARegs regs = to_a<BM / 8>(dst);
    for (int lane = 0; lane < 32; ++lane)
      for (int reg = 0; reg < 4; ++reg)
        for (int h = 0; h < 2; ++h) {
          const int row = w * 16 + a_row(lane, reg), col = a_col(lane, 0, reg) + h;
          sds[size_t(row) * lds + col] = regs[lane][0][reg][h];
          // The register must hold accumulator element (row, col) of dS^T.
          const int e = (reg & 1) * 2 + h, nt = reg >> 1;
          CHECK(acc_row(lane, e) + w * 16 == row && acc_col(lane, nt, e) == col, "a_row/a_col map");
          CHECK(regs[lane][0][reg][h] == dst[lane][nt][e], "acc_to_a_with order");
        }
  }
  Acc dq(32);
  warp_mma(dq, N / 16, D / 8, nullptr, {&sds, 0, lds, true}, {&k, 0, ldd, true});
  check_acc(dq, D / 8, [&](int i, int d) {
    float r = 0; for (int j = 0; j < N; ++j) r += at(sds, lds, j, i) * at(k, ldd, j, d); return r; }, "dQ = dS K");
  // Backward S^T = K Q^T and dP^T = V dO^T have the shape of S = Q K^T (checked); dV = P^T dO and
  // dK = dS^T Q the shape of O = P V with a 16-query tile: check that one too.
  auto dout = random_matrix(gen, BM, D, ldd);
  Acc pt(32);
  for (int lane = 0; lane < 32; ++lane)
    for (int t = 0; t < 2; ++t)
      for (int e = 0; e < 4; ++e) pt[lane][t][e] = float((lane + t * 11 + e * 2) % 5 - 2);
  const ARegs pta = to_a<BM / 8>(pt);
  Acc dv(32);
  warp_mma(dv, BM / 16, D / 8, &pta, {}, {&dout, 0, ldd, true});
  check_acc(dv, D / 8, [&](int j, int d) {
    float r = 0;
    for (int i = 0; i < BM; ++i)
      for (int lane = 0; lane < 32; ++lane)
        for (int e = 0; e < 4; ++e)
          if (acc_row(lane, e) == j && acc_col(lane, i / 8, e) == i) r += pt[lane][i / 8][e] * at(dout, ldd, i, d);
    return r; }, "dV = P^T dO");
}

static void check_ranges() {
  std::mt19937 gen(2);
  std::uniform_int_distribution<int> small(-40, 40), len(0, 150), side(0, 3);
  for (int trial = 0; trial < 3000; ++trial) {
    Visibility v;
    v.offset = small(gen);
    v.left = std::abs(small(gen));
    v.right = small(gen);
    const int s = side(gen);
    v.has_left = s & 1;
    v.has_right = s & 2;
    const int L = len(gen) + 1, S = len(gen) + 1, limit = std::uniform_int_distribution<int>(0, S)(gen);
    const int tile = trial % 2 ? 64 : 16;
    for (int i0 = 0; i0 < L; i0 += 32) {
      const Range r = key_range(v, i0, 32, limit, tile);
      CHECK(r.lo % tile == 0 && r.lo >= 0, "key_range lo not a tile start");
      for (int i = i0; i < i0 + 32; ++i)
        for (int j = 0; j < S; ++j)
          if (j < limit && visible(v, i, j)) CHECK(j >= r.lo && j < r.hi, "key (%d, %d) outside key_range", i, j);
    }
    for (int j0 = 0; j0 < S; j0 += 64) {
      const Range r = query_range(v, j0, 64, L, tile);
      for (int j = j0; j < j0 + 64; ++j)
        for (int i = 0; i < L; ++i)
          if (visible(v, i, j)) CHECK(i >= r.lo && i < r.hi, "query (%d, %d) outside query_range", i, j);
    }
    for (int i0 = 0; i0 < L; i0 += 16)
      for (int j0 = 0; j0 < S; j0 += 16) {
        bool all = true;
        for (int i = i0; i < i0 + 16; ++i)
          for (int j = j0; j < j0 + 16; ++j) all = all && i < L && j < limit && visible(v, i, j);
        CHECK(block_fully_visible(v, i0, 16, j0, 16, L, limit) == all, "block_fully_visible at (%d, %d)", i0, j0);
      }
  }
}

static void check_online_softmax() {
  std::mt19937 gen(3);
  std::normal_distribution<float> dist(0.f, 4.f);
  std::bernoulli_distribution masked(0.3);
  for (int trial = 0; trial < 500; ++trial) {
    const int n = 1 + trial % 300, tile = 64;
    const bool all_masked = trial % 7 == 0;
    std::vector<float> s(n), val(n);
    for (int j = 0; j < n; ++j) {
      s[j] = (all_masked || masked(gen)) ? -INFINITY : dist(gen);
      val[j] = dist(gen);
    }
    float m = -INFINITY, l = 0.f, acc = 0.f;
    for (int j0 = 0; j0 < n; j0 += tile) {
      float mx = -INFINITY;
      for (int j = j0; j < n && j < j0 + tile; ++j) mx = std::fmax(mx, s[j]);
      const SoftmaxStep step = softmax_step(m, mx);
      m = step.m;
      l *= step.alpha;
      acc *= step.alpha;
      for (int j = j0; j < n && j < j0 + tile; ++j) {
        const float p = std::exp2(s[j] - step.shift);
        l += p;
        acc += p * val[j];
      }
    }
    double mx = -INFINITY, sum = 0.0, num = 0.0;
    for (int j = 0; j < n; ++j) mx = std::fmax(mx, double(s[j]));
    for (int j = 0; j < n; ++j)
      if (s[j] != -INFINITY) {
        sum += std::exp2(s[j] - mx);
        num += std::exp2(s[j] - mx) * val[j];
      }
    if (sum == 0.0) {
      CHECK(l == 0.f && acc == 0.f && !std::isnan(m), "fully masked row: l %g acc %g m %g", l, acc, m);
    } else {
      const double lse = mx + std::log2(sum), got = m + std::log2(double(l));
      CHECK(std::fabs(got - lse) < 1e-5 * (1 + std::fabs(lse)), "lse %f vs %f", got, lse);
      CHECK(std::fabs(acc / l - num / sum) < 1e-4 * (1 + std::fabs(num / sum)), "output %f vs %f", acc / l,
            num / sum);
    }
  }
}

int main() {
  check_gemm_shapes();
  check_ranges();
  check_online_softmax();
  std::printf("%s\n", failures == 0 ? "all ok" : "FAILED");
  return failures == 0 ? 0 : 1;
}
