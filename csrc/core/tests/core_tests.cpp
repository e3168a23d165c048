// Tests of the torch-free core: the simplex projection and the min-norm solver (the very code the
// GPU runs), the 16-bit conversions, and the CPU Gram/combine kernels against double sums.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "convert.h"
#include "cpu_isa.h"
#include "cpu_kernels.h"
#include "min_norm.h"
#include "mol_kernels.h"
#include "simplex.h"

namespace {

std::mt19937_64 rng(12345);

std::vector<double> project(const std::vector<double>& v) {
  std::vector<double> x(v.size());
  mk::project_simplex_row(
      int64_t(v.size()), [&](int64_t i) { return v[i]; }, [&](int64_t i, double xi) { x[i] = xi; });
  return x;
}

std::vector<double> solve(const std::vector<double>& G, int64_t K) {
  std::vector<double> lambda(K), work(mk::min_norm_workspace(K));
  mk::min_norm_solve(
      K, [&](int64_t i, int64_t j) { return G[i * K + j]; }, [&](int64_t i, double x) { lambda[i] = x; },
      work.data());
  return lambda;
}

// Gram of K random vectors of dimension d whose span has the given rank.
std::vector<double> random_gram(int64_t K, int64_t d, int64_t rank) {
  std::normal_distribution<double> normal;
  std::vector<double> basis(rank * d), coeffs(K * rank), G(K * K, 0.0), g(K * d, 0.0);
  for (auto& x : basis) x = normal(rng);
  for (auto& x : coeffs) x = normal(rng);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t r = 0; r < rank; ++r)
      for (int64_t c = 0; c < d; ++c) g[k * d + c] += coeffs[k * rank + r] * basis[r * d + c];
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < K; ++j)
      for (int64_t c = 0; c < d; ++c) G[i * K + j] += g[i * d + c] * g[j * d + c];
  return G;
}

// KKT of min over the simplex of l^T G l: (G l)_i >= l^T G l for all i, equality on the support.
void check_min_norm_kkt(const std::vector<double>& G, int64_t K, const char* what) {
  const std::vector<double> l = solve(G, K);
  double sum = 0.0, f = 0.0, scale = 0.0;
  std::vector<double> Gl(K, 0.0);
  for (int64_t i = 0; i < K; ++i) {
    CHECK(l[i] >= 0.0, "%s: lambda[%lld] = %g < 0", what, (long long)i, l[i]);
    sum += l[i];
    scale = std::max(scale, G[i * K + i]);
    for (int64_t j = 0; j < K; ++j) Gl[i] += G[i * K + j] * l[j];
  }
  for (int64_t i = 0; i < K; ++i) f += l[i] * Gl[i];
  CHECK(std::fabs(sum - 1.0) < 1e-12, "%s: sum = %.17g", what, sum);
  const double tol = 1e-9 * scale;
  for (int64_t i = 0; i < K; ++i) {
    CHECK(Gl[i] >= f - tol, "%s (K=%lld): (G l)_%lld = %g < f = %g", what, (long long)K, (long long)i, Gl[i], f);
    if (l[i] > 1e-9) CHECK(std::fabs(Gl[i] - f) <= tol, "%s: support %lld not tight", what, (long long)i);
  }
}

