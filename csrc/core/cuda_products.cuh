// Internal to the CUDA kernels: the combinations (combine, combine_into, and MoCo's pass 2, the
// tracking update fused with the combination of the updated y) as one persistent launch per call
// over the block table of cuda_block_table.cuh. The Gram family is in cuda_gram.cuh.
//
// - Operands per block: 0 the stack g (T, K rows), 1 the output (U, one row), 2 (track only) the
//   state y (the accumulation type A, K rows), updated in place: y <- y + beta (scale_k g - y).
// - Grid: min(2 x SMs, columns / 32) CTAs of 256 threads; CTA b owns a contiguous range of the
//   concatenated columns and walks the blocks it touches, one launch per kTableBlocks non-empty
//   blocks (empty blocks are left out; a call without columns launches nothing).
// - A thread's step covers G column positions: vectors of V = 16 / sizeof(T) columns from the
//   block's head on (the first column where g, y and the output are all aligned for vector access:
//   16-byte loads of g and y, out in accesses of min(16, V sizeof(U)) bytes), and G V single
//   columns (at most 32 values in flight) before the head, after the last whole vector, and in
//   blocks without a head.
//   It loads R rows of all its positions before using any, so that G x R = 8 vector loads are in
//   flight per thread (4 for 16-bit tracking, whose y vectors are 32 bytes): K = 1 takes 8
//   positions, K = 2 4 x 2 rows, K <= 4 2 x 4, larger K 1 x 8 (2 CTAs x 256 threads x 128 B = 64 KB
//   per SM, above the ~24 KB that DRAM latency needs on H200; as many bytes in single columns, or
//   half for 16-bit g at K <= 2).
// - Weights (and the tracking's scales) are staged in shared memory, kCombineWeightChunk at a time:
//   all of them once when K <= kCombineWeightChunk, otherwise chunk by chunk inside every step (the
//   loops' trip counts are the same for every thread of a CTA, so every thread reaches the barriers).
// - Each output element is summed by one thread in a fixed order: acc = 0, then acc += w_k x_k for
//   k = 0, 1, ..., K-1 in A (fp32; fp64 for fp64 g), then alpha acc (or out + alpha acc) rounded once
//   to U. The same inputs give the same bits, and NaN and Inf propagate.
#pragma once

#include <algorithm>
#include <type_traits>

#include "convert.h"
#include "cuda_block_table.cuh"
#include "gpu_launch.cuh"

namespace mk {
namespace gpu {

inline int64_t blocks_for(int64_t n, int64_t threads) { return std::max<int64_t>(1, ceil_div(n, threads)); }

enum class CombineKind { plain, track };

constexpr int kCombineThreads = 256;
constexpr int64_t kCombineWeightChunk = 1024;

template <CombineKind kind>
using CombineTable = BlockTable<kind == CombineKind::track ? 3 : 2>;

template <class A>
struct CombineArgs {
  int64_t K;
  const A* weights;  // K values, device
  const A* scale;    // track: K row scales, device
  const A* beta;     // track: the rate, device
  A alpha;
  int accumulate;
};

// Loads per thread per batch (column positions x rows).
template <class T, CombineKind kind>
constexpr int combine_slots() {
  return kind == CombineKind::track && sizeof(T) == 2 ? 4 : 8;
}

// Rows loaded per batch: as many as K has, up to the slots, in powers of two.
inline int combine_rows_per_batch(int64_t K, int slots) {
  const int rows = K == 1 ? 1 : K == 2 ? 2 : K <= 4 ? 4 : 8;
  return std::min(rows, slots);
}

// N consecutive elements: one scalar access, or vector accesses (p aligned for them).
template <class X, int N>
__device__ inline void load_columns(const X* p, X (&out)[N]) {
  if constexpr (N == 1) out[0] = *p;
  else load_vector(p, out);
}
template <class X, int N>
__device__ inline void store_columns(X* p, const X (&in)[N]) {
  if constexpr (N == 1) *p = in[0];
  else store_vector(p, in);
}

// One CTA's walk over its columns (the state its steps share).
template <class T, class U, CombineKind kind, int R>
struct CombinePass {
  using A = accum_t<T>;
  static constexpr bool track = kind == CombineKind::track;
  static constexpr int V = int(16 / sizeof(T));
  static constexpr int G = combine_slots<T, kind>() / R;
  static_assert(G >= 1, "rows per batch within the slots");
  // Single columns per step: G V, as many bytes as the vectors, but at most 32 values in flight
  // (16-bit data at K <= 2 would otherwise spill).
  static constexpr int P1 = G * V * R <= 32 ? G * V : 32 / R;
  const CombineTable<kind>& tab;
  const CombineArgs<A>& args;
  A* w;  // shared: the chunk's weights
  A* s;  // shared, track: the chunk's row scales
  A beta;
  int64_t chunk;
  bool restage;  // K > chunk: every step stages its chunks itself
  int t;

