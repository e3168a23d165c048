// Internal to the CUDA kernels: the Gram family (gram, cross_gram, MoCo's fused track + Gram, the
// [Y; G] joint Gram) as one persistent launch per call.
//
// - The launch walks a block table (cuda_block_table.cuh: up to kTableBlocks blocks by value; a
//   longer list takes one launch per kTableBlocks blocks, chained through a carry, see below).
//   Empty blocks are left out.
// - The grid is min(2 x SMs, columns / 32) CTAs; CTA b owns the contiguous range
//   [total * b / grid, total * (b + 1) / grid) of the concatenated columns.
// - Rows are read with 16-byte vector loads from the block's head on (the first column at which
//   every operand's rows are 16-byte aligned), with scalar loads for the head and the tail of each
//   block range.
// - K <= 8 (symmetric; cross_gram K <= 4): every thread accumulates the products of its columns in
//   registers (the upper triangle), no shared memory; rows unrolled so that 1-2 KB per warp are in
//   flight. Larger K: the CTA stages slabs of [rows x BD] columns in shared memory and each thread
//   accumulates a 4 x 4 register tile of the upper triangle's tile pairs (FMA, never TF32), lanes of
//   threads splitting the slab's columns; above 256 tile pairs a thread owns several pairs and adds
//   each slab's 4 x 4 sums into its CTA's partial in global memory instead.
// - Each CTA reduces its accumulators in a fixed order (xor butterfly, then warps in order; or
//   lanes in order) and writes one partial of N x N doubles. It then takes a ticket (atomicAdd
//   after __threadfence); the CTA that draws the last one resets the counter to zero and sums the
//   partials in CTA order in double (the carry of the previous chained launch first), so the
//   result is bitwise deterministic for a given grid size, needs no second kernel and leaves the
//   workspace ready for the next call (graph replays included).
// - Workspace: kGramHeaderBytes (the ticket, zero before the first call) + (ctas + 1) N^2 doubles.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "convert.h"
#include "cuda_block_table.cuh"
#include "cpu_kernels.h"  // StackView
#include "gpu_launch.cuh"
#include "mol_kernels.h"  // MutableStackView

namespace mk {
namespace gpu {

enum class GramKind { gram, cross, track, joint };

constexpr int kGramThreads = 256;
constexpr int kGramWarps = kGramThreads / 32;
constexpr size_t kGramHeaderBytes = 16;
constexpr int kFlushColumns = 256;  // fp32 partial sums per thread span at most this many columns
constexpr int kTile = 4;                        // rows per side of a thread's register tile
constexpr int64_t kSlabBudgetBytes = 40 * 1024;  // shared memory for one staged slab
constexpr int64_t kMaxSharedBytes = 44 * 1024;  // dynamic; the finish step's static arrays take ~2 KB more
constexpr int64_t kGramMaxSlabRows = 1024;

// The blocks of one launch. Operand 0 is the stack of storage type T (gram/cross_gram: a; track
// and joint: g); operand 1 is b (cross_gram), the tracking state y (accumulation type), or absent.
using GramTable = BlockTable<2>;

struct GramArgs {
  int64_t K;     // objectives
  int64_t rows;  // slab rows: K (gram, track), 2K (cross: a then b; joint: y then g)
  int64_t n;     // the result is n x n: K, or 2K for joint
  const void* beta;  // track: the rate, in device memory
  void* workspace;
  void* out;     // n x n accumulators (chained launches before the last write the carry instead)
  int first;     // first launch of a chain (no carry to add)
  int last;      // last launch of a chain (writes out)
};

// The tiled path's geometry (host-computed).
struct TileGeometry {
  int rows_padded;  // slab rows, padded so that every 4-row tile lies inside
  int bd;           // slab columns, a multiple of 4
  int pitch;        // elements between slab rows (16-byte multiple)
  int tiles;        // 4-row tiles of the left (and right) operand
  int pairs;        // tile pairs computed
  int lanes;        // threads per pair (pairs <= 256), or 0: each thread owns pairs (pairs > 256)
};

// CTAs per SM the kernels are compiled for: 2 (<= 128 registers); fp64's double accumulators
// need more registers at K = 7, 8 and in the tiles, so fp64 gets 1 (its 2 x SMs CTAs run in two
// rounds of equal work).
template <class T>
constexpr int gram_min_ctas() {
  return std::is_same_v<T, double> ? 1 : 2;
}

// Row r of the slab at column c of block j (track: also writes the updated y back).
template <class T, GramKind kind>
struct GramRows {
  using A = accum_t<T>;
  static constexpr int V = int(16 / sizeof(T));  // columns per vector
  const GramTable& tab;
  int64_t K;
  A beta;

