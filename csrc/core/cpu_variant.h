// The per-instruction-set variants of the CPU hot loops, and the dispatch between them (internal to
// csrc/core). Each variant namespace (isa_baseline, isa_avx2, isa_avx512) holds the same functions
// with the signatures of cpu_kernels.h, mol_kernels.h and fl_kernels.h, compiled by its own
// cpu_variant_<isa>.cpp and fl_variant_<isa>.cpp; the public functions call the variant that
// cpu_isa() names.
#pragma once

#include "cpu_isa.h"
#include "cpu_kernels.h"
#include "fl_kernels.h"
#include "mol_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#define MK_X86_VARIANTS 1
#else
#define MK_X86_VARIANTS 0
#endif

#define MK_DECLARE_CPU_VARIANT(ns)                                                                                 \
  namespace ns {                                                                                                   \
  template <class T>                                                                                               \
  void gram_cpu(const StackView<T>& g, accum_t<T>* out);                                                           \
  template <class T>                                                                                               \
  void cross_gram_cpu(const StackView<T>& a, const StackView<T>& b, accum_t<T>* out);                              \
  template <class T, class U>                                                                                      \
  void combine_into_cpu(const StackView<T>& g, const accum_t<T>* weights, U* const* out, accum_t<T> alpha,         \
                        bool accumulate);                                                                          \
  template <class T>                                                                                               \
  void track_gram_cpu(const StackView<T>& g, const MutableStackView<accum_t<T>>& y, accum_t<T> beta,               \
                      accum_t<T>* out);                                                                            \
  template <class T>                                                                                               \
  void joint_gram_cpu(const StackView<T>& g, const StackView<accum_t<T>>& y, accum_t<T>* out);                     \
  template <class T, class U>                                                                                      \
  void track_combine_cpu(const StackView<T>& g, const MutableStackView<accum_t<T>>& y, const accum_t<T>* scale,    \
                         accum_t<T> beta, const accum_t<T>* weights, U* const* out, accum_t<T> alpha,              \
                         bool accumulate);                                                                         \
  }                                                                                                                \
  namespace fl {                                                                                                   \
  namespace ns {                                                                                                   \
  template <class T>                                                                                               \
  void adam_step_cpu(T* params, const T* grads, accum_t<T>* exp_avg, accum_t<T>* exp_avg_sq, int64_t* step,       \
                     const bool* active, int64_t C, int64_t D, const AdamHyper& hyper);                            \
  template <class T>                                                                                               \
  void sgd_step_cpu(T* params, const T* grads, accum_t<T>* momentum_buffer, const bool* active, int64_t C,         \
                    int64_t D, const SgdHyper& hyper);                                                             \
  template <class T>                                                                                               \
  void weighted_mean_cpu(const T* x, const accum_t<T>* weights, const bool* active, int64_t C, int64_t D, T* out); \
  }                                                                                                                \
  }

namespace mk {
MK_DECLARE_CPU_VARIANT(isa_baseline)
#if MK_X86_VARIANTS
MK_DECLARE_CPU_VARIANT(isa_avx2)
MK_DECLARE_CPU_VARIANT(isa_avx512)
#endif
}  // namespace mk

// return <variant>::CALL for the variant in use; CALL is e.g. gram_cpu<T>(g, out). Used inside
// namespace mk (or mk::fl, for the FL kernels).
#if MK_X86_VARIANTS
#define MK_CPU_DISPATCH(...)                 \
  switch (::mk::cpu_isa()) {                 \
    case ::mk::CpuIsa::avx512:               \
      return isa_avx512::__VA_ARGS__;        \
    case ::mk::CpuIsa::avx2:                 \
      return isa_avx2::__VA_ARGS__;          \
    default:                                 \
      return isa_baseline::__VA_ARGS__;      \
  }
#else
#define MK_CPU_DISPATCH(...)             \
  do {                                   \
    (void)::mk::cpu_isa();               \
    return isa_baseline::__VA_ARGS__;    \
  } while (0)
#endif
