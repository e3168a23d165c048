// Tests of the federated learning kernels of the torch-free core (fl_kernels.h): the vectorised,
// threaded CPU loops give exactly the element function's result (no contraction or reordering
// sneaks in), inactive rows and their step counts are never written, a zero momentum buffer gives
// torch's first step, and the weighted mean follows its documented summation order and NaN rule.
// This file is compiled without -march, so it has no fma instruction to contract into: its own
// arithmetic is exactly the order written.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "convert.h"
#include "cpu_isa.h"
#include "fl_kernels.h"

namespace {

std::mt19937_64 rng(2024);

template <class A>
bool same_bits(A a, A b) {
  return std::memcmp(&a, &b, sizeof a) == 0;
}

template <class T>
std::vector<T> random_vector(int64_t n, double scale, bool positive = false) {
  std::normal_distribution<double> normal;
  std::vector<T> v(n);
  for (auto& x : v) {
    const double value = scale * normal(rng);
    x = mk::from_float<T>(mk::accum_t<T>(positive ? value * value : value));
  }
  return v;
}

// adam_step_cpu on C = 3 clients (the middle one inactive) against adam_update element by element.
template <class T>
void test_adam(const mk::fl::AdamHyper& hyper) {
  using A = mk::accum_t<T>;
  const int64_t C = 3, D = 4099;  // several vector bodies, a tail, two column chunks
  std::vector<T> p = random_vector<T>(C * D, 1.0), g = random_vector<T>(C * D, 1.0);
  std::vector<A> m = random_vector<A>(C * D, 0.1), v = random_vector<A>(C * D, 0.1, true);
  int64_t step[3] = {0, 7, 41};
  const bool active[3] = {true, false, true};
  const std::vector<T> p0 = p;
  const std::vector<A> m0 = m, v0 = v;
  mk::fl::adam_step_cpu<T>(p.data(), g.data(), m.data(), v.data(), step, active, C, D, hyper);
  CHECK(step[0] == 1 && step[1] == 7 && step[2] == 42, "step counts %lld %lld %lld", (long long)step[0],
        (long long)step[1], (long long)step[2]);
  const mk::fl::AdamConstants<A> k = mk::fl::adam_constants<A>(hyper);
  int64_t mismatched = 0, moved_inactive = 0;
  double worst = 0.0;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < D; ++j) {
      const int64_t at = c * D + j;
      if (!active[c]) {
        moved_inactive += !same_bits(p[at], p0[at]) || !same_bits(m[at], m0[at]) || !same_bits(v[at], v0[at]);
        continue;
      }
      A pe = A(mk::to_float(p0[at])), me = m0[at], ve = v0[at];
      mk::fl::adam_update(pe, A(mk::to_float(g[at])), me, ve, k, mk::fl::adam_row<A>(hyper, step[c]));
      mismatched += !same_bits(mk::from_float<T>(pe), p[at]) || !same_bits(me, m[at]) || !same_bits(ve, v[at]);
      // The formula in double, as a sanity check of the element function itself.
      const double t = double(step[c]), wd = hyper.weight_decay;
      const double gd = double(mk::to_float(g[at])) + wd * double(mk::to_float(p0[at]));
      const double md = hyper.beta1 * double(m0[at]) + (1 - hyper.beta1) * gd;
      const double vd = hyper.beta2 * double(v0[at]) + (1 - hyper.beta2) * gd * gd;
      const double denom = std::sqrt(vd) / std::sqrt(1 - std::pow(hyper.beta2, t)) + hyper.eps;
      const double pd = double(mk::to_float(p0[at])) - hyper.lr / (1 - std::pow(hyper.beta1, t)) * md / denom;
      worst = std::max(worst, std::fabs(pd - double(mk::to_float(p[at]))) / (std::fabs(pd) + hyper.lr));
    }
  CHECK(mismatched == 0, "%lld elements differ from adam_update", (long long)mismatched);
  CHECK(moved_inactive == 0, "%lld elements of the inactive row changed", (long long)moved_inactive);
  const double tolerance = sizeof(T) == 2 ? 1e-2 : 1e-5;
  CHECK(worst < tolerance, "adam vs the formula in double: %g", worst);
}