  __device__ A load(int j, int64_t r, int64_t c) const {
    const T* g = static_cast<const T*>(tab.data[0][j]);
    if constexpr (kind == GramKind::gram) {
      return A(to_float(g[r * tab.stride[0][j] + c]));
    } else if constexpr (kind == GramKind::cross) {
      return r < K ? A(to_float(g[r * tab.stride[0][j] + c]))
                   : A(to_float(static_cast<const T*>(tab.data[1][j])[(r - K) * tab.stride[1][j] + c]));
    } else if constexpr (kind == GramKind::joint) {
      return r < K ? static_cast<const A*>(tab.data[1][j])[r * tab.stride[1][j] + c]
                   : A(to_float(g[(r - K) * tab.stride[0][j] + c]));
    } else {
      A& yk = const_cast<A*>(static_cast<const A*>(tab.data[1][j]))[r * tab.stride[1][j] + c];
      const A updated = yk - beta * (yk - A(to_float(g[r * tab.stride[0][j] + c])));
      yk = updated;
      return updated;
    }
  }

  // Columns c..c+V-1, c at or after the block's head and a multiple of V past it.
  __device__ void load_vec(int j, int64_t r, int64_t c, A (&x)[V]) const {
    const T* g = static_cast<const T*>(tab.data[0][j]);
    auto widen = [&](const T* p) {
      T v[V];
      load_vector(p, v);
#pragma unroll
      for (int i = 0; i < V; ++i) x[i] = A(to_float(v[i]));
    };
    if constexpr (kind == GramKind::gram) {
      widen(g + r * tab.stride[0][j] + c);
    } else if constexpr (kind == GramKind::cross) {
      if (r < K) widen(g + r * tab.stride[0][j] + c);
      else widen(static_cast<const T*>(tab.data[1][j]) + (r - K) * tab.stride[1][j] + c);
    } else if constexpr (kind == GramKind::joint) {
      if (r < K) load_vector(static_cast<const A*>(tab.data[1][j]) + r * tab.stride[1][j] + c, x);
      else widen(g + (r - K) * tab.stride[0][j] + c);
    } else {
      A* y = const_cast<A*>(static_cast<const A*>(tab.data[1][j])) + r * tab.stride[1][j] + c;
      A gv[V];
      widen(g + r * tab.stride[0][j] + c);
#pragma unroll
      for (int i = 0; i < V; ++i) gv[i] = x[i];
      load_vector(y, x);
#pragma unroll
      for (int i = 0; i < V; ++i) x[i] = x[i] - beta * (x[i] - gv[i]);
      store_vector(y, x);
    }
  }
};

__device__ inline double* gram_carry(const GramArgs& args) {
  return reinterpret_cast<double*>(static_cast<unsigned char*>(args.workspace) + kGramHeaderBytes);
}
__device__ inline double* gram_partial(const GramArgs& args, int64_t cta) {
  return gram_carry(args) + (cta + 1) * args.n * args.n;
}

// After the CTA's partial is written: the ticket, and for the last CTA the fixed-order sum.
template <class A>
__device__ void gram_finish(const GramArgs& args, bool symmetric) {
  MK_SHARED(int, is_last, [1]);
  MK_SHARED(double, lane_sums, [kGramThreads]);
  unsigned* ticket = static_cast<unsigned*>(args.workspace);
  __threadfence();  // this CTA's partial is visible before its ticket is
  __syncthreads();
  if (threadIdx.x == 0) is_last[0] = atomicAdd(ticket, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!is_last[0]) return;
  __threadfence();
  if (threadIdx.x == 0) *ticket = 0;  // every CTA has drawn: ready for the next launch
  const int64_t n = args.n, entries = n * n, parts = gridDim.x;
  const double* carry = gram_carry(args);
  const double* partials = gram_partial(args, 0);
  // (r, s) reads the canonical entry: (min, max) for a symmetric result, so it is exactly symmetric.
  auto source = [&](int64_t e) {
    const int64_t r = e / n, s = e % n;
    return symmetric && r > s ? s * n + r : e;
  };
  auto emit = [&](int64_t e, double total) {
    if (args.last) static_cast<A*>(args.out)[e] = A(total);
    else gram_carry(args)[e] = total;
  };
  const int64_t lanes = entries >= kGramThreads ? 1 : kGramThreads / entries;
  if (lanes == 1) {
    for (int64_t e = threadIdx.x; e < entries; e += kGramThreads) {
      const int64_t src = source(e);
      double total = args.first ? 0.0 : __ldcg(carry + src);
      for (int64_t p = 0; p < parts; ++p) total += __ldcg(partials + p * entries + src);
      emit(e, total);
    }
    return;
  }
  // Few entries: `lanes` threads per entry each sum a contiguous run of partials, then the runs
  // are added in order.
  const int64_t chunk = ceil_div(parts, lanes);
  const int64_t e = threadIdx.x / lanes, lane = threadIdx.x % lanes;
  double run = 0.0;
  if (e < entries) {
    const int64_t src = source(e);
    for (int64_t p = lane * chunk; p < min_i64(parts, (lane + 1) * chunk); ++p) run += __ldcg(partials + p * entries + src);
  }
  lane_sums[threadIdx.x] = run;
  __syncthreads();
  if (threadIdx.x < entries) {
    const int64_t src = source(threadIdx.x);
    double total = args.first ? 0.0 : __ldcg(carry + src);
    for (int64_t l = 0; l < lanes; ++l) total += lane_sums[threadIdx.x * lanes + l];
    emit(threadIdx.x, total);
  }
}

// ---- K <= 8: registers only -------------------------------------------------------------------

template <GramKind kind, int R>
__host__ __device__ constexpr int register_products() {
  return kind == GramKind::cross ? (R / 2) * (R / 2) : R * (R + 1) / 2;
}

template <class T, GramKind kind, int R>
__global__ void __launch_bounds__(kGramThreads, gram_min_ctas<T>())
    gram_registers_kernel(MK_GRID_CONSTANT(GramTable, tab), GramArgs args) {
  using A = accum_t<T>;
  constexpr bool cross = kind == GramKind::cross;
  constexpr int KA = cross ? R / 2 : R;
  constexpr int NP = register_products<kind, R>();
  constexpr int V = int(16 / sizeof(T));
  constexpr int U = R <= 2 ? 4 : R <= 4 ? 2 : 1;  // vectors in flight per row
  MK_SHARED(double, warp_sums, [kGramWarps][NP]);
  const GramRows<T, kind> rows{tab, args.K, kind == GramKind::track ? *static_cast<const A*>(args.beta) : A(0)};
  // fp32 sums over at most kFlushColumns columns per thread; then a warp butterfly (fixed order)
  // adds them into the warp's double sums in shared memory, so that the rounding error does not
  // grow with the columns per thread (d / (CTAs x 256)). Every loop below has a trip count that is
  // the same for all threads of the CTA (a lane without a column of its own adds nothing), so that
  // every lane of a warp reaches each flush's shuffles.
  const int t = int(threadIdx.x), lane = t % 32, warp = t / 32;
  A acc[NP];
#pragma unroll
  for (int e = 0; e < NP; ++e) acc[e] = A(0);
  if (lane == 0)
    for (int e = 0; e < NP; ++e) warp_sums[warp][e] = 0.0;  // lane 0 alone touches its warp's row
  int columns = 0;  // columns per thread since the last flush (at most): the same in every thread
  auto flush = [&] {
    columns = 0;
#pragma unroll
    for (int e = 0; e < NP; ++e) {
      A v = acc[e];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xFFFFFFFFu, v, offset);
      if (lane == 0) warp_sums[warp][e] += double(v);
      acc[e] = A(0);
    }
  };
  auto accumulate = [&](const A* x) {
    int e = 0;
#pragma unroll
    for (int r = 0; r < KA; ++r)
#pragma unroll
      for (int s = cross ? 0 : r; s < KA; ++s) acc[e++] += x[r] * x[cross ? KA + s : s];
  };
  // Scalar columns [from, to) of block j, one per thread per step.
  auto scalar_columns = [&](int j, int64_t from, int64_t to) {
    for (int64_t c0 = from; c0 < to; c0 += kGramThreads) {
      const int64_t c = c0 + t;
      if (c < to) {
        A x[R];
#pragma unroll
        for (int r = 0; r < R; ++r) x[r] = rows.load(j, r, c);
        accumulate(x);
      }
      if (++columns >= kFlushColumns) flush();
    }
  };
  int64_t c0, c1;
  cta_columns(tab.begin[tab.num_blocks], c0, c1);
  for (int j = c0 < c1 ? first_block(tab, c0) : tab.num_blocks; j < tab.num_blocks && tab.begin[j] < c1; ++j) {
    const BlockRange b = block_range(tab, j, c0, c1, V);
    scalar_columns(j, b.lo, b.va);
    const int64_t groups = (b.vb - b.va) / V;
    for (int64_t g0 = 0; g0 < groups; g0 += int64_t(kGramThreads) * U) {
      A x[U][R][V];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t g = g0 + int64_t(u) * kGramThreads + t;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (g < groups) {
            rows.load_vec(j, r, b.va + g * V, x[u][r]);
          } else {
#pragma unroll
            for (int v = 0; v < V; ++v) x[u][r][v] = A(0);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int v = 0; v < V; ++v) {
          A column[R];
#pragma unroll
          for (int r = 0; r < R; ++r) column[r] = x[u][r][v];
          accumulate(column);
        }
      columns += U * V;
      if (columns >= kFlushColumns) flush();
    }
    scalar_columns(j, b.vb, b.hi);
  }
  flush();
  // The warps in order, in double.
  __syncthreads();
  if (t < NP) {
    int r = 0, s = 0, e = t;
    if (cross) {
      r = e / KA;
      s = e % KA;
    } else {
      while (e >= KA - r) {
        e -= KA - r;
        ++r;
      }
      s = r + e;
    }
    double sum = 0.0;
#pragma unroll
    for (int w = 0; w < kGramWarps; ++w) sum += warp_sums[w][t];
    gram_partial(args, blockIdx.x)[r * args.n + s] = sum;
  }
  gram_finish<A>(args, !cross);
}

// ---- larger K: shared-memory slabs, 4 x 4 register tiles ------------------------------------

template <class T, GramKind kind>
__global__ void __launch_bounds__(kGramThreads, gram_min_ctas<T>())
    gram_tiles_kernel(MK_GRID_CONSTANT(GramTable, tab), GramArgs args, TileGeometry geo) {
  using A = accum_t<T>;
  constexpr bool cross = kind == GramKind::cross;
  constexpr int V = int(16 / sizeof(T));
  MK_DYNAMIC_SHARED(unsigned char, shared_bytes);
  A* slab = reinterpret_cast<A*>(shared_bytes);
  const GramRows<T, kind> rows{tab, args.K, kind == GramKind::track ? *static_cast<const A*>(args.beta) : A(0)};
  const int t = int(threadIdx.x);
  const int64_t R = args.rows, n = args.n;
  const int right0 = cross ? int(args.K) : 0;  // slab row of the right operand's first row
  double* partial = gram_partial(args, blockIdx.x);

  // This thread's tile pair(s) and lane.
  auto pair_tiles = [&](int p, int& ti, int& tj) {
    if (cross) {
      ti = p / geo.tiles;
      tj = p % geo.tiles;
      return;
    }
    ti = 0;
    while (p >= geo.tiles - ti) {
      p -= geo.tiles - ti;
      ++ti;
    }
    tj = ti + p;
  };
  const bool owner_mode = geo.lanes == 0;
  const int lane = owner_mode ? 0 : t / geo.pairs;
  const bool active = owner_mode || lane < geo.lanes;
  int ti = 0, tj = 0;
  if (!owner_mode && active) pair_tiles(t % geo.pairs, ti, tj);
  if (owner_mode)
    for (int p = t; p < geo.pairs; p += kGramThreads) {
      int pi, pj;
      pair_tiles(p, pi, pj);
      for (int q = 0; q < kTile; ++q)
        for (int u = 0; u < kTile; ++u) {
          const int64_t r = kTile * pi + q, s = kTile * pj + u;
          if (r < n && s < n) partial[r * n + s] = 0.0;
        }
    }

  // The 4 x 4 products of tile rows ra.. and rb.. over the slab's first `groups` column groups.
  auto tile_products = [&](int ra, int rb, int g0, int step, int groups, A (&acc)[kTile][kTile]) {
    for (int g = g0; g < groups; g += step) {
      A a[kTile][4], b[kTile][4];
#pragma unroll
      for (int q = 0; q < kTile; ++q) {
        load_vector(slab + int64_t(ra + q) * geo.pitch + 4 * g, a[q]);
        load_vector(slab + int64_t(rb + q) * geo.pitch + 4 * g, b[q]);
      }
#pragma unroll
      for (int q = 0; q < kTile; ++q)
#pragma unroll
        for (int u = 0; u < kTile; ++u)
#pragma unroll
          for (int v = 0; v < 4; ++v) acc[q][u] += a[q][v] * b[u][v];
    }
  };

  // fp32 sums over one slab (<= 512 columns), added into double sums per slab; fp64 data
  // accumulates into the double sums directly.
  constexpr bool kFlush = !std::is_same_v<A, double>;
  A acc[kTile][kTile];
  double total[kTile][kTile];
#pragma unroll
  for (int q = 0; q < kTile; ++q)
#pragma unroll
    for (int u = 0; u < kTile; ++u) acc[q][u] = A(0), total[q][u] = 0.0;

  int64_t c0, c1;
  cta_columns(tab.begin[tab.num_blocks], c0, c1);
  int j = c0 < c1 ? first_block(tab, c0) : tab.num_blocks;
  for (int64_t s0 = c0; s0 < c1; s0 += geo.bd) {
    const int64_t s1 = min_i64(c1, s0 + geo.bd);
    const int ncols = int(s1 - s0), groups = (ncols + 3) / 4;
    while (j < tab.num_blocks && tab.begin[j + 1] <= s0) ++j;
    // Stage columns [s0, s1) of every block they touch, rows [0, R); pad with zeros.
    for (int jj = j; jj < tab.num_blocks && tab.begin[jj] < s1; ++jj) {
      const BlockRange b = block_range(tab, jj, s0, s1, V);
      const int q0 = int(tab.begin[jj] + b.lo - s0);  // slab column of local column lo
      const int vgroups = int((b.vb - b.va) / V);
      for (int it = t; it < int(R) * vgroups; it += kGramThreads) {
        const int r = it / vgroups, g = it % vgroups;
        A x[V];
        rows.load_vec(jj, r, b.va + int64_t(g) * V, x);
        A* dst = slab + int64_t(r) * geo.pitch + q0 + int(b.va - b.lo) + g * V;
#pragma unroll
        for (int v = 0; v < V; ++v) dst[v] = x[v];
      }
      const int head = int(b.va - b.lo), scalars = head + int(b.hi - b.vb);
      for (int it = t; it < int(R) * scalars; it += kGramThreads) {
        const int r = it / scalars, k = it % scalars;
        const int64_t c = k < head ? b.lo + k : b.vb + (k - head);
        slab[int64_t(r) * geo.pitch + q0 + int(c - b.lo)] = rows.load(jj, r, c);
      }
    }
    const int width = 4 * groups;
    for (int it = t; it < int(R) * (width - ncols); it += kGramThreads) {
      const int r = it / (width - ncols), c = ncols + it % (width - ncols);
      slab[int64_t(r) * geo.pitch + c] = A(0);
    }
    for (int it = t; it < (geo.rows_padded - int(R)) * width; it += kGramThreads)
      slab[int64_t(R + it / width) * geo.pitch + it % width] = A(0);
    __syncthreads();
    if (owner_mode) {
      for (int p = t; p < geo.pairs; p += kGramThreads) {
        int pi, pj;
        pair_tiles(p, pi, pj);
        A part[kTile][kTile];
#pragma unroll
        for (int q = 0; q < kTile; ++q)
#pragma unroll
          for (int u = 0; u < kTile; ++u) part[q][u] = A(0);
        tile_products(kTile * pi, right0 + kTile * pj, 0, 1, groups, part);
        for (int q = 0; q < kTile; ++q)
          for (int u = 0; u < kTile; ++u) {
            const int64_t r = kTile * pi + q, s = kTile * pj + u;
            if (r < n && s < n) partial[r * n + s] += double(part[q][u]);
          }
      }
    } else if (active) {
      if constexpr (kFlush) {
        tile_products(kTile * ti, right0 + kTile * tj, lane, geo.lanes, groups, acc);
#pragma unroll
        for (int q = 0; q < kTile; ++q)
#pragma unroll
          for (int u = 0; u < kTile; ++u) total[q][u] += double(acc[q][u]), acc[q][u] = A(0);
      } else {
        tile_products(kTile * ti, right0 + kTile * tj, lane, geo.lanes, groups, total);
      }
    }
    __syncthreads();
  }
  if (!owner_mode) {
    // Lanes in order, through shared memory (the slab is free now).
    double* scratch = reinterpret_cast<double*>(shared_bytes);
    if (active)
#pragma unroll
      for (int q = 0; q < kTile; ++q)
#pragma unroll
        for (int u = 0; u < kTile; ++u)
          scratch[(int64_t(t % geo.pairs) * geo.lanes + lane) * kTile * kTile + q * kTile + u] = total[q][u];
    __syncthreads();
    for (int o = t; o < geo.pairs * kTile * kTile; o += kGramThreads) {
      const int p = o / (kTile * kTile), q = o / kTile % kTile, u = o % kTile;
      int pi, pj;
      pair_tiles(p, pi, pj);
      const int64_t r = kTile * pi + q, s = kTile * pj + u;
      if (r >= n || s >= n) continue;
      double sum = 0.0;
      for (int l = 0; l < geo.lanes; ++l) sum += scratch[(int64_t(p) * geo.lanes + l) * kTile * kTile + q * kTile + u];
      partial[r * n + s] = sum;
    }
  }
  gram_finish<A>(args, !cross);
}

// ---- host side ------------------------------------------------------------------------------

inline int64_t gram_ctas() { return 2 * int64_t(device_multiprocessors()); }

inline size_t gram_workspace_bytes(int64_t n) {
  return kGramHeaderBytes + size_t(gram_ctas() + 1) * size_t(n * n) * sizeof(double);
}

inline TileGeometry tile_geometry(GramKind kind, int64_t K, int64_t rows, size_t accum_bytes) {
  TileGeometry geo{};
  const bool cross = kind == GramKind::cross;
  const int64_t left = cross ? K : rows;
  geo.tiles = int(ceil_div(left, kTile));
  geo.rows_padded = int(cross ? K + kTile * geo.tiles : kTile * geo.tiles);
  geo.pairs = cross ? geo.tiles * geo.tiles : geo.tiles * (geo.tiles + 1) / 2;
  geo.lanes = geo.pairs <= kGramThreads ? kGramThreads / geo.pairs : 0;
  const int64_t sa = int64_t(accum_bytes), pad = 16 / sa;
  int64_t bd = (kSlabBudgetBytes / (sa * geo.rows_padded) - pad) / 4 * 4;
  bd = std::clamp<int64_t>(bd, 4, 512);
  geo.bd = int(bd);
  geo.pitch = int(bd + pad);
  if (int64_t(geo.rows_padded) * geo.pitch * sa > kMaxSharedBytes) geo.pitch = geo.bd;
  return geo;
}

inline size_t tile_shared_bytes(const TileGeometry& geo, size_t accum_bytes) {
  const size_t slab = size_t(geo.rows_padded) * size_t(geo.pitch) * accum_bytes;
  const size_t scratch = geo.lanes ? size_t(geo.pairs) * geo.lanes * kTile * kTile * sizeof(double) : 0;
  return std::max(slab, scratch);
}

template <class T, GramKind kind, int R>
inline void launch_registers(const GramTable& tab, const GramArgs& args, unsigned grid, cudaStream_t stream) {
  if constexpr (kind == GramKind::cross || kind == GramKind::joint) {
    if constexpr (R % 2 == 0 && R <= 8) {
      launch_kernel(gram_registers_kernel<T, kind, R>, grid, kGramThreads, 0, stream, tab, args);
    }
  } else {
    launch_kernel(gram_registers_kernel<T, kind, R>, grid, kGramThreads, 0, stream, tab, args);
  }
}

// Whether the register path takes this many slab rows (cross_gram: K <= 4, 16 products).
inline bool use_registers(GramKind, int64_t rows) { return rows <= 8; }

template <class T, GramKind kind>
inline void launch_gram_table(const GramTable& tab, const GramArgs& args, cudaStream_t stream) {
  using A = accum_t<T>;
  const int64_t total = tab.begin[tab.num_blocks];
  const unsigned grid =
      unsigned(std::clamp<int64_t>(ceil_div(total, kMinColumnsPerCta), 1, gram_ctas()));
  if (use_registers(kind, args.rows)) {
    switch (args.rows) {
      case 1: return launch_registers<T, kind, 1>(tab, args, grid, stream);
      case 2: return launch_registers<T, kind, 2>(tab, args, grid, stream);
      case 3: return launch_registers<T, kind, 3>(tab, args, grid, stream);
      case 4: return launch_registers<T, kind, 4>(tab, args, grid, stream);
      case 5: return launch_registers<T, kind, 5>(tab, args, grid, stream);
      case 6: return launch_registers<T, kind, 6>(tab, args, grid, stream);
      case 7: return launch_registers<T, kind, 7>(tab, args, grid, stream);
      default: return launch_registers<T, kind, 8>(tab, args, grid, stream);
    }
  }
  const TileGeometry geo = tile_geometry(kind, args.K, args.rows, sizeof(A));
  launch_kernel(gram_tiles_kernel<T, kind>, grid, kGramThreads, tile_shared_bytes(geo, sizeof(A)), stream, tab, args,
                geo);
}

// One call: a launch per kTableBlocks non-empty blocks (usually one), chained by the carry.
// p1/stride1: operand 1 (b or y) per block, or null for gram.
template <class T, GramKind kind>
void launch_gram(const T* const* p0, const int64_t* stride0, const void* const* p1, const int64_t* stride1,
                 const int64_t* cols, int64_t num_blocks, int64_t K, const void* beta, void* workspace,
                 accum_t<T>* out, cudaStream_t stream) {
  const size_t size1 = kind == GramKind::cross ? sizeof(T) : sizeof(accum_t<T>);
  GramArgs args{};
  args.K = K;
  args.rows = kind == GramKind::cross || kind == GramKind::joint ? 2 * K : K;
  args.n = kind == GramKind::joint ? 2 * K : K;
  args.beta = beta;
  args.workspace = workspace;
  args.out = out;
  args.first = 1;
  for_each_table<2>(
      num_blocks, cols,
      [&](int64_t j, TableOperand (&ops)[2]) {
        ops[0] = {p0[j], stride0[j], sizeof(T), 16};
        ops[1] = {p1 ? p1[j] : nullptr, p1 ? stride1[j] : 0, size1, 16};
      },
      [&](const GramTable& tab, bool last) {
        args.last = last ? 1 : 0;
        launch_gram_table<T, kind>(tab, args, stream);
        args.first = 0;
      });
}

}  // namespace gpu
}  // namespace mk
