// The CUDA min-norm solver for K <= 32: one warp per K x K problem, lane i owning index i (row i of
// the matrices, lambda_i, the i-th bit of the corral mask). The same decisions as min_norm.h (a
// non-finite G gives NaN, K = 1 gives 1, an all-zero G the uniform weights, K = 2 the closed form,
// K >= 3 Wolfe's minimum-norm-point algorithm on G normalised by its largest diagonal entry), with
// the affine minimiser over the corral S kept by the sweep operator as in the Triton kernel
// (molkernels/triton/min_norm.py explains it): T is A = G + 11^T swept on the indices of S, so
// T_SS = -A_SS^-1 and a = -T_SS 1 is the affine minimiser up to its sum; a gradient enters or
// leaves S by one rank-1 update of T (each lane updates its own row), and a residual check sweeps
// S afresh when undone sweeps have let T drift.
//
// Everything stays in the warp: the normalised G and T in the warp's shared memory, vectors in
// registers, the corral as a 32-bit mask (__ballot_sync), sums and minima by xor butterflies in a
// fixed order (every lane ends with bitwise the same value, so every branch is warp-uniform and
// the result deterministic). No __syncthreads and no global workspace: lanes exchange shared
// memory across __syncwarp().
#pragma once

#include "convert.h"
#include "gpu_launch.cuh"
#include "min_norm.h"

namespace mk {
namespace gpu {

// The largest K the warp solver takes (one index per lane).
constexpr int64_t kMinNormWarpMaxK = 32;
// Problems per CTA: each warp's tiles take 17 KB of the 48 KB of static shared memory.
constexpr int kMinNormWarps = 2;
// |1 - A_SS a| above this times sum |a| (entries of A are at most 2) is beyond the rounding of a
// fresh elimination: the swept T has drifted.
constexpr double kMinNormResidualTol = 1e-12;

constexpr unsigned kFullWarp = 0xFFFFFFFFu;

// One warp's shared memory; rows padded to 33 so that lanes walking their own rows hit different
// banks.
struct MinNormTiles {
  double G[32][33];     // the normalised, exactly symmetric G
  double T[32][33];     // A = G + 11^T swept on the corral
  double scaled[32];    // the pivot column of a sweep, divided by the pivot
  double broadcast[32]; // a vector every lane reads whole (lambda, a)
};

__device__ inline double warp_sum(double x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullWarp, x, offset);
  return x;
}
__device__ inline double warp_max(double x) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const double other = __shfl_xor_sync(kFullWarp, x, offset);
    x = other > x ? other : x;
  }
  return x;
}
// The smallest value and, among equal ones, the lowest index (min_norm.h's first minimum).
__device__ inline int warp_argmin(double value, int index) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const double other = __shfl_xor_sync(kFullWarp, value, offset);
    const int other_index = __shfl_xor_sync(kFullWarp, index, offset);
    if (other < value || (other == value && other_index < index)) {
      value = other;
      index = other_index;
    }
  }
  return index;
}

// T swept on index k (sign 1), or that sweep undone (sign -1): in any order, sweeping A on every
// index of S turns A_SS into -A_SS^-1. Lane i rewrites row i from the broadcast pivot column.
__device__ inline void min_norm_sweep(MinNormTiles& tiles, int K, int lane, int k, double sign) {
  const bool valid = lane < K;
  const double pivot = tiles.T[k][k];
  const double column = valid ? tiles.T[lane][k] : 0.0;
  const double scaled = column / pivot;
  if (valid) tiles.scaled[lane] = scaled;
  __syncwarp();  // every lane has read the pivot column before any row changes
  if (valid) {
    double* row = tiles.T[lane];
    if (lane == k) {
      for (int j = 0; j < K; ++j) row[j] = tiles.scaled[j] * sign;
      row[k] = -1.0 / pivot;
    } else {
      for (int j = 0; j < K; ++j) row[j] -= column * tiles.scaled[j];
      row[k] = scaled * sign;
    }
  }
  __syncwarp();
}

