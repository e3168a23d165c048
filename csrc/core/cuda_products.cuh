// Internal to the CUDA kernels: the tiled products behind gram, cross_gram and the fused MoCo pass,
// and the column-wise combination behind combine and the fused second pass. Both take row
// loaders, device functors `A operator()(int64_t row, int64_t col)`, so that a pass can transform
// (and write back) each element as it is staged.
#pragma once

#include <algorithm>

#include "convert.h"
#include "cpu_kernels.h"  // StackView
#include "gpu_launch.cuh"

namespace mk {
namespace gpu {

// A CTA owns one pair of 32-row tiles (ti, tj) of the result and a strided set of 32-column slabs.
// Each slab is staged in shared memory in the accumulation type; thread (x, y) accumulates the dot
// products of rows 4y..4y+3 of tile ti with row x of tile tj. Partial sums go to a per-CTA slot and
// are reduced afterwards in a fixed order, so results are deterministic (no atomics).
constexpr int kRowTile = 32;
constexpr int kColTile = 32;
constexpr int kThreads = 256;
constexpr int kRowsPerThread = kRowTile * kRowTile / kThreads;  // 4
constexpr int64_t kMaxCtasPerBlock = 1024;

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t blocks_for(int64_t n, int64_t threads) { return std::max<int64_t>(1, ceil_div(n, threads)); }

inline int64_t ctas_for_columns(int64_t cols) {
  return std::clamp<int64_t>(ceil_div(cols, 4 * kColTile), 1, kMaxCtasPerBlock);
}

inline int64_t tile_pairs(int64_t rows, bool symmetric) {
  const int64_t tiles = ceil_div(rows, kRowTile);
  return symmetric ? tiles * (tiles + 1) / 2 : tiles * tiles;
}

// Partial slots the products of a stack with these block widths write.
inline int64_t product_parts(const int64_t* cols, int64_t num_blocks) {
  int64_t parts = 0;
  for (int64_t j = 0; j < num_blocks; ++j) parts += ctas_for_columns(cols[j]);
  return parts;
}

// The p-th tile pair: row-major over the upper triangle (symmetric) or the full square.
__device__ inline void tile_pair(int64_t p, int64_t tiles, bool symmetric, int64_t& ti, int64_t& tj) {
  if (!symmetric) {
    ti = p / tiles;
    tj = p % tiles;
    return;
  }
  ti = 0;
  while (p >= tiles - ti) {
    p -= tiles - ti;
    ++ti;
  }
  tj = ti + p;
}

// Reads a block of a stack: element (row, col) widened to the accumulation type.
template <class T>
struct BlockLoad {
  const T* data;
  int64_t row_stride;
  __device__ accum_t<T> operator()(int64_t row, int64_t col) const { return to_float(data[row * row_stride + col]); }
};

template <class A, class Load>
__device__ inline void stage_slab(const Load& load, int64_t rows, int64_t row0, int64_t col0, int64_t cols,
                                  A (*slab)[kColTile + 1]) {
  for (int e = threadIdx.x; e < kRowTile * kColTile; e += kThreads) {
    const int r = e / kColTile, c = e % kColTile;
    const int64_t row = row0 + r, col = col0 + c;
    slab[r][c] = (row < rows && col < cols) ? load(row, col) : A(0);
  }
}

// Partial products of one block: out slot (part0 + blockIdx.x) receives A B^T over this CTA's
// columns for tile pair blockIdx.y. With `symmetric`, B = A (load_b unused) and only tile pairs on
// or above the diagonal run; a loader with side effects is then called once per element only when
// the rows fit one tile (rows <= 32).
template <class A, class LoadA, class LoadB>
__global__ void __launch_bounds__(kThreads)
    products_kernel(LoadA load_a, LoadB load_b, int64_t rows, int64_t cols, bool symmetric, A* partials,
                    int64_t part0) {
  MK_SHARED(A, slab_a, [kRowTile][kColTile + 1]);
  MK_SHARED(A, slab_b, [kRowTile][kColTile + 1]);
  int64_t ti, tj;
  tile_pair(blockIdx.y, ceil_div(rows, kRowTile), symmetric, ti, tj);
  const bool same_slab = symmetric && ti == tj;
  const int x = threadIdx.x % kRowTile, y = threadIdx.x / kRowTile;
  A acc[kRowsPerThread] = {};
  for (int64_t col0 = int64_t(blockIdx.x) * kColTile; col0 < cols; col0 += int64_t(gridDim.x) * kColTile) {
    stage_slab(load_a, rows, ti * kRowTile, col0, cols, slab_a);
    if (!same_slab) {
      if (symmetric) {
        stage_slab(load_a, rows, tj * kRowTile, col0, cols, slab_b);
      } else {
        stage_slab(load_b, rows, tj * kRowTile, col0, cols, slab_b);
      }
    }
    __syncthreads();
    const A(*rhs)[kColTile + 1] = same_slab ? slab_a : slab_b;
#pragma unroll 8
    for (int c = 0; c < kColTile; ++c) {
      const A bx = rhs[x][c];
#pragma unroll
      for (int q = 0; q < kRowsPerThread; ++q) acc[q] += slab_a[y * kRowsPerThread + q][c] * bx;
    }
    __syncthreads();
  }
  A* out = partials + (part0 + blockIdx.x) * rows * rows;
  const int64_t s = tj * kRowTile + x;
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    const int64_t r = ti * kRowTile + y * kRowsPerThread + q;
    if (r < rows && s < rows) out[r * rows + s] = acc[q];
  }
}

// out[r][s] = sum over parts in order, in double; for a symmetric product, (r, s) and (s, r) both
// read the upper-triangle partials, so the result is exactly symmetric.
template <class A>
__global__ void reduce_partials_kernel(const A* partials, int64_t parts, int64_t rows, bool symmetric, A* out) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= rows * rows) return;
  int64_t r = e / rows, s = e % rows;
  if (symmetric && r > s) {
    const int64_t t = r;
    r = s;
    s = t;
  }
  double total = 0.0;
  for (int64_t p = 0; p < parts; ++p) total += double(partials[p * rows * rows + r * rows + s]);
  out[e] = A(total);
}