void test_simplex() {
  std::vector<double> x = project({0.2, 0.3, 0.5});
  CHECK(std::fabs(x[0] - 0.2) < 1e-15 && std::fabs(x[2] - 0.5) < 1e-15, "already on the simplex");
  x = project({3.0, 0.0, -1.0});
  CHECK(x[0] == 1.0 && x[1] == 0.0 && x[2] == 0.0, "vertex");
  x = project({1.0, 1.0});
  CHECK(x[0] == 0.5 && x[1] == 0.5, "tie");
  x = project({0.0});
  CHECK(x[0] == 1.0, "K = 1");
  x = project({1.0, NAN, 0.0});
  CHECK(std::isnan(x[0]) && std::isnan(x[2]), "NaN propagates to the whole row");
  std::normal_distribution<double> normal;
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t K = 1 + trial % 70;
    std::vector<double> v(K);
    for (auto& e : v) e = 3.0 * normal(rng);
    x = project(v);
    // Optimality: x = max(v - tau, 0) with the same tau on the support and sum 1.
    double sum = 0.0, tau = NAN;
    for (int64_t i = 0; i < K; ++i) {
      CHECK(x[i] >= 0.0, "non-negative");
      sum += x[i];
      if (x[i] > 0) {
        if (std::isnan(tau)) tau = v[i] - x[i];
        CHECK(std::fabs(v[i] - x[i] - tau) < 1e-12, "one threshold on the support");
      }
    }
    CHECK(std::fabs(sum - 1.0) < 1e-12, "sums to one (K=%lld, sum=%.17g)", (long long)K, sum);
    for (int64_t i = 0; i < K; ++i)
      if (x[i] == 0.0) CHECK(v[i] <= tau + 1e-12, "zeros lie below the threshold");
  }
}

// The projection is invariant to a shift of v, and must stay exact when |v| is far above 2^53 or
// when the sum of a finite row overflows.
void test_simplex_large_magnitudes() {
  std::vector<double> x = project({-1e17, -2e17});
  CHECK(x[0] == 1.0 && x[1] == 0.0, "[-1e17, -2e17] -> [%g, %g], expected [1, 0]", x[0], x[1]);
  x = project({1e308, -1e308});
  CHECK(x[0] == 1.0 && x[1] == 0.0, "[1e308, -1e308] -> [%g, %g], expected [1, 0]", x[0], x[1]);
  x = project({1.7e308, 1.7e308, 1.7e308, 1.7e308});
  for (int64_t i = 0; i < 4; ++i) CHECK(x[i] == 0.25, "four equal entries of 1.7e308: x[%lld] = %g", (long long)i, x[i]);
  x = project({1e300, 1e-30, -1e300, 1e300 - 1e284});
  CHECK(x[0] == 1.0 && x[1] == 0.0 && x[2] == 0.0 && x[3] == 0.0, "mixed magnitudes: x[0] = %g", x[0]);
  // Above 2^53 distinct entries differ by at least 2, so the projection puts equal weight on the
  // entries equal to the maximum: 2^60 + (0, 0, -512) -> (1/2, 1/2, 0).
  const double c = 1152921504606846976.0;
  x = project({c, c, c - 512.0});
  CHECK(x[0] == 0.5 && x[1] == 0.5 && x[2] == 0.0, "2^60 + (0, 0, -512): x = (%g, %g, %g)", x[0], x[1], x[2]);
  x = project({-c, -c - 512.0, -c, -c});
  CHECK(std::fabs(x[0] - 1.0 / 3) < 1e-16 && x[1] == 0.0 && x[0] == x[2] && x[0] == x[3], "-2^60 ties: x = (%g, %g, %g, %g)",
        x[0], x[1], x[2], x[3]);
  x = project({1e20, 1e20, INFINITY});
  CHECK(std::isnan(x[0]) && std::isnan(x[1]) && std::isnan(x[2]), "an infinite entry still gives an all-NaN row");
  std::normal_distribution<double> normal;
  for (int trial = 0; trial < 200; ++trial) {
    const int64_t K = 1 + trial % 17;
    const double magnitude = std::pow(10.0, -30.0 + 330.0 * (trial / 200.0));
    std::vector<double> v(K);
    for (auto& e : v) e = magnitude * normal(rng);
    x = project(v);
    double sum = 0.0;
    for (int64_t i = 0; i < K; ++i) {
      CHECK(x[i] >= 0.0 && x[i] <= 1.0, "x in [0, 1] at magnitude %g: x[%lld] = %g", magnitude, (long long)i, x[i]);
      sum += x[i];
    }
    CHECK(std::fabs(sum - 1.0) < 1e-14 * K, "sums to one at magnitude %g (K=%lld, sum=%.17g)", magnitude, (long long)K, sum);
  }
}