// sum over j < K of term(j) in four interleaved chains (j mod 4), added pairwise at the end: a
// fixed order with a quarter of the dependent additions of one chain.
template <class Term>
__device__ inline double chained_sum(int K, Term term) {
  double chain[4] = {0.0, 0.0, 0.0, 0.0};
  for (int j = 0; j < K; j += 4) {
#pragma unroll
    for (int r = 0; r < 4; ++r)
      if (j + r < K) chain[r] += term(j + r);
  }
  return (chain[0] + chain[1]) + (chain[2] + chain[3]);
}

// sum over the corral's indices j of row[j].
__device__ inline double corral_row_sum(const double* row, unsigned corral, int K) {
  return chained_sum(K, [&](int j) { return corral >> j & 1u ? row[j] : 0.0; });
}

// Resets T to A = G + 11^T and sweeps it on every index of the corral in ascending order; false
// when a pivot is not positive (an affinely dependent corral).
__device__ inline bool min_norm_sweep_afresh(MinNormTiles& tiles, int K, int lane, unsigned corral) {
  if (lane < K)
    for (int j = 0; j < K; ++j) tiles.T[lane][j] = tiles.G[lane][j] + 1.0;
  __syncwarp();
  bool independent = true;
  for (int c = 0; c < K; ++c) {
    if (!(corral >> c & 1u)) continue;
    independent = independent && tiles.T[c][c] > kMinNormPivotTol;
    min_norm_sweep(tiles, K, lane, c, 1.0);
  }
  return independent;
}

// Wolfe's algorithm for K >= 3 on tiles.G (written and synced): lane i's lambda_i, on the simplex.
__device__ inline double min_norm_wolfe(MinNormTiles& tiles, int K, int lane) {
  const bool valid = lane < K;
  const double inf = 1.0 / 0.0;
  const int start = warp_argmin(valid ? tiles.G[lane][lane] : inf, lane);  // the shortest gradient
  double lambda = lane == start ? 1.0 : 0.0;
  unsigned corral = 1u << start;
  min_norm_sweep_afresh(tiles, K, lane, corral);  // its pivot G_ss + 1 >= 1
  double previous_lambda = lambda, previous_f = 2.0;  // above any f, since f <= max_i G_ii = 1
  bool running = true;
  // Wolfe's algorithm is finite; the bound on major cycles only guards against rounding.
  for (int major = 0; running && major < 8 * K + 16; ++major) {
    tiles.broadcast[lane] = lambda;
    __syncwarp();
    // (G lambda)_i = <x, g_i>
    const double g_lambda = valid ? chained_sum(K, [&](int j) { return tiles.G[lane][j] * tiles.broadcast[j]; }) : 0.0;
    __syncwarp();  // read before the broadcast is rewritten
    const double f = warp_sum(lambda * g_lambda);
    const double score = valid ? g_lambda : inf;
    const int entering = warp_argmin(score, lane);
    const double gap = f - __shfl_sync(kFullWarp, score, entering);
    const bool improved = f < previous_f;
    if (!improved) lambda = previous_lambda;  // a minor cycle that rounding made worse is undone
    const bool stop = gap <= kMinNormGapRelTol * f + kMinNormGapAbsTol || !improved ||
                      (corral >> entering & 1u) != 0 || __popc(corral) == K;  // only rounding gets to the last two
    // A newcomer whose pivot is not positive is affinely dependent on S: keep the current point.
    if (stop || !(tiles.T[entering][entering] > kMinNormPivotTol)) break;
    previous_f = f;
    previous_lambda = lambda;
    min_norm_sweep(tiles, K, lane, entering, 1.0);
    corral |= 1u << entering;

    // Minor cycle: move to the affine minimiser of the corral, dropping members that leave it.
    for (int minor = 0; minor < K; ++minor) {
      const bool member = (corral >> lane & 1u) != 0;
      double a = member ? -corral_row_sum(tiles.T[lane], corral, K) : 0.0;
      tiles.broadcast[lane] = a;
      __syncwarp();
      const double A_a = member ? chained_sum(K, [&](int j) {
        return corral >> j & 1u ? (tiles.G[lane][j] + 1.0) * tiles.broadcast[j] : 0.0;
      }) : 0.0;
      __syncwarp();
      const double residual = member ? (A_a > 1.0 ? A_a - 1.0 : 1.0 - A_a) : 0.0;
      bool solved = true;
      if (warp_max(residual) > warp_sum(a < 0.0 ? -a : a) * kMinNormResidualTol) {
        solved = min_norm_sweep_afresh(tiles, K, lane, corral);
        a = member ? -corral_row_sum(tiles.T[lane], corral, K) : 0.0;
      }
      const double a_total = warp_sum(a);
      const double alpha = member ? a / a_total : 0.0;
      const bool leaving = member && alpha <= kMinNormZeroWeight;
      const bool interior = __ballot_sync(kFullWarp, leaving) == 0;
      // The largest step from lambda towards alpha that stays in the simplex.
      const bool blocking = leaving && lambda - alpha > 0.0;
      double theta = -warp_max(blocking ? -(lambda / (lambda - alpha)) : -1.0);
      theta = theta < 1.0 ? theta : 1.0;
      const double stepped = member ? (1.0 - theta) * lambda + theta * alpha : 0.0;
      // Members at zero leave, at least the one that limited the step.
      const int weakest = warp_argmin(member ? stepped : inf, lane);
      const bool kept = member && stepped > kMinNormZeroWeight && lane != weakest;
      if (!solved) {  // a dependent corral: keep the current (feasible) point and end the search
        running = false;
        break;
      }
      if (interior) {
        lambda = alpha;
        break;
      }
      lambda = kept ? stepped : 0.0;
      const unsigned kept_mask = __ballot_sync(kFullWarp, kept);
      for (unsigned dropped = corral & ~kept_mask; dropped != 0; dropped &= dropped - 1)
        min_norm_sweep(tiles, K, lane, __ffs(int(dropped)) - 1, -1.0);
      corral = kept_mask;
    }
  }
  lambda = lambda > 0.0 ? lambda : 0.0;
  return lambda / warp_sum(lambda);
}

