// Internal to the CPU kernels: the work split and the register-tiled products that gram,
// cross_gram and the fused multi-objective passes share.
//
// The columns of a stack are cut into work items of a fixed width (a function of K only), so that
// results never depend on the number of threads. Each item's rows are prepared once (widened to
// the accumulation type, or updated in place as in MoCo's tracking) and multiplied in 4 x 4 register
// tiles while they sit in L2; the items' partial sums are added in double in a fixed order.
#pragma once

#include <algorithm>
#include <cstring>
#include <vector>

#include "convert.h"
#include "cpu_kernels.h"

namespace mk {
namespace cpu {

// Register tile: 4 x 4 dot products of 64-byte vectors, 16 accumulators plus 8 operands, which
// fits the 32 vector registers of AVX-512 (with AVX2 the compiler splits each vector in two).
constexpr int kTileRows = 4;
constexpr int kVectorBytes = 64;

// Columns per work item: as many as keep the item's K rows (widened to float) within ~256 KiB,
// so the passes over the item after the first are served by L2.
inline int64_t chunk_columns(int64_t K) {
  const int64_t cols = (int64_t(1) << 16) / std::max<int64_t>(K, 1);
  return std::clamp<int64_t>(cols / 64 * 64, 256, 8192);
}

struct WorkItem {
  int64_t block, col0, n;  // columns [col0, col0 + n) of one block
};

inline std::vector<WorkItem> work_items(const int64_t* cols, int64_t num_blocks, int64_t K) {
  const int64_t chunk = chunk_columns(K);
  std::vector<WorkItem> items;
  for (int64_t j = 0; j < num_blocks; ++j)
    for (int64_t c = 0; c < cols[j]; c += chunk) items.push_back({j, c, std::min(chunk, cols[j] - c)});
  return items;
}

template <class V, class S>
V load_vector_unaligned(const S* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// out[r][s] = dot(a[r][0:n], b[s][0:n]) for a 4 x 4 tile of rows, in the accumulation type A.
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
      out[r][s] = total;
    }
  }
}

// The same for a diagonal tile of a symmetric product (b = a): only the 10 dot products with
// r <= s, mirrored, which saves 6 of 16 FMAs per column on the diagonal tiles.
template <class A>
void diagonal_tile_dots(const A* const* a, int64_t n, A out[kTileRows][kTileRows]) {
  typedef A vec __attribute__((vector_size(kVectorBytes)));
  constexpr int64_t width = kVectorBytes / sizeof(A);
  vec acc[kTileRows][kTileRows] = {};
  int64_t c = 0;
  for (; c + width <= n; c += width) {
    vec av[kTileRows];
    for (int r = 0; r < kTileRows; ++r) av[r] = load_vector_unaligned<vec>(a[r] + c);
    for (int r = 0; r < kTileRows; ++r)
      for (int s = r; s < kTileRows; ++s) acc[r][s] += av[r] * av[s];
  }
  for (int r = 0; r < kTileRows; ++r) {
    for (int s = r; s < kTileRows; ++s) {
      A total = 0;
      for (int64_t l = 0; l < width; ++l) total += acc[r][s][l];
      for (int64_t t = c; t < n; ++t) total += a[r][t] * a[s][t];
      out[r][s] = out[s][r] = total;
    }
  }
}

// Columns [c0, c0 + n) of row k of an item in the accumulation type: a pointer into the data for
// float and double, else widened into `scratch`.
template <class T>
const accum_t<T>* widened_slice(const StackView<T>& g, const WorkItem& item, int64_t k, int64_t c0, int64_t n,
                                accum_t<T>* scratch) {
  const T* src = g.data[item.block] + k * g.row_stride[item.block] + item.col0 + c0;
  if constexpr (std::is_same_v<T, accum_t<T>>) {
    return src;
  } else {
    for (int64_t c = 0; c < n; ++c) scratch[c] = to_float(src[c]);
    return scratch;
  }
}

// Row pointers of one work item in the accumulation type, rows [0, K) of `g` (scratch: K x n).
template <class T>
void widened_rows(const StackView<T>& g, const WorkItem& item, accum_t<T>* scratch, const accum_t<T>** rows) {
  for (int64_t r = 0; r < g.K; ++r) rows[r] = widened_slice(g, item, r, 0, item.n, scratch + r * item.n);
}

// Per-thread memory of a products pass: the rows of the current item and room to widen them.
template <class A>
struct ItemRows {
  std::vector<A> scratch;
  std::vector<const A*> rows;
};