  __device__ void stage(int64_t k0) const {
    for (int64_t i = t; i < min_i64(chunk, args.K - k0); i += kCombineThreads) {
      w[i] = args.weights[k0 + i];
      if constexpr (track) s[i] = args.scale[k0 + i];
    }
  }

  // One step over P column positions of block j: N columns each (vectors: P = G, N = V; single
  // columns: P = P1, N = 1) at local columns col[i], those with valid[i].
  template <int P, int N>
  __device__ void step(int j, const int64_t (&col)[P], const bool (&valid)[P]) const {
    const int64_t K = args.K;
    const T* const g = static_cast<const T*>(tab.data[0][j]);
    const int64_t g_stride = tab.stride[0][j];
    A* y = nullptr;
    int64_t y_stride = 0;
    if constexpr (track) {
      y = static_cast<A*>(const_cast<void*>(tab.data[2][j]));
      y_stride = tab.stride[2][j];
    }
    A acc[P][N];
#pragma unroll
    for (int i = 0; i < P; ++i)
#pragma unroll
      for (int n = 0; n < N; ++n) acc[i][n] = A(0);
    for (int64_t k0 = 0; k0 < K; k0 += kCombineWeightChunk) {
      if (restage) {
        __syncthreads();  // every thread is done with the previous chunk
        stage(k0);
        __syncthreads();
      }
      const int64_t k1 = min_i64(K, k0 + kCombineWeightChunk);
      for (int64_t kb = k0; kb < k1; kb += R) {
        // All loads of the batch first, then the arithmetic in row order.
        A x[R][P][N], yx[R][P][N];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int i = 0; i < P; ++i) {
            if (valid[i] && kb + r < k1) {
              T raw[N];
              load_columns(g + (kb + r) * g_stride + col[i], raw);
#pragma unroll
              for (int n = 0; n < N; ++n) x[r][i][n] = A(to_float(raw[n]));
              if constexpr (track) load_columns(y + (kb + r) * y_stride + col[i], yx[r][i]);
            } else {
#pragma unroll
              for (int n = 0; n < N; ++n) x[r][i][n] = yx[r][i][n] = A(0);
            }
          }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (kb + r >= k1) continue;
          const A wk = w[kb + r - k0];
          const A sk = track ? s[kb + r - k0] : A(0);
#pragma unroll
          for (int i = 0; i < P; ++i) {
            if (!valid[i]) continue;
            if constexpr (track) {
#pragma unroll
              for (int n = 0; n < N; ++n) x[r][i][n] = yx[r][i][n] + beta * (sk * x[r][i][n] - yx[r][i][n]);
              store_columns(y + (kb + r) * y_stride + col[i], x[r][i]);
            }
#pragma unroll
            for (int n = 0; n < N; ++n) acc[i][n] += wk * x[r][i][n];
          }
        }
      }
    }
    U* const out = static_cast<U*>(const_cast<void*>(tab.data[1][j]));
#pragma unroll
    for (int i = 0; i < P; ++i) {
      if (!valid[i]) continue;
      U value[N];
      if (args.accumulate) load_columns(out + col[i], value);
#pragma unroll
      for (int n = 0; n < N; ++n) {
        const A scaled = args.accumulate ? A(to_float(value[n])) + args.alpha * acc[i][n] : args.alpha * acc[i][n];
        value[n] = from_float<U>(accum_t<U>(scaled));
      }
      store_columns(out + col[i], value);
    }
  }

  // Single columns [from, to) of block j, P1 x 256 per step.
  __device__ void scalar_columns(int j, int64_t from, int64_t to) const {
    constexpr int P = P1;
    for (int64_t c0 = from; c0 < to; c0 += int64_t(kCombineThreads) * P) {
      int64_t col[P];
      bool valid[P];
#pragma unroll
      for (int i = 0; i < P; ++i) {
        col[i] = c0 + int64_t(i) * kCombineThreads + t;
        valid[i] = col[i] < to;
      }
      step<P, 1>(j, col, valid);
    }
  }

