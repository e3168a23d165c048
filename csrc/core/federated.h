// Federated learning, the per-element math of the client-stacked optimiser steps, shared by the CPU
// and CUDA kernels (fl_kernels.h declares them). Client c's parameters, gradients and optimiser
// state are row c of [C, D] arrays; the state is in the accumulation type A (float, double for
// double parameters).
//
// The updates follow torch.optim's CPU operation order, rounding for rounding, so that an active row
// equals torch.optim.Adam / torch.optim.SGD on that client alone bit for bit:
//   * where torch fuses a multiply-add (add(alpha=), lerp, addcmul, all vectorised as fmadd) the
//     update calls fma;
//   * where torch rounds a product that a later op adds to (SGD's buf.mul_(momentum).add_(grad)),
//     rounded_product keeps it rounded: nvcc would contract it into an fma, and so would GCC (the
//     CPU translation unit also turns contraction off);
//   * Python-float hyperparameters are rounded to A once, as torch rounds a Scalar, and the bias
//     corrections are computed in double from the step count, as torch does in Python.
#pragma once

#include <cmath>
#include <cstdint>

#include "platform.h"

namespace mk {
namespace fl {

MK_HD float fused_multiply_add(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
MK_HD double fused_multiply_add(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// a * b rounded, never contracted with the addition that consumes it.
MK_HD float rounded_product(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MK_HD double rounded_product(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

MK_HD float square_root(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}
MK_HD double square_root(double x) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

// The hyperparameters of one call, as the caller passes them (Python floats).
struct AdamHyper {
  double lr, beta1, beta2, eps, weight_decay;
};
struct SgdHyper {
  double lr, momentum, weight_decay;
};

// The per-call constants of an Adam step, rounded to A as torch rounds its Scalar arguments.
template <class A>
struct AdamConstants {
  A weight_decay;
  A lerp_weight;         // 1 - beta1
  bool lerp_from_start;  // torch's lerp: start + w (end - start) for |w| < 0.5, else end - (1 - w)(end - start)
  A beta2;
  A one_minus_beta2;
  A eps;
};

template <class A>
AdamConstants<A> adam_constants(const AdamHyper& h) {
  const A lerp_weight = A(1.0 - h.beta1);
  return {A(h.weight_decay), lerp_weight, std::fabs(lerp_weight) < A(0.5), A(h.beta2), A(1.0 - h.beta2), A(h.eps)};
}

// The per-client constants at step t (already incremented): -lr / (1 - beta1^t) and
// sqrt(1 - beta2^t), in double as torch computes them from a Python float, then rounded to A.
template <class A>
struct AdamRow {
  A neg_step_size;
  A bias_correction2_sqrt;
};

template <class A>
MK_HD AdamRow<A> adam_row(const AdamHyper& h, int64_t t) {
  const double bias_correction1 = 1.0 - pow(h.beta1, double(t));
  const double bias_correction2 = 1.0 - pow(h.beta2, double(t));
  return {A(-(h.lr / bias_correction1)), A(pow(bias_correction2, 0.5))};  // torch: bias_correction2 ** 0.5
}

// One element of an active client's Adam step: p, m, v updated in place from the gradient g.
template <class A>
MK_HD void adam_update(A& p, A g, A& m, A& v, const AdamConstants<A>& k, const AdamRow<A>& row) {
  // Both conditions hold for the whole call; as selects rather than branches the CPU loop vectorises.
  const A decayed = fused_multiply_add(p, k.weight_decay, g);  // grad.add(param, alpha=wd)
  g = k.weight_decay != A(0) ? decayed : g;                    // torch skips the add for wd = 0
  const A diff = g - m;                                        // exp_avg.lerp_(grad, 1 - beta1)
  m = fused_multiply_add(k.lerp_from_start ? k.lerp_weight : k.lerp_weight - A(1), diff, k.lerp_from_start ? m : g);
  v = fused_multiply_add(k.one_minus_beta2 * g, g, rounded_product(v, k.beta2));  // mul_(beta2).addcmul_(g, g)
  const A denom = square_root(v) / row.bias_correction2_sqrt + k.eps;
  p = p + (row.neg_step_size * m) / denom;  // addcdiv_(m, denom, value=-step_size)
}

template <class A>
struct SgdConstants {
  A weight_decay;
  A momentum;
  A neg_lr;
};

template <class A>
SgdConstants<A> sgd_constants(const SgdHyper& h) {
  return {A(h.weight_decay), A(h.momentum), A(-h.lr)};
}

// One element of an active client's SGD step; buffer is null without momentum. A zero buffer gives
// buf = 0 * momentum + g = g, torch's first step.
template <class A>
MK_HD void sgd_update(A& p, A g, A* buffer, const SgdConstants<A>& k) {
  const A decayed = fused_multiply_add(p, k.weight_decay, g);
  g = k.weight_decay != A(0) ? decayed : g;
  if (buffer != nullptr) {
    g = rounded_product(*buffer, k.momentum) + g;  // buf.mul_(momentum).add_(grad)
    *buffer = g;
  }
  p = fused_multiply_add(g, k.neg_lr, p);  // param.add_(grad, alpha=-lr)
}

// The weighted mean sums the active clients in groups of kMeanGroup consecutive clients, then the
// group sums in group order, and its total weight likewise (group_weight, then the groups' shares
// in group order): a fixed order that every backend follows, so the result does not depend on the
// backend, the thread count or the launch shape, and a GPU gets C / kMeanGroup independent partial
// sums per column, and as many shares of the total, to run in parallel.
constexpr int64_t kMeanGroup = 32;

// The active weights of clients first..last-1, summed in client order: one group's share of the
// total weight.
template <class A>
MK_HD A group_weight(const A* weights, const bool* active, int64_t first, int64_t last) {
  A sum = 0;
  for (int64_t c = first; c < last; ++c)
    if (active[c]) sum += weights[c];
  return sum;
}

template <class A>
MK_HD A weighted_term(A sum, A weight, A x) {
  return fused_multiply_add(weight, x, sum);
}

// sum / total, or NaN when the active weights sum to zero (or no client is active). NAN, not
// numeric_limits: device code may not call that host constexpr without --expt-relaxed-constexpr.
template <class A>
MK_HD A mean_or_nan(A sum, A total) {
  return total != A(0) ? sum / total : A(NAN);
}

}  // namespace fl
}  // namespace mk
