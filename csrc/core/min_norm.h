// The min-norm point of the convex hull of K gradients, from their Gram matrix alone, shared by the
// CPU and CUDA kernels:
//
//     lambda = argmin_{lambda in simplex} lambda^T G lambda.
//
// K = 1 and K = 2 have closed forms. For K >= 3 this is Wolfe's minimum-norm-point algorithm
// (Wolfe 1976) written in barycentric coordinates, so it needs only G: a corral S of affinely
// independent gradients is grown by the gradient most opposed to the current point, and the
// affine minimiser over S is found from the bordered KKT system [[G_SS, 1], [1^T, 0]]. It is
// finite and exact up to rounding, whatever the rank of G, unlike a fixed number of Frank-Wolfe
// steps. Everything runs in double on a copy of G normalised by its largest diagonal entry.
#pragma once

#include "platform.h"

namespace mk {

// The solver's thresholds, shared with the CUDA warp solver (cuda_min_norm.cuh), all relative to G
// normalised by its largest diagonal entry. Stopping rule: the Frank-Wolfe gap f - min_i <x, g_i>
// bounds (f - f*) / 2, so these give f within 2e-10 relative (or 2e-13 of the largest squared
// norm) of f*.
constexpr double kMinNormGapRelTol = 1e-10, kMinNormGapAbsTol = 1e-13;
// Barycentric coordinates at or below this count as zero.
constexpr double kMinNormZeroWeight = 1e-14;
// A pivot at or below this is not positive: the corral would be affinely dependent.
constexpr double kMinNormPivotTol = 1e-300;
// K = 2: |g0 - g1|^2 at or below this counts as g0 = g1.
constexpr double kMinNormCollinearTol = 1e-15;

// K = 2, on the normalised G: the weight t of g0 minimising |t g0 + (1 - t) g1|^2 over [0, 1].
MK_HD double min_norm_pair_weight(double g00, double g01, double g11) {
  const double curvature = g00 - 2.0 * g01 + g11;  // |g0 - g1|^2
  if (!(curvature > kMinNormCollinearTol)) return 0.5;
  const double t = (g11 - g01) / curvature;
  return t < 0.0 ? 0.0 : (t > 1.0 ? 1.0 : t);
}

// Doubles of scratch memory min_norm_solve needs for a K x K problem.
MK_HD int64_t min_norm_workspace(int64_t K) { return 4 * K + (K + 1) * (K + 2) + K * K; }

namespace detail {

// Solves the (n x n) system A x = b in place by Gaussian elimination with partial pivoting
// (A row-major with leading dimension n + 1, b stored as its last column). Returns false when a
// pivot vanishes. x overwrites the last column.
MK_HD bool solve_augmented(double* A, int64_t n) {
  const int64_t ld = n + 1;
  for (int64_t col = 0; col < n; ++col) {
    int64_t pivot = col;
    double best = A[col * ld + col] < 0 ? -A[col * ld + col] : A[col * ld + col];
    for (int64_t r = col + 1; r < n; ++r) {
      const double a = A[r * ld + col] < 0 ? -A[r * ld + col] : A[r * ld + col];
      if (a > best) {
        best = a;
        pivot = r;
      }
    }
    if (!(best > kMinNormPivotTol)) return false;
    if (pivot != col) {
      for (int64_t c = col; c <= n; ++c) {
        const double t = A[col * ld + c];
        A[col * ld + c] = A[pivot * ld + c];
        A[pivot * ld + c] = t;
      }
    }
    const double inv = 1.0 / A[col * ld + col];
    for (int64_t r = col + 1; r < n; ++r) {
      const double factor = A[r * ld + col] * inv;
      if (factor == 0.0) continue;
      for (int64_t c = col; c <= n; ++c) A[r * ld + c] -= factor * A[col * ld + c];
    }
  }
  for (int64_t r = n - 1; r >= 0; --r) {
    double acc = A[r * ld + n];
    for (int64_t c = r + 1; c < n; ++c) acc -= A[r * ld + c] * A[c * ld + n];
    A[r * ld + n] = acc / A[r * ld + r];
  }
  return true;
}

}  // namespace detail

// gram(i, j) returns G_ij as double; store(i, value) receives lambda_i. `work` holds
// min_norm_workspace(K) doubles. Non-finite entries in G give an all-NaN lambda.
template <class LoadGram, class Store>
MK_HD void min_norm_solve(int64_t K, LoadGram gram, Store store, double* work) {
  double scale = 0.0;
  bool finite = true;
  for (int64_t i = 0; i < K; ++i) {
    for (int64_t j = 0; j < K; ++j) finite = finite && is_finite(gram(i, j));
    scale = gram(i, i) > scale ? gram(i, i) : scale;
  }
  if (!finite) {
    const double nan = 0.0 / 0.0;
    for (int64_t i = 0; i < K; ++i) store(i, nan);
    return;
  }
  if (K == 1) {
    store(0, 1.0);
    return;
  }
  if (!(scale > 0.0)) {  // every gradient is zero: every lambda is optimal; take the symmetric one
    for (int64_t i = 0; i < K; ++i) store(i, 1.0 / double(K));
    return;
  }
  double* lambda = work;         // K, barycentric coordinates of the current point
  double* Glambda = work + K;    // K, (G lambda)_i = <x, g_i>
  double* alpha = work + 2 * K;  // K, affine minimiser over the corral
  double* corral = work + 3 * K; // K, indices of the corral (stored as doubles to keep one buffer)
  double* system = work + 4 * K; // (K + 1) x (K + 2), the bordered system with its right-hand side
  double* normalised = system + (K + 1) * (K + 2);  // K x K, the symmetrised G / max_i G_ii
  // Each entry is scaled before the two are added: G_ij + G_ji overflows for entries near the
  // largest double, while |G_ij| <= max_i G_ii for a Gram matrix.
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < K; ++j) normalised[i * K + j] = 0.5 * (gram(i, j) / scale) + 0.5 * (gram(j, i) / scale);
  auto G = [&](int64_t i, int64_t j) { return normalised[i * K + j]; };

