#include "mol_kernels.h"

#include "convert.h"
#include "cpu_products.h"

namespace mk {

using cpu::WorkItem;

namespace {

template <class A>
A* state_row(const MutableStackView<A>& y, const WorkItem& item, int64_t k) {
  return y.data[item.block] + k * y.row_stride[item.block] + item.col0;
}

}  // namespace

template <class T>
void track_gram_cpu(const StackView<T>& g, const MutableStackView<accum_t<T>>& y, accum_t<T> beta, accum_t<T>* out) {
  using A = accum_t<T>;
  auto tracked_rows = [&](const WorkItem& item, cpu::ItemRows<A>& rows) {
    for (int64_t k = 0; k < g.K; ++k) {
      const T* src = g.data[item.block] + k * g.row_stride[item.block] + item.col0;
      A* yk = state_row(y, item, k);
      for (int64_t c = 0; c < item.n; ++c) yk[c] -= beta * (yk[c] - A(to_float(src[c])));
      rows.rows[k] = yk;
    }
  };
  cpu::item_products<A>(cpu::work_items(g.cols, g.num_blocks, g.K), g.K, g.K, true, 0, tracked_rows, tracked_rows,
                        out);
}

template <class T>
void joint_gram_cpu(const StackView<T>& g, const StackView<accum_t<T>>& y, accum_t<T>* out) {
  using A = accum_t<T>;
  const int64_t K = g.K;
  auto joint_rows = [&](const WorkItem& item, cpu::ItemRows<A>& rows) {
    for (int64_t k = 0; k < K; ++k) {
      rows.rows[k] = y.data[item.block] + k * y.row_stride[item.block] + item.col0;
      rows.rows[K + k] = cpu::widened_slice(g, item, k, 0, item.n, rows.scratch.data() + k * item.n);
    }
  };
  const int64_t scratch = std::is_same_v<T, A> ? 0 : K * cpu::chunk_columns(K);
  cpu::item_products<A>(cpu::work_items(g.cols, g.num_blocks, K), 2 * K, 2 * K, true, scratch, joint_rows, joint_rows,
                        out);
}

template <class T, class U>
void track_combine_cpu(const StackView<T>& g, const MutableStackView<accum_t<T>>& y, const accum_t<T>* scale,
                       accum_t<T> beta, const accum_t<T>* weights, U* const* out, accum_t<T> alpha, bool accumulate) {
  using A = accum_t<T>;
  auto tracked_row = [&](const WorkItem& item, int64_t k, int64_t c0, int64_t n, A* scratch) -> const A* {
    const A* gk = cpu::widened_slice(g, item, k, c0, n, scratch);
    A* yk = state_row(y, item, k) + c0;
    const A sk = scale[k];
    for (int64_t c = 0; c < n; ++c) yk[c] += beta * (sk * gk[c] - yk[c]);
    return yk;
  };
  cpu::combine_items<A, U>(cpu::work_items(g.cols, g.num_blocks, g.K), g.K, tracked_row, weights, out, alpha,
                           accumulate);
}

#define MK_INSTANTIATE_OUT(T, U)                                                                               \
  template void track_combine_cpu<T, U>(const StackView<T>&, const MutableStackView<accum_t<T>>&,              \
                                        const accum_t<T>*, accum_t<T>, const accum_t<T>*, U* const*, accum_t<T>, \
                                        bool);
#define MK_INSTANTIATE(T)                                                                                         \
  template void track_gram_cpu<T>(const StackView<T>&, const MutableStackView<accum_t<T>>&, accum_t<T>, accum_t<T>*); \
  template void joint_gram_cpu<T>(const StackView<T>&, const StackView<accum_t<T>>&, accum_t<T>*);                \
  MK_INSTANTIATE_OUT(T, float)                                                                                    \
  MK_INSTANTIATE_OUT(T, double)                                                                                   \
  MK_INSTANTIATE_OUT(T, half_t)                                                                                   \
  MK_INSTANTIATE_OUT(T, bf16_t)
MK_INSTANTIATE(float)
MK_INSTANTIATE(double)
MK_INSTANTIATE(half_t)
MK_INSTANTIATE(bf16_t)
#undef MK_INSTANTIATE
#undef MK_INSTANTIATE_OUT

}  // namespace mk
