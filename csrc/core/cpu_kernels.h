// CPU kernels of the core ops on raw pointers (OpenMP, vectorised). No torch headers: CMake builds
// and tests this part alone.
//
// A gradient stack is a list of blocks; block j is K rows of cols[j] contiguous elements, row r
// starting at data[j] + r * row_stride[j]. Results never depend on the number of threads: the
// columns are cut into fixed work items whose partial sums are added in a fixed order.
#pragma once

#include <cstdint>

#include "platform.h"

namespace mk {

template <class T>
struct StackView {
  const T* const* data;       // one pointer per block
  const int64_t* cols;        // columns per block
  const int64_t* row_stride;  // elements between rows, per block
  int64_t num_blocks;
  int64_t K;
};

// out[K*K] = sum over blocks of A B^T (row-major). For gram, pass a == b; only the upper triangle
// is computed and mirrored, so the result is exactly symmetric.
template <class T>
void gram_cpu(const StackView<T>& g, accum_t<T>* out);
template <class T>
void cross_gram_cpu(const StackView<T>& a, const StackView<T>& b, accum_t<T>* out);

// out_j = sum_k weights[k] * block_j[k, :], accumulated in accum_t<T>; out[j] has cols[j] elements.
template <class T>
void combine_cpu(const StackView<T>& g, const accum_t<T>* weights, T* const* out);

// out_j = alpha * sum_k weights[k] * block_j[k, :] (accumulate = false), or out_j += that
// (accumulate = true, e.g. p <- p - lr d with alpha = -lr); out may have another dtype than g.
template <class T, class U>
void combine_into_cpu(const StackView<T>& g, const accum_t<T>* weights, U* const* out, accum_t<T> alpha,
                      bool accumulate);

// Row-wise simplex projection of a contiguous [rows, K] array.
template <class T>
void project_simplex_cpu(const T* v, int64_t rows, int64_t K, T* out);

// Batched min-norm weights: gram is a contiguous [batch, K, K] array, out is [batch, K].
template <class T>
void min_norm_cpu(const T* gram, int64_t batch, int64_t K, T* out);

// Threads the CPU kernels use (OpenMP's maximum, 1 without OpenMP).
int cpu_threads();

}  // namespace mk
