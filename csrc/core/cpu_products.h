// Internal to the CPU kernels: the work split and the register-tiled products that gram,
// cross_gram and the fused multi-objective passes share.
//
// Compiled once per instruction-set variant: a cpu_variant_<isa>.cpp defines MK_VARIANT_NS (the
// variant's namespace), MK_VECTOR_BYTES and MK_REG_ROWS, switches the target (#pragma GCC target)
// and includes this header after every standard header it needs (cpu_variant_prelude.h), so that
// only the functions defined here, in the variant's own namespace, get the variant's instructions.
//
// The columns of a stack are cut into work items of a fixed width (a function of K only), so that
// results never depend on the number of threads. Each item's rows are prepared once (widened to
// the accumulation type, or updated in place as in MoCo's tracking) and multiplied in 4 x 4 tiles
// of rows while they sit in L2; the items' partial sums are added in double in a fixed order.
//
// Work and floor per call (K rows of d columns, b bytes per element, fp32 accumulation):
//   gram:        reads K d b bytes once; K (K + 1) / 2 d multiply-adds (4 x 4 tiles: for K = 8,
//                36 d; the 2 x 4 register tiles of AVX2 and the baseline compute 40 d). Floor: one
//                read pass (torch's x.amax()/x.sum() over the same bytes); compute is below it
//                on every variant for K <= 16 (AVX2, 2 cores: ~5 ms of FMAs against ~14 ms of reads
//                for K = 8, d = 12.5M).
//   cross_gram:  reads 2 K d b bytes; K^2 d multiply-adds.
//   combine:     reads K d b, writes d b' bytes; K d multiply-adds. Floor: x.sum(0).
//   track_gram:  reads G (K d b) and Y (K d 4), writes Y (K d 4); floor: torch's Y.lerp_(G).
//   track_combine / moco pass 2: reads Y (and G), writes out; floor: Y.sum(0).
#pragma once

#ifndef MK_VARIANT_NS
#error "cpu_products.h is compiled through a cpu_variant_<isa>.cpp (MK_VARIANT_NS, MK_VECTOR_BYTES, MK_REG_ROWS)"
#endif

#include <algorithm>
#include <cstring>
#include <vector>

#include "convert.h"
#include "cpu_kernels.h"

namespace mk {
namespace MK_VARIANT_NS {
namespace cpu {

// Tiles of 4 x 4 rows; each is computed in register tiles of kRegRows x 4 dot products of
// kVectorBytes-byte vectors: AVX-512 (32 registers) one 4 x 4 tile, 16 accumulators + 8
// operands; AVX2 and SSE2 (16 registers) two 2 x 4 tiles, 8 accumulators + 6 operands; NEON (32
// registers) 4 x 4 of 16-byte vectors.
constexpr int kTileRows = 4;
constexpr int kVectorBytes = MK_VECTOR_BYTES;
constexpr int kRegRows = MK_REG_ROWS;
static_assert(kTileRows == 4 && (kRegRows == 2 || kRegRows == 4), "4 x 4 tiles of 2 x 4 or 4 x 4 register tiles");

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

// out[r * ld + s] = dot(a[r][0:n], b[s][0:n]) for an R x S register tile, in the accumulation
// type A: R x S vector accumulators, the lanes summed in order at the end, then the tail.
template <class A, int R, int S>
inline void register_tile(const A* const* a, const A* const* b, int64_t n, A* out, int64_t ld) {
  typedef A vec __attribute__((vector_size(kVectorBytes)));
  constexpr int64_t width = kVectorBytes / sizeof(A);
  vec acc[R][S] = {};
  int64_t c = 0;
  for (; c + width <= n; c += width) {
    vec av[R], bv[S];
    for (int r = 0; r < R; ++r) av[r] = load_vector_unaligned<vec>(a[r] + c);
    for (int s = 0; s < S; ++s) bv[s] = load_vector_unaligned<vec>(b[s] + c);
    for (int r = 0; r < R; ++r)
      for (int s = 0; s < S; ++s) acc[r][s] += av[r] * bv[s];
  }
  for (int r = 0; r < R; ++r) {
    for (int s = 0; s < S; ++s) {
      A total = 0;
      for (int64_t l = 0; l < width; ++l) total += acc[r][s][l];
      for (int64_t t = c; t < n; ++t) total += a[r][t] * b[s][t];
      out[r * ld + s] = total;
    }
  }
}

// out[r][s] = dot(a[r][0:n], b[s][0:n]) for a 4 x 4 tile of rows.
template <class A>
void tile_dots(const A* const* a, const A* const* b, int64_t n, A out[kTileRows][kTileRows]) {
  for (int r0 = 0; r0 < kTileRows; r0 += kRegRows) register_tile<A, kRegRows, kTileRows>(a + r0, b, n, &out[r0][0], kTileRows);
}

// The same for a diagonal tile of a symmetric product (b = a), mirrored so that it is exactly
// symmetric. With 4-row register tiles only the 10 dot products with r <= s (6 of 16 FMAs per column
// saved); with 2-row ones rows 0-1 x columns 0-3 and rows 2-3 x columns 2-3 (12 of 16).
template <class A>
void diagonal_tile_dots(const A* const* a, int64_t n, A out[kTileRows][kTileRows]) {
  if constexpr (kRegRows == kTileRows) {
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
  } else {
    register_tile<A, 2, 4>(a, a, n, &out[0][0], kTileRows);
    register_tile<A, 2, 2>(a + 2, a + 2, n, &out[2][2], kTileRows);
    for (int r = 0; r < kTileRows; ++r)
      for (int s = r + 1; s < kTileRows; ++s) out[s][r] = out[r][s];
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
//
// The parallel split: consecutive items form groups (their number a function of the item count and
// the output size only), claimed one at a time by whichever thread is free; each group sums its
// items into its own partial, and the partials are added in group order. So the result is bitwise
// independent of the thread count and the schedule, and a thread that the OS deschedules holds up
// at most the one group it has claimed (a few hundred columns of a large stack), not a static
// share of the work.
inline int64_t product_groups(int64_t num_items, int64_t rows_a, int64_t rows_b) {
  // Up to 1024 groups, and partials of at most ~4 MiB in all.
  const int64_t cap = std::clamp<int64_t>((int64_t(4) << 20) / (8 * rows_a * rows_b), 64, 1024);
  return std::min<int64_t>(cap, num_items);
}

template <class A, class PrepareA, class PrepareB>
void item_products(const std::vector<WorkItem>& items, int64_t rows_a, int64_t rows_b, bool symmetric,
                   int64_t scratch_per_thread, PrepareA prepare_a, PrepareB prepare_b, A* out) {
  const int64_t tiles_a = (rows_a + kTileRows - 1) / kTileRows, tiles_b = (rows_b + kTileRows - 1) / kTileRows;
  const int64_t padded_a = tiles_a * kTileRows, padded_b = tiles_b * kTileRows;
  const int64_t num_items = int64_t(items.size());
  const int64_t groups = product_groups(num_items, rows_a, rows_b);
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
#pragma omp for schedule(dynamic, 1)  // each output element is written once: any schedule gives the same bits
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
}  // namespace MK_VARIANT_NS
}  // namespace mk
