// Euclidean projection onto the probability simplex {x : x >= 0, sum x = 1}, shared by the CPU and
// CUDA kernels (one row per call, no scratch memory, so one GPU thread can own a row).
//
// The projection is x_i = max(v_i - tau, 0) with tau the unique root of sum_i max(v_i - tau, 0) = 1.
// It is invariant to adding a constant to v, so the row is shifted by its maximum m first: with
// w = v - m, the largest w is 0 and the root lies in [-1, 0). Without the shift tau would be a sum
// of the v_i, whose "- 1" vanishes once |v| exceeds 2^53 and which overflows for large finite v.
// Michelot's fixed point finds tau exactly from any start below the root: tau = -1 keeps only the
// coordinates within 1 of the maximum (so the sums stay within K in magnitude), then each pass
// keeps the coordinates above the current tau and sets tau to (their sum - 1) / their count; tau
// never decreases and the kept set only shrinks, so it ends after at most K + 1 passes with the
// exact support. Arithmetic is in double.
#pragma once

#include "platform.h"

namespace mk {

// Reads v[0], v[stride], ..., v[(K-1)*stride]; writes x likewise. Any non-finite input makes the
// whole row NaN: there is no meaningful projection, and NaN must not be hidden.
template <class Load, class Store>
MK_HD void project_simplex_row(int64_t K, Load load, Store store) {
  if (K < 1) return;
  bool finite = true;
  double top = load(0);
  for (int64_t i = 0; i < K; ++i) {
    const double vi = load(i);
    finite = finite && is_finite(vi);
    top = vi > top ? vi : top;
  }
  if (!finite) {
    const double nan = 0.0 / 0.0;
    for (int64_t i = 0; i < K; ++i) store(i, nan);
    return;
  }
  // v_i - top may round to -inf for a far smaller v_i; such a coordinate is never kept.
  double tau = -1.0;
  int64_t kept = 0;  // no pass yet: the first one always sets tau
  for (int64_t pass = 0; pass <= K; ++pass) {
    double kept_sum = 0.0;
    int64_t now_kept = 0;
    for (int64_t i = 0; i < K; ++i) {
      const double wi = load(i) - top;
      if (wi > tau) {
        kept_sum += wi;
        ++now_kept;
      }
    }
    // The maximum (w = 0) is always kept: tau <= -1 / kept < 0, also after rounding, since a sum
    // of non-positive w is non-positive.
    if (now_kept == kept) break;
    kept = now_kept;
    tau = (kept_sum - 1.0) / double(kept);
  }
  for (int64_t i = 0; i < K; ++i) {
    const double xi = (load(i) - top) - tau;
    store(i, xi > 0.0 ? xi : 0.0);
  }
}

}  // namespace mk
