#include "cpu_kernels.h"

#include <algorithm>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "convert.h"
#include "cpu_variant.h"
#include "min_norm.h"
#include "simplex.h"

namespace mk {

// The vectorised kernels: the variant of cpu_isa() (cpu_variant.h).
template <class T>
void gram_cpu(const StackView<T>& g, accum_t<T>* out) {
  MK_CPU_DISPATCH(gram_cpu<T>(g, out));
}

template <class T>
void cross_gram_cpu(const StackView<T>& a, const StackView<T>& b, accum_t<T>* out) {
  MK_CPU_DISPATCH(cross_gram_cpu<T>(a, b, out));
}

template <class T, class U>
void combine_into_cpu(const StackView<T>& g, const accum_t<T>* weights, U* const* out, accum_t<T> alpha,
                      bool accumulate) {
  MK_CPU_DISPATCH(combine_into_cpu<T, U>(g, weights, out, alpha, accumulate));
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
  // Small problems stay on the calling thread: waking a team costs more than it saves.
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
