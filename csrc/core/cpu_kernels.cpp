#include "cpu_kernels.h"

#include <algorithm>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "convert.h"
#include "min_norm.h"
#include "simplex.h"

namespace mk {
namespace {

// Register tile: 4 x 4 dot products of 64-byte vectors, 16 accumulators plus 8 operands, which
// fits the 32 vector registers of AVX-512 (with AVX2 the compiler splits each vector in two).
constexpr int kTileRows = 4;
constexpr int kVectorBytes = 64;

// Columns per work item: as many as keep the item's K rows (widened to float) within ~256 KiB,
// so the passes over the item after the first are served by L2. A function of K only.
int64_t chunk_columns(int64_t K) {
  const int64_t cols = (int64_t(1) << 16) / std::max<int64_t>(K, 1);
  return std::clamp<int64_t>(cols / 64 * 64, 256, 8192);
}

template <class V, class S>
V load_vector_unaligned(const S* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// out[r][s] += dot(a[r][0:n], b[s][0:n]) for a 4 x 4 tile of rows, in the accumulation type A.
template <class A>
void tile_dots(const A* const* a, const A* const* b, int64_t n, A out[kTileRows][kTileRows]) {
  typedef A vec __attribute__((vector_size(kVectorBytes)));
  constexpr int64_t width = kVectorBytes / sizeof(A);
  vec acc[kTileRows][kTileRows] = {};
  int64_t c = 0;
  for (; c + width <= n; c += width) {
    vec av[kTileRows], bv[kTileRows];
    for (int r = 0; r < kTileRows; ++r) av[r] = load_vector_unaligned<vec>(a[r] + c);
    for (int s = 0; s < kTileRows; ++s) bv[s] = load_vector_unaligned<vec>(b[s] + c);
    for (int r = 0; r < kTileRows; ++r)
      for (int s = 0; s < kTileRows; ++s) acc[r][s] += av[r] * bv[s];
  }
  for (int r = 0; r < kTileRows; ++r) {
    for (int s = 0; s < kTileRows; ++s) {
      A total = 0;
      for (int64_t l = 0; l < width; ++l) total += acc[r][s][l];
      for (int64_t t = c; t < n; ++t) total += a[r][t] * b[s][t];
      out[r][s] += total;
    }
  }
}

// One work item: columns [col0, col0 + n) of one block.
struct WorkItem {
  int64_t block, col0, n;
};

template <class T>
std::vector<WorkItem> work_items(const StackView<T>& g) {
  const int64_t chunk = chunk_columns(g.K);
  std::vector<WorkItem> items;
  for (int64_t j = 0; j < g.num_blocks; ++j)
    for (int64_t c = 0; c < g.cols[j]; c += chunk) items.push_back({j, c, std::min(chunk, g.cols[j] - c)});
  return items;
}

// Row pointers of one work item in the accumulation type: straight into the data for float and
// double, else widened into `scratch`. Rows past K point to `zeros`, which pads the last tile.
template <class T>
void item_rows(const StackView<T>& g, const WorkItem& item, int64_t padded_rows, std::vector<accum_t<T>>& scratch,
               const std::vector<accum_t<T>>& zeros, std::vector<const accum_t<T>*>& rows) {
  using A = accum_t<T>;
  rows.assign(padded_rows, zeros.data());
  for (int64_t r = 0; r < g.K; ++r) {
    const T* src = g.data[item.block] + r * g.row_stride[item.block] + item.col0;
    if constexpr (std::is_same_v<T, A>) {
      rows[r] = src;
    } else {
      A* dst = scratch.data() + r * item.n;
      for (int64_t c = 0; c < item.n; ++c) dst[c] = to_float(src[c]);
      rows[r] = dst;
    }
  }
}

// Sum of A B^T over all columns: the items are split into at most kGroups contiguous groups (a
// function of the item count only); each group sums its items' partials in order in double, and
// the groups are added in order. `symmetric` computes only tiles on or above the diagonal.
template <class T>
void stack_products(const StackView<T>& a, const StackView<T>* b, accum_t<T>* out) {
  using A = accum_t<T>;
  constexpr int64_t kGroups = 64;
  const int64_t K = a.K;
  const int64_t tiles = (K + kTileRows - 1) / kTileRows;
  const int64_t padded = tiles * kTileRows;
  const std::vector<WorkItem> items = work_items(a);
  const int64_t num_items = int64_t(items.size());
  const int64_t groups = std::min<int64_t>(kGroups, num_items);
  std::vector<double> group_sums(std::max<int64_t>(groups, 1) * K * K, 0.0);
  const int64_t chunk = chunk_columns(K);

#pragma omp parallel
  {
    std::vector<A> zeros(chunk, A(0)), scratch_a, scratch_b;
    if constexpr (!std::is_same_v<T, A>) {
      scratch_a.resize(K * chunk);
      if (b) scratch_b.resize(K * chunk);
    }
    std::vector<const A*> rows_a, rows_b;
    std::vector<A> item_sum(padded * padded);
#pragma omp for schedule(dynamic, 1)
    for (int64_t group = 0; group < groups; ++group) {
      double* sums = group_sums.data() + group * K * K;
      const int64_t first = group * num_items / groups, last = (group + 1) * num_items / groups;
      for (int64_t i = first; i < last; ++i) {
        item_rows(a, items[i], padded, scratch_a, zeros, rows_a);
        if (b) item_rows(*b, items[i], padded, scratch_b, zeros, rows_b);
        const std::vector<const A*>& rb = b ? rows_b : rows_a;
        std::fill(item_sum.begin(), item_sum.end(), A(0));
        for (int64_t ti = 0; ti < tiles; ++ti) {
          for (int64_t tj = b ? 0 : ti; tj < tiles; ++tj) {
            A tile[kTileRows][kTileRows] = {};
            tile_dots(rows_a.data() + ti * kTileRows, rb.data() + tj * kTileRows, items[i].n, tile);
            for (int r = 0; r < kTileRows; ++r)
              for (int s = 0; s < kTileRows; ++s) item_sum[(ti * kTileRows + r) * padded + tj * kTileRows + s] = tile[r][s];
          }
        }
        for (int64_t r = 0; r < K; ++r)
          for (int64_t s = b ? 0 : r; s < K; ++s) sums[r * K + s] += double(item_sum[r * padded + s]);
      }
    }
  }
  for (int64_t r = 0; r < K; ++r) {
    for (int64_t s = b ? 0 : r; s < K; ++s) {
      double total = 0.0;
      for (int64_t group = 0; group < groups; ++group) total += group_sums[group * K * K + r * K + s];
      out[r * K + s] = A(total);
      if (!b) out[s * K + r] = A(total);
    }
  }
}

}  // namespace

template <class T>
void gram_cpu(const StackView<T>& g, accum_t<T>* out) {
  stack_products<T>(g, nullptr, out);
}

template <class T>
void cross_gram_cpu(const StackView<T>& a, const StackView<T>& b, accum_t<T>* out) {
  stack_products<T>(a, &b, out);
}

template <class T>
void combine_cpu(const StackView<T>& g, const accum_t<T>* weights, T* const* out) {
  using A = accum_t<T>;
  const std::vector<WorkItem> items = work_items(g);
  const int64_t chunk = chunk_columns(g.K);
#pragma omp parallel
  {
    std::vector<A> acc(chunk);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < int64_t(items.size()); ++i) {
      const WorkItem& item = items[i];
      const int64_t n = item.n;
      const T* base = g.data[item.block] + item.col0;
      const int64_t stride = g.row_stride[item.block];
      A* dst = acc.data();
      const A w0 = weights[0];
      for (int64_t c = 0; c < n; ++c) dst[c] = w0 * A(to_float(base[c]));
      for (int64_t k = 1; k < g.K; ++k) {
        const T* row = base + k * stride;
        const A wk = weights[k];
        for (int64_t c = 0; c < n; ++c) dst[c] += wk * A(to_float(row[c]));
      }
      T* o = out[item.block] + item.col0;
      for (int64_t c = 0; c < n; ++c) o[c] = from_float<T>(dst[c]);
    }
  }
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
#pragma omp parallel if (batch > 1)
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
  template void project_simplex_cpu<T>(const T*, int64_t, int64_t, T*);                    \
  template void min_norm_cpu<T>(const T*, int64_t, int64_t, T*);
MK_INSTANTIATE(float)
MK_INSTANTIATE(double)
MK_INSTANTIATE(half_t)
MK_INSTANTIATE(bf16_t)
#undef MK_INSTANTIATE

}  // namespace mk
