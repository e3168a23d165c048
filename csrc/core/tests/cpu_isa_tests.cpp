// The CPU kernels' instruction-set variants: every variant this CPU runs, against double sums for
// K = 1, 3, 33, 64 and d = 1, 17, 100003; bitwise determinism within a variant (repeats, 1 and 2
// threads); the errors for an unknown variant and for one the CPU lacks.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "check.h"
#include "cpu_isa.h"
#include "cpu_kernels.h"
#include "mol_kernels.h"

namespace {

std::mt19937_64 rng(7);

void set_threads(int n) {
#ifdef _OPENMP
  omp_set_num_threads(n);
#else
  (void)n;
#endif
}

struct Result {
  std::vector<float> gram, cross, combined, tracked;
  bool operator==(const Result& o) const {
    auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
      return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
    };
    return same(gram, o.gram) && same(cross, o.cross) && same(combined, o.combined) && same(tracked, o.tracked);
  }
};

Result run(const std::vector<float>& a, const std::vector<float>& b, const std::vector<float>& w, int64_t K, int64_t d) {
  Result r;
  const float* pa = a.data();
  const float* pb = b.data();
  mk::StackView<float> va{&pa, &d, &d, 1, K}, vb{&pb, &d, &d, 1, K};
  r.gram.assign(K * K, NAN);
  r.cross.assign(K * K, NAN);
  r.combined.assign(d, NAN);
  mk::gram_cpu(va, r.gram.data());
  mk::cross_gram_cpu(va, vb, r.cross.data());
  float* out = r.combined.data();
  mk::combine_cpu(va, w.data(), &out);
  std::vector<float> y = b;  // MoCo's tracking pass on a copy
  float* py = y.data();
  mk::MutableStackView<float> vy{&py, &d, &d, 1, K};
  r.tracked.assign(K * K, NAN);
  mk::track_gram_cpu(va, vy, 0.25f, r.tracked.data());
  return r;
}

void test_variant(mk::CpuIsa isa) {
  mk::set_cpu_isa(mk::cpu_isa_name(isa));
  CHECK(mk::cpu_isa() == isa, "set_cpu_isa(%s)", mk::cpu_isa_name(isa));
  std::normal_distribution<float> normal;
  for (int64_t K : {1, 3, 33, 64}) {
    for (int64_t d : {1, 17, 100003}) {
      std::vector<float> a(K * d), b(K * d), w(K);
      for (auto& x : a) x = normal(rng);
      for (auto& x : b) x = normal(rng);
      for (auto& x : w) x = normal(rng);
      set_threads(2);
      const Result r = run(a, b, w, K, d);
      CHECK(run(a, b, w, K, d) == r, "%s K=%lld d=%lld: two runs differ", mk::cpu_isa_name(isa), (long long)K, (long long)d);
      set_threads(1);
      CHECK(run(a, b, w, K, d) == r, "%s K=%lld d=%lld: 1 and 2 threads differ", mk::cpu_isa_name(isa), (long long)K,
            (long long)d);
      set_threads(2);
      double worst = 0.0, worst_c = 0.0, worst_t = 0.0;
      for (int64_t i = 0; i < K; ++i) {
        for (int64_t j = 0; j < K; ++j) {
          double g = 0, c = 0, t = 0, ni = 0, nj = 0, nbj = 0, nti = 0, ntj = 0;
          for (int64_t x = 0; x < d; ++x) {
            const double ai = a[i * d + x], aj = a[j * d + x], bj = b[j * d + x];
            const double ti = b[i * d + x] - 0.25f * (b[i * d + x] - a[i * d + x]);
            const double tj = b[j * d + x] - 0.25f * (b[j * d + x] - a[j * d + x]);
            g += ai * aj, c += ai * bj, t += ti * tj;
            ni += ai * ai, nj += aj * aj, nbj += bj * bj, nti += ti * ti, ntj += tj * tj;
          }
          worst = std::max(worst, std::fabs(r.gram[i * K + j] - g) / std::sqrt(ni * nj));
          worst_c = std::max(worst_c, std::fabs(r.cross[i * K + j] - c) / std::sqrt(ni * nbj));
          worst_t = std::max(worst_t, std::fabs(r.tracked[i * K + j] - t) / std::sqrt(nti * ntj));
          CHECK(r.gram[i * K + j] == r.gram[j * K + i], "gram exactly symmetric");
        }
      }
      double worst_w = 0.0;
      for (int64_t x = 0; x < d; ++x) {
        double e = 0, m = 0;
        for (int64_t k = 0; k < K; ++k) e += double(w[k]) * a[k * d + x], m += std::fabs(double(w[k]) * a[k * d + x]);
        worst_w = std::max(worst_w, std::fabs(r.combined[x] - e) / m);
      }
      CHECK(worst < 1e-5 && worst_c < 1e-5 && worst_t < 1e-5 && worst_w < 1e-5,
            "%s K=%lld d=%lld: errors gram %g cross %g track %g combine %g", mk::cpu_isa_name(isa), (long long)K,
            (long long)d, worst, worst_c, worst_t, worst_w);
    }
  }
}

void expect_error(const std::string& name, const std::string& needle) {
  const mk::CpuIsa before = mk::cpu_isa();
  try {
    mk::set_cpu_isa(name);
    CHECK(false, "set_cpu_isa(%s) did not throw", name.c_str());
  } catch (const std::runtime_error& error) {
    CHECK(std::string(error.what()).find(needle) != std::string::npos, "set_cpu_isa(%s): '%s' lacks '%s'", name.c_str(),
          error.what(), needle.c_str());
  }
  CHECK(mk::cpu_isa() == before, "a failed switch leaves the variant");
}

}  // namespace

int main() {
  if (const char* env = std::getenv("MOLKERNELS_CPU_ISA")) {  // the first call resolves the variable
    try {
      std::printf("cpu_isa_tests: resolved from MOLKERNELS_CPU_ISA=%s: %s\n", env, mk::cpu_isa_name(mk::cpu_isa()));
    } catch (const std::runtime_error& error) {
      std::printf("cpu_isa_tests: error: %s\n", error.what());
      return 1;
    }
  }
  const std::vector<mk::CpuIsa> isas = mk::supported_cpu_isas();
  std::printf("cpu_isa_tests: variants");
  for (mk::CpuIsa isa : isas) std::printf(" %s", mk::cpu_isa_name(isa));
  std::printf(" (default %s)\n", mk::cpu_isa_name(mk::cpu_isa()));
  CHECK(isas.front() == mk::CpuIsa::baseline, "the baseline is always there");
  for (mk::CpuIsa isa : isas) test_variant(isa);
  expect_error("sse9", "unknown CPU variant");
  for (mk::CpuIsa isa : {mk::CpuIsa::avx2, mk::CpuIsa::avx512}) {
    const std::string missing = mk::cpu_isa_missing(isa);
    if (!missing.empty()) expect_error(mk::cpu_isa_name(isa), "this CPU lacks " + missing.substr(0, missing.find(',')));
  }
  mk::set_cpu_isa("auto");
  CHECK(mk::cpu_isa() == isas.back(), "auto is the fastest supported variant");
  if (failures) {
    std::printf("cpu_isa_tests: %d failed checks\n", failures);
    return 1;
  }
  std::printf("cpu_isa_tests: all checks passed\n");
  return 0;
}