// The problem at G_in (K x K, row-major) solved by the calling warp; lane i writes out[i].
template <class T>
__device__ void min_norm_warp(const T* G_in, int K, T* out, MinNormTiles& tiles, int lane) {
  const bool valid = lane < K;
  auto load = [&](int i, int j) { return double(to_float(G_in[int64_t(i) * K + j])); };
  auto store = [&](double x) {
    if (valid) out[lane] = from_float<T>(accum_t<T>(x));
  };
  bool finite = true;
  if (valid)
    for (int j = 0; j < K; ++j) finite = finite && is_finite(load(lane, j));
  const double scale = warp_max(valid ? load(lane, lane) : 0.0);  // as min_norm.h: max(0, max_i G_ii)
  if (__ballot_sync(kFullWarp, !finite) != 0) return store(0.0 / 0.0);
  if (K == 1) return store(1.0);
  if (!(scale > 0.0)) return store(1.0 / double(K));  // every gradient is zero: the symmetric weights
  // Each entry is scaled before the two are added, as in min_norm.h (no overflow near the largest
  // double); the sum commutes, so the tile is exactly symmetric.
  if (valid)
    for (int j = 0; j < K; ++j) tiles.G[lane][j] = 0.5 * (load(lane, j) / scale) + 0.5 * (load(j, lane) / scale);
  __syncwarp();
  if (K == 2) {
    const double t = min_norm_pair_weight(tiles.G[0][0], tiles.G[0][1], tiles.G[1][1]);
    return store(lane == 0 ? t : 1.0 - t);
  }
  store(min_norm_wolfe(tiles, K, lane));
}

// Warp w of CTA b solves problems b * kMinNormWarps + w, striding by the grid's warps.
template <class T>
__global__ void __launch_bounds__(kMinNormWarps * 32)
    min_norm_warp_kernel(const T* gram, int64_t batch, int K, T* out) {
  MK_SHARED(MinNormTiles, tiles, [kMinNormWarps]);
  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int64_t stride = int64_t(gridDim.x) * kMinNormWarps;
  for (int64_t b = int64_t(blockIdx.x) * kMinNormWarps + warp; b < batch; b += stride) {
    min_norm_warp(gram + b * K * K, K, out + b * K, tiles[warp], lane);
    __syncwarp();  // every lane is done with the tiles before the next problem writes them
  }
}

}  // namespace gpu
}  // namespace mk
