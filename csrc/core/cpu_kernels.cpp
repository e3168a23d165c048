#include "cpu_kernels.h"

#include <algorithm>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "convert.h"
#include "cpu_products.h"
#include "min_norm.h"
#include "simplex.h"

namespace mk {

using cpu::WorkItem;

template <class T>
void gram_cpu(const StackView<T>& g, accum_t<T>* out) {
  using A = accum_t<T>;
  const int64_t scratch = std::is_same_v<T, A> ? 0 : g.K * cpu::chunk_columns(g.K);
  auto rows = [&](const WorkItem& item, cpu::ItemRows<A>& r) { cpu::widened_rows(g, item, r.scratch.data(), r.rows.data()); };
  cpu::item_products<A>(cpu::work_items(g.cols, g.num_blocks, g.K), g.K, g.K, true, scratch, rows, rows, out);
}

template <class T>
void cross_gram_cpu(const StackView<T>& a, const StackView<T>& b, accum_t<T>* out) {
  using A = accum_t<T>;
  const int64_t scratch = std::is_same_v<T, A> ? 0 : a.K * cpu::chunk_columns(a.K);
  auto rows_a = [&](const WorkItem& item, cpu::ItemRows<A>& r) { cpu::widened_rows(a, item, r.scratch.data(), r.rows.data()); };
  auto rows_b = [&](const WorkItem& item, cpu::ItemRows<A>& r) { cpu::widened_rows(b, item, r.scratch.data(), r.rows.data()); };
  cpu::item_products<A>(cpu::work_items(a.cols, a.num_blocks, a.K), a.K, a.K, false, scratch, rows_a, rows_b, out);
}

template <class T, class U>
void combine_into_cpu(const StackView<T>& g, const accum_t<T>* weights, U* const* out, accum_t<T> alpha,
                      bool accumulate) {
  using A = accum_t<T>;
  auto row = [&](const WorkItem& item, int64_t k, int64_t c0, int64_t n, A* scratch) -> const A* {
    return cpu::widened_slice(g, item, k, c0, n, scratch);
  };
  cpu::combine_items<A, U>(cpu::work_items(g.cols, g.num_blocks, g.K), g.K, row, weights, out, alpha, accumulate);
}

template <class T>
void combine_cpu(const StackView<T>& g, const accum_t<T>* weights, T* const* out) {
  combine_into_cpu<T, T>(g, weights, out, accum_t<T>(1), false);
}

template <class T>
void project_simplex_cpu(const T* v, int64_t rows, int64_t K, T* out) {
#pragma omp parallel for schedule(static) if (rows * K > 4096)
  for (int64_t r = 0; r < rows; ++r) {
    const T* in_row = v + r * K;
    T* out_row = out + r * K;
    project_simplex_row(
        K, [&](int64_t i) { return double(to_float(in_row[i])); },
        [&](int64_t i, double x) { out_row[i] = from_float<T>(accum_t<T>(x)); });
  }
}

template <class T>
void min_norm_cpu(const T* gram, int64_t batch, int64_t K, T* out) {
  // Small problems stay on the calling thread (see item_products).
#pragma omp parallel if (batch > 1 && batch * K * K * K > (int64_t(1) << 18))
  {
    std::vector<double> work(min_norm_workspace(K));
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < batch; ++b) {
      const T* G = gram + b * K * K;
      T* lambda = out + b * K;
      min_norm_solve(
          K, [&](int64_t i, int64_t j) { return double(to_float(G[i * K + j])); },
          [&](int64_t i, double x) { lambda[i] = from_float<T>(accum_t<T>(x)); }, work.data());
    }
  }
}

int cpu_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

#define MK_INSTANTIATE(T)                                                                   \
  template void gram_cpu<T>(const StackView<T>&, accum_t<T>*);                              \
  template void cross_gram_cpu<T>(const StackView<T>&, const StackView<T>&, accum_t<T>*);   \
  template void combine_cpu<T>(const StackView<T>&, const accum_t<T>*, T* const*);          \
  template void combine_into_cpu<T, float>(const StackView<T>&, const accum_t<T>*, float* const*, accum_t<T>, bool); \
  template void combine_into_cpu<T, double>(const StackView<T>&, const accum_t<T>*, double* const*, accum_t<T>, bool); \
  template void combine_into_cpu<T, half_t>(const StackView<T>&, const accum_t<T>*, half_t* const*, accum_t<T>, bool); \
  template void combine_into_cpu<T, bf16_t>(const StackView<T>&, const accum_t<T>*, bf16_t* const*, accum_t<T>, bool); \
  template void project_simplex_cpu<T>(const T*, int64_t, int64_t, T*);                    \
  template void min_norm_cpu<T>(const T*, int64_t, int64_t, T*);
MK_INSTANTIATE(float)
MK_INSTANTIATE(double)
MK_INSTANTIATE(half_t)
MK_INSTANTIATE(bf16_t)
#undef MK_INSTANTIATE

}  // namespace mk
