#include "cuda_kernels.h"

#include <algorithm>

#include "convert.h"
#include "min_norm.h"
#include "simplex.h"

namespace mk {
namespace {

// Gram tiling: a CTA owns one pair of 32-row tiles (ti, tj) of the K x K result and a strided set
// of 32-column slabs of one block. Each slab is staged in shared memory (widened to the
// accumulation type); thread (x, y) accumulates the dot products of rows 4y..4y+3 of tile ti with
// row x of tile tj. Partial sums go to a per-CTA slot, reduced afterwards in a fixed order, so
// results are deterministic (no atomics).
constexpr int kRowTile = 32;
constexpr int kColTile = 32;
constexpr int kThreads = 256;
constexpr int kRowsPerThread = kRowTile * kRowTile / kThreads;  // 4
constexpr int64_t kMaxCtasPerBlock = 1024;

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t ctas_for_columns(int64_t cols) { return std::clamp<int64_t>(ceil_div(cols, 4 * kColTile), 1, kMaxCtasPerBlock); }

int64_t tile_pairs(int64_t K, bool symmetric) {
  const int64_t tiles = ceil_div(K, kRowTile);
  return symmetric ? tiles * (tiles + 1) / 2 : tiles * tiles;
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

template <class T>
__device__ inline void stage_slab(const T* base, int64_t row_stride, int64_t K, int64_t row0, int64_t col0, int64_t cols,
                                  accum_t<T> (*slab)[kColTile + 1]) {
  for (int e = threadIdx.x; e < kRowTile * kColTile; e += kThreads) {
    const int r = e / kColTile, c = e % kColTile;
    const int64_t row = row0 + r, col = col0 + c;
    slab[r][c] = (row < K && col < cols) ? accum_t<T>(to_float(base[row * row_stride + col])) : accum_t<T>(0);
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    gram_partials_kernel(const T* a, const T* b, int64_t row_stride_a, int64_t row_stride_b, int64_t K, int64_t cols,
                         bool symmetric, accum_t<T>* partials, int64_t part0) {
  using A = accum_t<T>;
  __shared__ A slab_a[kRowTile][kColTile + 1];
  __shared__ A slab_b[kRowTile][kColTile + 1];
  int64_t ti, tj;
  tile_pair(blockIdx.y, ceil_div(K, kRowTile), symmetric, ti, tj);
  const bool same_slab = (b == nullptr) && ti == tj;
  const T* b_data = b ? b : a;
  const int64_t b_stride = b ? row_stride_b : row_stride_a;
  const int x = threadIdx.x % kRowTile, y = threadIdx.x / kRowTile;
  A acc[kRowsPerThread] = {};
  for (int64_t col0 = int64_t(blockIdx.x) * kColTile; col0 < cols; col0 += int64_t(gridDim.x) * kColTile) {
    stage_slab(a, row_stride_a, K, ti * kRowTile, col0, cols, slab_a);
    if (!same_slab) stage_slab(b_data, b_stride, K, tj * kRowTile, col0, cols, slab_b);
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
  A* out = partials + (part0 + blockIdx.x) * K * K;
  const int64_t s = tj * kRowTile + x;
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    const int64_t r = ti * kRowTile + y * kRowsPerThread + q;
    if (r < K && s < K) out[r * K + s] = acc[q];
  }
}

// out[r][s] = sum over parts in order, in double; for the Gram, (r, s) and (s, r) both read the
// upper-triangle partials, so the result is exactly symmetric.
template <class A>
__global__ void reduce_partials_kernel(const A* partials, int64_t parts, int64_t K, bool symmetric, A* out) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= K * K) return;
  int64_t r = e / K, s = e % K;
  if (symmetric && r > s) {
    const int64_t t = r;
    r = s;
    s = t;
  }
  double total = 0.0;
  for (int64_t p = 0; p < parts; ++p) total += double(partials[p * K * K + r * K + s]);
  out[e] = A(total);
}

template <class T>
__global__ void combine_kernel(const T* g, int64_t row_stride, int64_t K, int64_t cols, const accum_t<T>* weights,
                               T* out) {
  using A = accum_t<T>;
  extern __shared__ unsigned char weight_bytes[];
  A* w = reinterpret_cast<A*>(weight_bytes);
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) w[k] = weights[k];
  __syncthreads();
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < cols; c += int64_t(gridDim.x) * blockDim.x) {
    A acc = 0;
    for (int64_t k = 0; k < K; ++k) acc += w[k] * A(to_float(g[k * row_stride + c]));
    out[c] = from_float<T>(acc);
  }
}

template <class T>
__global__ void project_simplex_kernel(const T* v, int64_t rows, int64_t K, T* out) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const T* in_row = v + r * K;
  T* out_row = out + r * K;
  project_simplex_row(
      K, [&](int64_t i) { return double(to_float(in_row[i])); },
      [&](int64_t i, double x) { out_row[i] = from_float<T>(accum_t<T>(x)); });
}