void test_min_norm() {
  // K = 2 closed form: g0 = (1, 0), g1 = (0, 1) -> (1/2, 1/2); g1 = 2 g0 -> all on g0.
  std::vector<double> l = solve({1, 0, 0, 1}, 2);
  CHECK(std::fabs(l[0] - 0.5) < 1e-15, "orthogonal pair");
  l = solve({1, 2, 2, 4}, 2);
  CHECK(l[0] == 1.0 && l[1] == 0.0, "collinear pair");
  l = solve({1, -1, -1, 1}, 2);
  CHECK(std::fabs(l[0] - 0.5) < 1e-15, "opposite pair");
  l = solve({0, 0, 0, 0, 0, 0, 0, 0, 0}, 3);
  CHECK(std::fabs(l[1] - 1.0 / 3) < 1e-15, "zero gradients give the uniform weights");
  l = solve({1, 0, 0, 0, 1, 0, 0, 0, 1}, 3);
  CHECK(std::fabs(l[2] - 1.0 / 3) < 1e-12, "orthonormal triple");
  l = solve({1, NAN, 0, NAN, 1, 0, 0, 0, 1}, 3);
  CHECK(std::isnan(l[0]), "NaN propagates");
  // A zero gradient among others: lambda puts all weight on it.
  l = solve({1, 0.5, 0, 0.5, 1, 0, 0, 0, 0}, 3);
  CHECK(l[2] == 1.0, "zero gradient takes all the weight");
  const int64_t sizes[] = {3, 4, 7, 16, 33, 64, 100};
  for (int64_t K : sizes) {
    for (int64_t rank : {int64_t(1), int64_t(2), K / 2 + 1, K}) {
      check_min_norm_kkt(random_gram(K, 2 * K + 3, rank), K, "random");
    }
    // Duplicated gradients: exact ties everywhere.
    std::vector<double> G = random_gram(K, 5, 3);
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < K; ++j) G[i * K + j] = G[(i % 2) * K + (j % 2)];
    check_min_norm_kkt(G, K, "duplicated");
  }
}

// fp64 Grams with entries near the largest double: the symmetrisation must not overflow, and the
// solution is that of the same Gram scaled down by an exact power of two.
void test_min_norm_near_overflow() {
  const double big = 1.7e308;
  std::vector<double> l = solve({big, 0.6 * big, 0.6 * big, 0.7 * big}, 2);
  // t = (g11 - g01) / (g00 - 2 g01 + g11) = 0.1 / 0.5
  CHECK(std::fabs(l[0] - 0.2) < 1e-14 && std::fabs(l[1] - 0.8) < 1e-14, "K = 2 near 1.7e308: (%g, %g)", l[0], l[1]);
  const int64_t sizes[] = {3, 4, 7, 16};
  for (int64_t K : sizes) {
    std::vector<double> G = random_gram(K, 2 * K + 3, K);
    double top = 0.0;
    for (int64_t i = 0; i < K; ++i) top = std::max(top, G[i * K + i]);
    const double to_big = std::ldexp(1.0, std::ilogb(big / top));  // an exact power of two
    std::vector<double> huge(G);
    for (auto& e : huge) e *= to_big;
    const std::vector<double> expected = solve(G, K), got = solve(huge, K);
    for (int64_t i = 0; i < K; ++i)
      CHECK(std::isfinite(got[i]) && std::fabs(got[i] - expected[i]) < 1e-12, "K=%lld near overflow: lambda[%lld] = %g, %g at scale 1",
            (long long)K, (long long)i, got[i], expected[i]);
    check_min_norm_kkt(huge, K, "near overflow");
  }
}

void test_conversions() {
  // Every finite half round-trips through float exactly.
  int bad = 0;
  for (uint32_t h = 0; h < 0x10000u; ++h) {
    const float f = mk::half_bits_to_float_soft(uint16_t(h));
    if (std::isnan(f)) continue;
    if (mk::float_to_half_bits_soft(f) != h) ++bad;
    if (mk::to_float(mk::half_t{uint16_t(h)}) != f) ++bad;
  }
  CHECK(bad == 0, "%d half values do not round-trip", bad);
  CHECK(mk::from_float<mk::bf16_t>(1.0f + 1.0f / 256).bits == 0x3F80, "bf16 ties to even");
  CHECK(mk::from_float<mk::bf16_t>(1.0f + 3.0f / 256).bits == 0x3F82, "bf16 rounds up");
  CHECK(mk::float_to_half_bits_soft(65520.0f) == 0x7C00, "half overflow to infinity");
  CHECK(mk::float_to_half_bits_soft(std::ldexp(1.5f, -24)) == 0x0002, "half subnormal ties to even");
}