template <class T>
void test_sgd() {
  using A = mk::accum_t<T>;
  const int64_t C = 2, D = 1031;
  const mk::fl::SgdHyper hyper{0.1, 0.9, 0.0};
  std::vector<T> p = random_vector<T>(C * D, 1.0), g = random_vector<T>(C * D, 1.0);
  std::vector<A> buffer(C * D, A(0));
  const std::vector<T> p0 = p;
  const bool active[2] = {false, true};
  mk::fl::sgd_step_cpu<T>(p.data(), g.data(), buffer.data(), active, C, D, hyper);
  int64_t wrong = 0;
  for (int64_t j = 0; j < D; ++j) {
    wrong += !same_bits(p[j], p0[j]) || !same_bits(buffer[j], A(0));  // inactive: untouched
    const A gj = A(mk::to_float(g[D + j]));
    wrong += !same_bits(buffer[D + j], gj);  // a zero buffer: torch's first step, buf = grad
    const A expected = mk::fl::fused_multiply_add(gj, A(-hyper.lr), A(mk::to_float(p0[D + j])));
    wrong += !same_bits(p[D + j], mk::from_float<T>(expected));
  }
  CHECK(wrong == 0, "sgd: %lld wrong elements", (long long)wrong);
  // A second step reads the buffer: buf = 0.9 buf + g with the product rounded first.
  mk::fl::sgd_step_cpu<T>(p.data(), g.data(), buffer.data(), active, C, D, hyper);
  for (int64_t j = 0; j < D; ++j) {
    const A gj = A(mk::to_float(g[D + j]));
    const A scaled = gj * A(0.9);
    wrong += !same_bits(buffer[D + j], A(scaled + gj));
  }
  CHECK(wrong == 0, "sgd momentum: %lld wrong elements", (long long)wrong);
}

// The mean in federated.h's order: groups of kMeanGroup clients summed with fma, then the groups;
// the total weight in groups too.
template <class T>
void test_weighted_mean() {
  using A = mk::accum_t<T>;
  const int64_t C = 70, D = 301;
  std::vector<T> x = random_vector<T>(C * D, 1.0);
  std::vector<A> w(C);
  std::vector<char> mask(C);
  std::uniform_real_distribution<double> uniform(0.5, 1.5);
  bool active[70];
  for (int64_t c = 0; c < C; ++c) {
    w[c] = A(uniform(rng));
    active[c] = uniform(rng) < 1.2;
    if (!active[c])
      for (int64_t j = 0; j < D; ++j) x[c * D + j] = mk::from_float<T>(A(NAN));  // must not leak
  }
  std::vector<T> out(D);
  mk::fl::weighted_mean_cpu<T>(x.data(), w.data(), active, C, D, out.data());
  A total = 0;  // the group shares of the weight, in group order
  for (int64_t first = 0; first < C; first += mk::fl::kMeanGroup) {
    A share = 0;
    for (int64_t c = first; c < std::min(C, first + mk::fl::kMeanGroup); ++c)
      if (active[c]) share += w[c];
    total += share;
  }
  int64_t wrong = 0;
  for (int64_t j = 0; j < D; ++j) {
    A sum = 0;
    for (int64_t first = 0; first < C; first += mk::fl::kMeanGroup) {
      A group = 0;
      for (int64_t c = first; c < std::min(C, first + mk::fl::kMeanGroup); ++c)
        if (active[c]) group = mk::fl::fused_multiply_add(w[c], A(mk::to_float(x[c * D + j])), group);
      sum += group;
    }
    wrong += !same_bits(out[j], mk::from_float<T>(sum / total));
  }
  CHECK(wrong == 0, "weighted mean: %lld elements differ from the documented order", (long long)wrong);

  // No active client, or active weights that sum to zero: NaN everywhere.
  bool nobody[70] = {};
  mk::fl::weighted_mean_cpu<T>(x.data(), w.data(), nobody, C, D, out.data());
  int64_t finite = 0;
  for (int64_t j = 0; j < D; ++j) finite += std::isfinite(double(mk::to_float(out[j])));
  std::vector<A> zero(C, A(0));
  mk::fl::weighted_mean_cpu<T>(x.data(), zero.data(), active, C, D, out.data());
  for (int64_t j = 0; j < D; ++j) finite += std::isfinite(double(mk::to_float(out[j])));
  CHECK(finite == 0, "%lld finite outputs without active weight", (long long)finite);
}

}  // namespace

int main() {
  for (mk::CpuIsa isa : mk::supported_cpu_isas()) {  // every variant this CPU runs
  mk::set_cpu_isa(mk::cpu_isa_name(isa));
  std::printf("fl_core_tests: variant %s\n", mk::cpu_isa_name(mk::cpu_isa()));
  const mk::fl::AdamHyper defaults{1e-3, 0.9, 0.999, 1e-8, 0.0};
  const mk::fl::AdamHyper decayed{3e-3, 0.3, 0.99, 1e-6, 0.05};  // lerp's other form, L2 decay
  test_adam<float>(defaults);
  test_adam<float>(decayed);
  test_adam<double>(decayed);
  test_adam<mk::bf16_t>(defaults);
  test_adam<mk::half_t>(decayed);
  test_sgd<float>();
  test_sgd<double>();
  test_sgd<mk::bf16_t>();
  test_weighted_mean<float>();
  test_weighted_mean<double>();
  test_weighted_mean<mk::half_t>();
  }
  if (failures) {
    std::printf("fl_core_tests: %d failed checks\n", failures);
    return 1;
  }
  std::printf("fl_core_tests: all checks passed\n");
  return 0;
}