template <class T>
__global__ void min_norm_kernel(const T* gram, int64_t batch, int64_t K, T* out, double* work) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  const T* G = gram + b * K * K;
  T* lambda = out + b * K;
  min_norm_solve(
      K, [&](int64_t i, int64_t j) { return double(to_float(G[i * K + j])); },
      [&](int64_t i, double x) { lambda[i] = from_float<T>(accum_t<T>(x)); }, work + b * min_norm_workspace(K));
}

int64_t blocks_for(int64_t n, int64_t threads) { return std::max<int64_t>(1, ceil_div(n, threads)); }

}  // namespace

int64_t gram_cuda_parts(const int64_t* cols, int64_t num_blocks, int64_t /*K*/) {
  int64_t parts = 0;
  for (int64_t j = 0; j < num_blocks; ++j) parts += ctas_for_columns(cols[j]);
  return parts;
}

template <class T>
void gram_cuda(const StackView<T>& a, const StackView<T>* b, accum_t<T>* partials, accum_t<T>* out,
               cudaStream_t stream) {
  const bool symmetric = b == nullptr;
  const int64_t K = a.K;
  int64_t part0 = 0;
  for (int64_t j = 0; j < a.num_blocks; ++j) {
    const int64_t ctas = ctas_for_columns(a.cols[j]);
    const dim3 grid(unsigned(ctas), unsigned(tile_pairs(K, symmetric)));
    gram_partials_kernel<T><<<grid, kThreads, 0, stream>>>(a.data[j], b ? b->data[j] : nullptr, a.row_stride[j],
                                                             b ? b->row_stride[j] : 0, K, a.cols[j], symmetric,
                                                             partials, part0);
    part0 += ctas;
  }
  reduce_partials_kernel<accum_t<T>><<<unsigned(blocks_for(K * K, 256)), 256, 0, stream>>>(partials, part0, K,
                                                                                         symmetric, out);
}

template <class T>
void combine_cuda(const StackView<T>& g, const accum_t<T>* weights, T* const* out, cudaStream_t stream) {
  constexpr int threads = 256;
  const size_t shared = size_t(g.K) * sizeof(accum_t<T>);
  for (int64_t j = 0; j < g.num_blocks; ++j) {
    const int64_t grid = std::min<int64_t>(blocks_for(g.cols[j], threads), 65535);
    combine_kernel<T><<<unsigned(grid), threads, shared, stream>>>(g.data[j], g.row_stride[j], g.K, g.cols[j], weights,
                                                                   out[j]);
  }
}

template <class T>
void project_simplex_cuda(const T* v, int64_t rows, int64_t K, T* out, cudaStream_t stream) {
  project_simplex_kernel<T><<<unsigned(blocks_for(rows, 128)), 128, 0, stream>>>(v, rows, K, out);
}

template <class T>
void min_norm_cuda(const T* gram, int64_t batch, int64_t K, T* out, double* work, cudaStream_t stream) {
  min_norm_kernel<T><<<unsigned(blocks_for(batch, 64)), 64, 0, stream>>>(gram, batch, K, out, work);
}

#define MK_INSTANTIATE(T)                                                                                      \
  template void gram_cuda<T>(const StackView<T>&, const StackView<T>*, accum_t<T>*, accum_t<T>*, cudaStream_t); \
  template void combine_cuda<T>(const StackView<T>&, const accum_t<T>*, T* const*, cudaStream_t);             \
  template void project_simplex_cuda<T>(const T*, int64_t, int64_t, T*, cudaStream_t);                        \
  template void min_norm_cuda<T>(const T*, int64_t, int64_t, T*, double*, cudaStream_t);
MK_INSTANTIATE(float)
MK_INSTANTIATE(double)
MK_INSTANTIATE(half_t)
MK_INSTANTIATE(bf16_t)
#undef MK_INSTANTIATE

}  // namespace mk
