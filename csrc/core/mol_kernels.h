// Fused passes of the multi-objective steps (MoCo's tracking fused with the Gram, and with the
// combination), CPU kernels. The tracking state Y is a stack with the structure of the gradient
// stack G, in G's accumulation type (float for 16/32-bit gradients, double for double).
#pragma once

#include "cpu_kernels.h"

namespace mk {

template <class T>
struct MutableStackView {
  T* const* data;
  const int64_t* cols;
  const int64_t* row_stride;
  int64_t num_blocks;
  int64_t K;
};

// Pass 1 of MoCo: y <- y - beta (y - g) in place, and out (K x K) = y y^T of the updated y. Each
// element of y is read and written once; the Gram costs no extra memory traffic.
template <class T>
void track_gram_cpu(const StackView<T>& g, const MutableStackView<accum_t<T>>& y, accum_t<T> beta, accum_t<T>* out);

// The 2K x 2K Gram of the rows [y; g], read only: with the norms of g (its diagonal) unknown
// until the pass ends, a normalised tracking update is applied in the second pass instead, and the
// Gram of the updated y follows from these blocks.
template <class T>
void joint_gram_cpu(const StackView<T>& g, const StackView<accum_t<T>>& y, accum_t<T>* out);

// Pass 2 of the normalised tracking: y <- y + beta (scale_k g_k - y) in place, then
// out_j (+)= alpha * sum_k weights[k] y_k, in one pass.
template <class T, class U>
void track_combine_cpu(const StackView<T>& g, const MutableStackView<accum_t<T>>& y, const accum_t<T>* scale,
                       accum_t<T> beta, const accum_t<T>* weights, U* const* out, accum_t<T> alpha, bool accumulate);

}  // namespace mk