template <class A>
inline void reduce_partials(const A* partials, int64_t parts, int64_t rows, bool symmetric, A* out,
                            cudaStream_t stream) {
  launch_kernel(reduce_partials_kernel<A>, unsigned(blocks_for(rows * rows, 256)), 256, 0, stream, partials, parts,
                rows, symmetric, out);
}

// One block's products; the caller passes part0 and advances it by ctas_for_columns(cols).
template <class A, class LoadA, class LoadB>
inline void launch_products(const LoadA& load_a, const LoadB& load_b, int64_t rows, int64_t cols, bool symmetric,
                            A* partials, int64_t part0, cudaStream_t stream) {
  const dim3 grid(unsigned(ctas_for_columns(cols)), unsigned(tile_pairs(rows, symmetric)));
  launch_kernel(products_kernel<A, LoadA, LoadB>, grid, kThreads, 0, stream, load_a, load_b, rows, cols, symmetric,
                partials, part0);
}

// out[c] (+)= alpha * sum_k weights[k] * load(k, c), accumulated in A, rounded once on store.
template <class A, class U, class Load>
__global__ void combine_kernel(Load load, int64_t K, int64_t cols, const A* weights, U* out, A alpha,
                               bool accumulate) {
  MK_DYNAMIC_SHARED(unsigned char, weight_bytes);
  A* w = reinterpret_cast<A*>(weight_bytes);
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) w[k] = weights[k];
  __syncthreads();
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < cols; c += int64_t(gridDim.x) * blockDim.x) {
    A acc = 0;
    for (int64_t k = 0; k < K; ++k) acc += w[k] * load(k, c);
    const A value = accumulate ? A(to_float(out[c])) + alpha * acc : alpha * acc;
    out[c] = from_float<U>(accum_t<U>(value));
  }
}

template <class A, class U, class Load>
inline void launch_combine(const Load& load, int64_t K, int64_t cols, const A* weights, U* out, A alpha,
                           bool accumulate, cudaStream_t stream) {
  constexpr int threads = 256;
  const int64_t grid = std::min<int64_t>(blocks_for(cols, threads), 65535);
  launch_kernel(combine_kernel<A, U, Load>, unsigned(grid), threads, size_t(K) * sizeof(A), stream, load, K, cols,
                weights, out, alpha, accumulate);
}

}  // namespace gpu
}  // namespace mk
