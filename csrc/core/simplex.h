// Euclidean projection onto the probability simplex {x : x >= 0, sum x = 1}, shared by the CPU and
// CUDA kernels (one row per call, no scratch memory, so one GPU thread can own a row).
//
// The projection is x_i = max(v_i - tau, 0) with tau the unique root of sum_i max(v_i - tau, 0) = 1.
// Michelot's fixed point finds tau exactly: start from the mean over all coordinates and keep only
// the coordinates above the current tau; tau never decreases and the kept set only shrinks, so it
// ends after at most K passes with the exact support. Arithmetic is in double.
#pragma once

#include "platform.h"

namespace mk {

// Reads v[0], v[stride], ..., v[(K-1)*stride]; writes x likewise. Any non-finite input makes the
// whole row NaN: there is no meaningful projection, and NaN must not be hidden.
template <class Load, class Store>
MK_HD void project_simplex_row(int64_t K, Load load, Store store) {
  double sum = 0.0;
  for (int64_t i = 0; i < K; ++i) sum += load(i);
  if (!is_finite(sum)) {
    const double nan = 0.0 / 0.0;
    for (int64_t i = 0; i < K; ++i) store(i, nan);
    return;
  }
  double tau = (sum - 1.0) / double(K);
  int64_t kept = K;
  for (int64_t pass = 0; pass < K; ++pass) {
    double kept_sum = 0.0;
    int64_t now_kept = 0;
    for (int64_t i = 0; i < K; ++i) {
      const double vi = load(i);
      if (vi > tau) {
        kept_sum += vi;
        ++now_kept;
      }
    }
    // The largest v_i always exceeds tau (an average shifted down by 1/kept), so now_kept >= 1 in
    // exact arithmetic; the second test only guards against rounding.
    if (now_kept == kept || now_kept == 0) break;
    kept = now_kept;
    tau = (kept_sum - 1.0) / double(kept);
  }
  for (int64_t i = 0; i < K; ++i) {
    const double xi = load(i) - tau;
    store(i, xi > 0.0 ? xi : 0.0);
  }
}

}  // namespace mk