// out (R_a x R_b, row-major) = sum over items of A_item B_item^T, where prepare_a(item, rows_a)
// and prepare_b(item, rows_b) fill the item's row pointers (rows_a: R_a rows of item.n values).
// With `symmetric`, B = A, prepare_b is not called, only the upper triangle is computed and the
// result is mirrored, so it is exactly symmetric. prepare_a runs exactly once per item, which
// lets it update rows in place.
template <class A, class PrepareA, class PrepareB>
void item_products(const std::vector<WorkItem>& items, int64_t rows_a, int64_t rows_b, bool symmetric,
                   int64_t scratch_per_thread, PrepareA prepare_a, PrepareB prepare_b, A* out) {
  constexpr int64_t kGroups = 64;
  const int64_t tiles_a = (rows_a + kTileRows - 1) / kTileRows, tiles_b = (rows_b + kTileRows - 1) / kTileRows;
  const int64_t padded_a = tiles_a * kTileRows, padded_b = tiles_b * kTileRows;
  const int64_t num_items = int64_t(items.size());
  const int64_t groups = std::min<int64_t>(kGroups, num_items);
  std::vector<double> group_sums(std::max<int64_t>(groups, 1) * rows_a * rows_b, 0.0);
  int64_t widest = 0;
  for (const WorkItem& item : items) widest = std::max(widest, item.n);

  // One group (a narrow stack) runs on the calling thread: waking a team costs more than it saves,
  // and on a loaded machine the join waits for a descheduled thread.
#pragma omp parallel if (groups > 1)
  {
    const std::vector<A> zeros(widest, A(0));  // pads the last tile
    ItemRows<A> a{std::vector<A>(scratch_per_thread), {}}, b{std::vector<A>(symmetric ? 0 : scratch_per_thread), {}};
    std::vector<A> item_sum(padded_a * padded_b);
#pragma omp for schedule(dynamic, 1)
    for (int64_t group = 0; group < groups; ++group) {
      double* sums = group_sums.data() + group * rows_a * rows_b;
      const int64_t first = group * num_items / groups, last = (group + 1) * num_items / groups;
      for (int64_t i = first; i < last; ++i) {
        a.rows.assign(padded_a, zeros.data());
        prepare_a(items[i], a);
        if (!symmetric) {
          b.rows.assign(padded_b, zeros.data());
          prepare_b(items[i], b);
        }
        const ItemRows<A>& rb = symmetric ? a : b;
        for (int64_t ti = 0; ti < tiles_a; ++ti) {
          for (int64_t tj = symmetric ? ti : 0; tj < tiles_b; ++tj) {
            A tile[kTileRows][kTileRows];
            if (symmetric && ti == tj) {
              diagonal_tile_dots(a.rows.data() + ti * kTileRows, items[i].n, tile);
            } else {
              tile_dots(a.rows.data() + ti * kTileRows, rb.rows.data() + tj * kTileRows, items[i].n, tile);
            }
            for (int r = 0; r < kTileRows; ++r)
              for (int s = 0; s < kTileRows; ++s) item_sum[(ti * kTileRows + r) * padded_b + tj * kTileRows + s] = tile[r][s];
          }
        }
        for (int64_t r = 0; r < rows_a; ++r)
          for (int64_t s = symmetric ? r : 0; s < rows_b; ++s) sums[r * rows_b + s] += double(item_sum[r * padded_b + s]);
      }
    }
  }
  for (int64_t r = 0; r < rows_a; ++r) {
    for (int64_t s = symmetric ? r : 0; s < rows_b; ++s) {
      double total = 0.0;
      for (int64_t group = 0; group < groups; ++group) total += group_sums[group * rows_a * rows_b + r * rows_b + s];
      out[r * rows_b + s] = A(total);
      if (symmetric) out[s * rows_b + r] = A(total);
    }
  }
}

// out_j[c] (+)= alpha * sum_k weights[k] * row_k[c] for every item, in slices of kSlice columns.
// row(item, k, c0, n, scratch) returns columns [c0, c0 + n) of row k of the item in the
// accumulation type (it may widen them into scratch, or update them in place: it is called exactly
// once per element). The K rows of a slice are then summed a vector at a time in registers and
// each output element is rounded and stored once.
template <class A, class U, class Row>
void combine_items(const std::vector<WorkItem>& items, int64_t K, Row row, const A* weights, U* const* out, A alpha,
                   bool accumulate) {
  typedef A vec __attribute__((vector_size(kVectorBytes)));
  constexpr int64_t width = kVectorBytes / sizeof(A);
  constexpr int64_t kSlice = 512;
#pragma omp parallel if (items.size() > 1)
  {
    std::vector<A> scratch(K * kSlice);
    std::vector<const A*> rows(K);
    A sum[kSlice];
#pragma omp for schedule(static)
    for (int64_t i = 0; i < int64_t(items.size()); ++i) {
      const WorkItem& item = items[i];
      for (int64_t c0 = 0; c0 < item.n; c0 += kSlice) {
        const int64_t n = std::min(kSlice, item.n - c0);
        for (int64_t k = 0; k < K; ++k) rows[k] = row(item, k, c0, n, scratch.data() + k * kSlice);
        int64_t c = 0;
        for (; c + width <= n; c += width) {
          vec acc = weights[0] * load_vector_unaligned<vec>(rows[0] + c);
          for (int64_t k = 1; k < K; ++k) acc += weights[k] * load_vector_unaligned<vec>(rows[k] + c);
          std::memcpy(sum + c, &acc, sizeof acc);
        }
        for (; c < n; ++c) {
          A acc = weights[0] * rows[0][c];
          for (int64_t k = 1; k < K; ++k) acc += weights[k] * rows[k][c];
          sum[c] = acc;
        }
        U* o = out[item.block] + item.col0 + c0;
        if (accumulate) {
          for (int64_t t = 0; t < n; ++t) o[t] = from_float<U>(accum_t<U>(A(to_float(o[t])) + alpha * sum[t]));
        } else {
          for (int64_t t = 0; t < n; ++t) o[t] = from_float<U>(accum_t<U>(alpha * sum[t]));
        }
      }
    }
  }
}

}  // namespace cpu
}  // namespace mk
