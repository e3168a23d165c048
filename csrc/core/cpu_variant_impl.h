// The bodies of the vectorised CPU kernels (gram, cross_gram, combine, MoCo's fused passes), compiled
// once per variant by cpu_variant_<isa>.cpp inside namespace mk::MK_VARIANT_NS (see cpu_products.h).
#pragma once

#include "cpu_products.h"

namespace mk {
namespace MK_VARIANT_NS {

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

#define MK_INSTANTIATE_OUT(T, U)                                                                                  \
  template void combine_into_cpu<T, U>(const StackView<T>&, const accum_t<T>*, U* const*, accum_t<T>, bool);       \
  template void track_combine_cpu<T, U>(const StackView<T>&, const MutableStackView<accum_t<T>>&,                 \
                                        const accum_t<T>*, accum_t<T>, const accum_t<T>*, U* const*, accum_t<T>,    \
                                        bool);
#define MK_INSTANTIATE(T)                                                                                         \
  template void gram_cpu<T>(const StackView<T>&, accum_t<T>*);                                                    \
  template void cross_gram_cpu<T>(const StackView<T>&, const StackView<T>&, accum_t<T>*);                         \
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

}  // namespace MK_VARIANT_NS
}  // namespace mk
