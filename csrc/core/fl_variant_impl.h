// The bodies of the federated learning CPU kernels, compiled once per variant by
// fl_variant_<isa>.cpp inside namespace mk::fl::MK_VARIANT_NS (see cpu_variant.h). Work items are
// (active client, column chunk) pairs: every element of an active row is read and written once, and
// an inactive row is never touched; items are claimed dynamically (each writes only its own
// elements, so the schedule never changes a bit).
//
// Bytes per call (C clients, a active, D columns, b bytes per element, state in 4-byte floats):
// Adam reads p, g, m, v and writes p, m, v of the active rows, a D (3 b + 4 * 4) bytes; SGD a D
// (3 b) (+ 8 with momentum); the mean reads C D b and writes D b. The floor is those bytes at the
// stream bandwidth (bench fl_adam measures it in the same run).
//
// GCC contracts a product and a later addition into an fma across statements (-ffp-contract=fast),
// which would round differently from torch.optim; the element math of federated.h places every
// fma explicitly, so the variant files turn contraction off (#pragma GCC optimize before any code).
#pragma once

#ifndef MK_VARIANT_NS
#error "fl_variant_impl.h is compiled through an fl_variant_<isa>.cpp"
#endif

namespace mk {
namespace fl {
namespace MK_VARIANT_NS {
namespace {

constexpr int64_t kColumnChunk = 4096;  // columns of an Adam/SGD work item (~100 KiB of traffic)
constexpr int64_t kMeanColumns = 256;   // columns of a mean work item: its sums stay in L1
constexpr int64_t kParallelElements = 1 << 15;  // below this, an OpenMP team costs more than it saves

std::vector<int64_t> active_rows(const bool* active, int64_t C) {
  std::vector<int64_t> rows;
  for (int64_t c = 0; c < C; ++c)
    if (active[c]) rows.push_back(c);
  return rows;
}

// fn(client, first column, columns) for every chunk of every listed row.
template <class Fn>
void for_each_chunk(const std::vector<int64_t>& rows, int64_t D, Fn&& fn) {
  const int64_t chunks = (D + kColumnChunk - 1) / kColumnChunk;
  const int64_t items = int64_t(rows.size()) * chunks;
#pragma omp parallel for schedule(dynamic, 1) if (items > 1 && int64_t(rows.size()) * D > kParallelElements)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t col0 = (item % chunks) * kColumnChunk;
    fn(rows[item / chunks], col0, std::min(kColumnChunk, D - col0));
  }
}

template <class T, class A>
void adam_chunk(T* __restrict p, const T* __restrict g, A* __restrict m, A* __restrict v, int64_t n,
                const AdamConstants<A> k, const AdamRow<A> row) {
  for (int64_t j = 0; j < n; ++j) {
    A value = A(to_float(p[j]));
    adam_update(value, A(to_float(g[j])), m[j], v[j], k, row);
    p[j] = from_float<T>(value);
  }
}

template <class T, class A>
void sgd_chunk(T* __restrict p, const T* __restrict g, A* __restrict buffer, int64_t n, const SgdConstants<A> k) {
  if (buffer == nullptr) {
    for (int64_t j = 0; j < n; ++j) {
      A value = A(to_float(p[j]));
      sgd_update<A>(value, A(to_float(g[j])), nullptr, k);
      p[j] = from_float<T>(value);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      A value = A(to_float(p[j]));
      sgd_update<A>(value, A(to_float(g[j])), buffer + j, k);
      p[j] = from_float<T>(value);
    }
  }
}

}  // namespace

template <class T>
void adam_step_cpu(T* params, const T* grads, accum_t<T>* exp_avg, accum_t<T>* exp_avg_sq, int64_t* step,
                   const bool* active, int64_t C, int64_t D, const AdamHyper& hyper) {
  using A = accum_t<T>;
  const std::vector<int64_t> rows = active_rows(active, C);
  const AdamConstants<A> k = adam_constants<A>(hyper);
  for_each_chunk(rows, D, [&](int64_t c, int64_t col0, int64_t n) {
    const int64_t at = c * D + col0;
    adam_chunk<T, A>(params + at, grads + at, exp_avg + at, exp_avg_sq + at, n, k, adam_row<A>(hyper, step[c] + 1));
  });
  for (int64_t c : rows) step[c] += 1;
}

template <class T>
void sgd_step_cpu(T* params, const T* grads, accum_t<T>* momentum_buffer, const bool* active, int64_t C, int64_t D,
                  const SgdHyper& hyper) {
  using A = accum_t<T>;
  const SgdConstants<A> k = sgd_constants<A>(hyper);
  for_each_chunk(active_rows(active, C), D, [&](int64_t c, int64_t col0, int64_t n) {
    const int64_t at = c * D + col0;
    sgd_chunk<T, A>(params + at, grads + at, momentum_buffer ? momentum_buffer + at : nullptr, n, k);
  });
}

template <class T>
void weighted_mean_cpu(const T* x, const accum_t<T>* weights, const bool* active, int64_t C, int64_t D, T* out) {
  using A = accum_t<T>;
  A total = 0;
  for (int64_t first = 0; first < C; first += kMeanGroup)
    total += group_weight(weights, active, first, std::min(C, first + kMeanGroup));
  const int64_t items = (D + kMeanColumns - 1) / kMeanColumns;
#pragma omp parallel for schedule(dynamic, 4) if (items > 1 && C * D > kParallelElements)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t col0 = item * kMeanColumns, n = std::min(kMeanColumns, D - col0);
    A sum[kMeanColumns] = {}, group[kMeanColumns];
    for (int64_t first = 0; first < C; first += kMeanGroup) {
      std::fill(group, group + n, A(0));
      for (int64_t c = first; c < std::min(C, first + kMeanGroup); ++c) {
        if (!active[c]) continue;
        const A w = weights[c];
        const T* row = x + c * D + col0;
        for (int64_t j = 0; j < n; ++j) group[j] = weighted_term(group[j], w, A(to_float(row[j])));
      }
      for (int64_t j = 0; j < n; ++j) sum[j] += group[j];
    }
    for (int64_t j = 0; j < n; ++j) out[col0 + j] = from_float<T>(mean_or_nan(sum[j], total));
  }
}

#define MK_INSTANTIATE(T)                                                                                         \
  template void adam_step_cpu<T>(T*, const T*, accum_t<T>*, accum_t<T>*, int64_t*, const bool*, int64_t, int64_t, \
                                 const AdamHyper&);                                                              \
  template void sgd_step_cpu<T>(T*, const T*, accum_t<T>*, const bool*, int64_t, int64_t, const SgdHyper&);       \
  template void weighted_mean_cpu<T>(const T*, const accum_t<T>*, const bool*, int64_t, int64_t, T*);
MK_INSTANTIATE(float)
MK_INSTANTIATE(double)
MK_INSTANTIATE(half_t)
MK_INSTANTIATE(bf16_t)
#undef MK_INSTANTIATE

}  // namespace MK_VARIANT_NS
}  // namespace fl
}  // namespace mk