void test_cpu_gram_and_combine() {
  std::normal_distribution<float> normal;
  for (int64_t K : {1, 3, 5, 33}) {
    const int64_t cols[] = {1, 17, 9000, 20011};
    const int64_t nb = 4;
    std::vector<std::vector<float>> blocks(nb);
    std::vector<const float*> ptrs(nb);
    std::vector<int64_t> strides(nb);
    for (int64_t j = 0; j < nb; ++j) {
      strides[j] = cols[j] + 3;  // rows padded: exercises the row stride
      blocks[j].resize(K * strides[j]);
      for (auto& x : blocks[j]) x = normal(rng);
      ptrs[j] = blocks[j].data();
    }
    mk::StackView<float> g{ptrs.data(), cols, strides.data(), nb, K};
    std::vector<float> G(K * K, NAN);
    mk::gram_cpu(g, G.data());
    double worst = 0.0;
    for (int64_t r = 0; r < K; ++r)
      for (int64_t s = 0; s < K; ++s) {
        double exact = 0.0;
        for (int64_t j = 0; j < nb; ++j)
          for (int64_t c = 0; c < cols[j]; ++c) exact += double(blocks[j][r * strides[j] + c]) * blocks[j][s * strides[j] + c];
        worst = std::max(worst, std::fabs(G[r * K + s] - exact) / std::sqrt(double(G[r * K + r]) * G[s * K + s]));
        CHECK(G[r * K + s] == G[s * K + r], "gram is exactly symmetric");
      }
    CHECK(worst < 1e-5, "gram error %g (K=%lld)", worst, (long long)K);

    std::vector<float> w(K);
    for (auto& x : w) x = normal(rng);
    std::vector<std::vector<float>> out(nb);
    std::vector<float*> out_ptrs(nb);
    for (int64_t j = 0; j < nb; ++j) {
      out[j].assign(cols[j], NAN);
      out_ptrs[j] = out[j].data();
    }
    mk::combine_cpu(g, w.data(), out_ptrs.data());
    worst = 0.0;
    for (int64_t j = 0; j < nb; ++j)
      for (int64_t c = 0; c < cols[j]; ++c) {
        double exact = 0.0;
        for (int64_t k = 0; k < K; ++k) exact += double(w[k]) * blocks[j][k * strides[j] + c];
        worst = std::max(worst, std::fabs(out[j][c] - exact));
      }
    CHECK(worst < 1e-4, "combine error %g", worst);
  }
}