  // Vectors [va, vb) of block j (vb - va a multiple of V), G x 256 per step.
  __device__ void vector_columns(int j, int64_t va, int64_t vb) const {
    const int64_t vectors = (vb - va) / V;
    for (int64_t v0 = 0; v0 < vectors; v0 += int64_t(kCombineThreads) * G) {
      int64_t col[G];
      bool valid[G];
#pragma unroll
      for (int i = 0; i < G; ++i) {
        const int64_t v = v0 + int64_t(i) * kCombineThreads + t;
        valid[i] = v < vectors;
        col[i] = va + v * V;
      }
      step<G, V>(j, col, valid);
    }
  }
};

template <class T, class U, CombineKind kind, int R>
__global__ void __launch_bounds__(kCombineThreads, 2)
    combine_kernel(MK_GRID_CONSTANT(CombineTable<kind>, tab), CombineArgs<accum_t<T>> args) {
  using A = accum_t<T>;
  using Pass = CombinePass<T, U, kind, R>;
  MK_DYNAMIC_SHARED(unsigned char, shared_bytes);
  A* const w = reinterpret_cast<A*>(shared_bytes);
  const int64_t chunk = min_i64(args.K, kCombineWeightChunk);
  const Pass pass{tab, args, w, w + chunk, Pass::track ? *args.beta : A(0), chunk, args.K > chunk, int(threadIdx.x)};
  if (!pass.restage) pass.stage(0);
  __syncthreads();
  int64_t c0, c1;
  cta_columns(tab.begin[tab.num_blocks], c0, c1);
  for (int j = c0 < c1 ? first_block(tab, c0) : tab.num_blocks; j < tab.num_blocks && tab.begin[j] < c1; ++j) {
    const BlockRange b = block_range(tab, j, c0, c1, Pass::V);
    pass.scalar_columns(j, b.lo, b.va);
    pass.vector_columns(j, b.va, b.vb);
    pass.scalar_columns(j, b.vb, b.hi);
  }
}

template <class T, class U, CombineKind kind, int R>
inline void launch_combine_table(const CombineTable<kind>& tab, const CombineArgs<accum_t<T>>& args,
                                 cudaStream_t stream) {
  if constexpr (R <= combine_slots<T, kind>()) {
    const int64_t total = tab.begin[tab.num_blocks];
    const unsigned grid =
        unsigned(std::clamp<int64_t>(ceil_div(total, kMinColumnsPerCta), 1, 2 * int64_t(device_multiprocessors())));
    const size_t weight_arrays = kind == CombineKind::track ? 2 : 1;
    const size_t shared = weight_arrays * size_t(min_i64(args.K, kCombineWeightChunk)) * sizeof(accum_t<T>);
    launch_kernel(combine_kernel<T, U, kind, R>, grid, kCombineThreads, shared, stream, tab, args);
  }
}

// One call: out_j (+)= alpha sum_k w_k x_k over every block j, x = g (plain) or the updated y
// (track; y and y_stride null for plain). One launch per kTableBlocks non-empty blocks.
template <class T, class U, CombineKind kind>
void launch_combine(const T* const* g, const int64_t* g_stride, const int64_t* cols, int64_t num_blocks,
                    accum_t<T>* const* y, const int64_t* y_stride, U* const* out, const CombineArgs<accum_t<T>>& args,
                    cudaStream_t stream) {
  using A = accum_t<T>;
  constexpr bool track = kind == CombineKind::track;
  constexpr int kOperands = track ? 3 : 2;
  constexpr int V = int(16 / sizeof(T));
  const int rows = combine_rows_per_batch(args.K, combine_slots<T, kind>());
  for_each_table<kOperands>(
      num_blocks, cols,
      [&](int64_t j, TableOperand (&ops)[kOperands]) {
        ops[0] = {g[j], g_stride[j], sizeof(T), 16};
        ops[1] = {out[j], 0, sizeof(U), size_t(vector_access_bytes<U, V>())};
        if constexpr (track) ops[2] = {y[j], y_stride[j], sizeof(A), 16};
      },
      [&](const CombineTable<kind>& tab, bool) {
        if (tab.num_blocks == 0) return;
        switch (rows) {
          case 1: return launch_combine_table<T, U, kind, 1>(tab, args, stream);
          case 2: return launch_combine_table<T, U, kind, 2>(tab, args, stream);
          case 4: return launch_combine_table<T, U, kind, 4>(tab, args, stream);
          default: return launch_combine_table<T, U, kind, 8>(tab, args, stream);
        }
      });
}

}  // namespace gpu
}  // namespace mk