  if (K == 2) {
    const double t = min_norm_pair_weight(G(0, 0), G(0, 1), G(1, 1));
    store(0, t);
    store(1, 1.0 - t);
    return;
  }

  int64_t start = 0;
  for (int64_t i = 1; i < K; ++i)
    if (G(i, i) < G(start, start)) start = i;
  for (int64_t i = 0; i < K; ++i) lambda[i] = 0.0;
  lambda[start] = 1.0;
  corral[0] = double(start);
  int64_t size = 1;

  double previous_f = 2.0;  // > any f, since f <= max_i G_ii = 1
  const int64_t max_major = 8 * K + 16;  // Wolfe's algorithm is finite; this only bounds rounding
  for (int64_t major = 0; major < max_major; ++major) {
    double f = 0.0;
    int64_t entering = 0;
    for (int64_t i = 0; i < K; ++i) {
      double acc = 0.0;
      for (int64_t s = 0; s < size; ++s) {
        const int64_t j = int64_t(corral[s]);
        acc += G(i, j) * lambda[j];
      }
      Glambda[i] = acc;
      if (acc < Glambda[entering]) entering = i;
    }
    for (int64_t s = 0; s < size; ++s) {
      const int64_t j = int64_t(corral[s]);
      f += lambda[j] * Glambda[j];
    }
    if (f - Glambda[entering] <= kMinNormGapRelTol * f + kMinNormGapAbsTol || !(f < previous_f)) break;
    previous_f = f;
    bool already_in = false;
    for (int64_t s = 0; s < size; ++s) already_in = already_in || int64_t(corral[s]) == entering;
    if (already_in || size == K) break;  // only rounding can get here
    corral[size++] = double(entering);

    // Minor cycle: move to the affine minimiser of the corral, dropping members that leave it.
    for (int64_t minor = 0; minor < K; ++minor) {
      const int64_t n = size + 1, ld = size + 2;
      for (int64_t r = 0; r < size; ++r) {
        const int64_t i = int64_t(corral[r]);
        for (int64_t c = 0; c < size; ++c) system[r * ld + c] = G(i, int64_t(corral[c]));
        system[r * ld + size] = 1.0;
        system[r * ld + n] = 0.0;
      }
      for (int64_t c = 0; c < size; ++c) system[size * ld + c] = 1.0;
      system[size * ld + size] = 0.0;
      system[size * ld + n] = 1.0;
      if (!detail::solve_augmented(system, n)) {
        major = max_major;  // affinely dependent corral: keep the current (feasible) point
        break;
      }
      bool interior = true;
      for (int64_t s = 0; s < size; ++s) {
        alpha[s] = system[s * ld + n];
        interior = interior && alpha[s] > kMinNormZeroWeight;
      }
      if (interior) {
        for (int64_t s = 0; s < size; ++s) lambda[int64_t(corral[s])] = alpha[s];
        break;
      }
      // Largest step from lambda towards alpha that stays in the simplex.
      double theta = 1.0;
      for (int64_t s = 0; s < size; ++s) {
        const double l = lambda[int64_t(corral[s])];
        if (alpha[s] <= kMinNormZeroWeight && l - alpha[s] > 0.0) {
          const double t = l / (l - alpha[s]);
          theta = t < theta ? t : theta;
        }
      }
      int64_t kept = 0;
      int64_t weakest = 0;
      for (int64_t s = 0; s < size; ++s) {
        const int64_t i = int64_t(corral[s]);
        lambda[i] = (1.0 - theta) * lambda[i] + theta * alpha[s];
        if (lambda[i] < lambda[int64_t(corral[weakest])]) weakest = s;
      }
      // Drop members at zero; at least the one that limited the step.
      const int64_t forced = int64_t(corral[weakest]);
      for (int64_t s = 0; s < size; ++s) {
        const int64_t i = int64_t(corral[s]);
        if (lambda[i] > kMinNormZeroWeight && i != forced) {
          corral[kept++] = double(i);
        } else {
          lambda[i] = 0.0;
        }
      }
      size = kept;
    }
  }

  double total = 0.0;
  for (int64_t i = 0; i < K; ++i) {
    lambda[i] = lambda[i] > 0.0 ? lambda[i] : 0.0;
    total += lambda[i];
  }
  for (int64_t i = 0; i < K; ++i) store(i, lambda[i] / total);
}

}  // namespace mk