// MoCo's passes against the same updates done element by element in double.
void test_tracking_passes() {
  std::normal_distribution<float> normal;
  for (int64_t K : {1, 3, 6}) {
    const int64_t cols[] = {5, 10007};
    const int64_t nb = 2;
    std::vector<std::vector<float>> g(nb), y(nb), out(nb);
    std::vector<const float*> gp(nb);
    std::vector<float*> yp(nb), op(nb);
    for (int64_t j = 0; j < nb; ++j) {
      g[j].resize(K * cols[j]);
      y[j].resize(K * cols[j]);
      out[j].resize(cols[j]);
      for (auto& x : g[j]) x = normal(rng);
      for (auto& x : y[j]) x = normal(rng);
      for (auto& x : out[j]) x = normal(rng);
      gp[j] = g[j].data();
      yp[j] = y[j].data();
      op[j] = out[j].data();
    }
    const std::vector<std::vector<float>> y0 = y, out0 = out;
    mk::StackView<float> gv{gp.data(), cols, cols, nb, K};
    mk::MutableStackView<float> yv{yp.data(), cols, cols, nb, K};
    // Pass 1: y <- y - beta (y - g); Gram of the updated y.
    const float beta = 0.3f;
    std::vector<float> G(K * K);
    mk::track_gram_cpu(gv, yv, beta, G.data());
    double worst_y = 0.0, worst_g = 0.0;
    for (int64_t r = 0; r < K; ++r)
      for (int64_t s = 0; s < K; ++s) {
        double exact = 0.0;
        for (int64_t j = 0; j < nb; ++j)
          for (int64_t c = 0; c < cols[j]; ++c) {
            const double yr = y0[j][r * cols[j] + c] - beta * (double(y0[j][r * cols[j] + c]) - g[j][r * cols[j] + c]);
            const double ys = y0[j][s * cols[j] + c] - beta * (double(y0[j][s * cols[j] + c]) - g[j][s * cols[j] + c]);
            exact += yr * ys;
            if (s == 0) worst_y = std::max(worst_y, std::fabs(yr - y[j][r * cols[j] + c]));
          }
        worst_g = std::max(worst_g, std::fabs(exact - G[r * K + s]) / double(cols[0] + cols[1]));
      }
    CHECK(worst_y < 1e-6 && worst_g < 1e-6, "track_gram: y error %g, gram error %g", worst_y, worst_g);

    // Joint Gram of [y; g]: the top-right block is y g^T.
    std::vector<float> J(4 * K * K);
    mk::StackView<float> yr{const_cast<const float* const*>(yp.data()), cols, cols, nb, K};
    mk::joint_gram_cpu(gv, yr, J.data());
    double worst_j = 0.0;
    for (int64_t r = 0; r < K; ++r)
      for (int64_t s = 0; s < K; ++s) {
        double exact = 0.0;
        for (int64_t j = 0; j < nb; ++j)
          for (int64_t c = 0; c < cols[j]; ++c) exact += double(y[j][r * cols[j] + c]) * g[j][s * cols[j] + c];
        worst_j = std::max(worst_j, std::fabs(exact - J[r * 2 * K + K + s]) / double(cols[0] + cols[1]));  // entries ~ N(0, 1)
        CHECK(J[r * 2 * K + K + s] == J[(K + s) * 2 * K + r], "joint gram is exactly symmetric");
      }
    CHECK(worst_j < 1e-6, "joint_gram error %g", worst_j);

    // Pass 2: y <- y + beta (scale g - y); out += alpha y^T w.
    const std::vector<std::vector<float>> y1 = y;
    std::vector<float> scale(K), w(K);
    for (auto& x : scale) x = 1.0f + std::fabs(normal(rng));
    for (auto& x : w) x = normal(rng);
    const float alpha = -0.1f;
    mk::track_combine_cpu<float, float>(gv, yv, scale.data(), beta, w.data(), op.data(), alpha, true);
    double worst_o = 0.0;
    for (int64_t j = 0; j < nb; ++j)
      for (int64_t c = 0; c < cols[j]; ++c) {
        double d = 0.0;
        for (int64_t k = 0; k < K; ++k) {
          const double yk = y1[j][k * cols[j] + c] + beta * (double(scale[k]) * g[j][k * cols[j] + c] - y1[j][k * cols[j] + c]);
          d += w[k] * yk;
          worst_o = std::max(worst_o, std::fabs(yk - y[j][k * cols[j] + c]));
        }
        worst_o = std::max(worst_o, std::fabs(out0[j][c] + alpha * d - out[j][c]));
      }
    CHECK(worst_o < 1e-5, "track_combine error %g", worst_o);
  }
}

}  // namespace

int main() {
  test_simplex();
  test_simplex_large_magnitudes();
  test_min_norm();
  test_min_norm_near_overflow();
  test_conversions();
  for (mk::CpuIsa isa : mk::supported_cpu_isas()) {  // every variant this CPU runs
    mk::set_cpu_isa(mk::cpu_isa_name(isa));
    std::printf("core_tests: CPU kernels, variant %s\n", mk::cpu_isa_name(mk::cpu_isa()));
    test_cpu_gram_and_combine();
    test_tracking_passes();
  }
  if (failures) {
    std::printf("core_tests: %d failed checks\n", failures);
    return 1;
  }
  std::printf("core_tests: all checks passed\n");
  return 0;
}
