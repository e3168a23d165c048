// The federated learning CPU kernels: the variant of cpu_isa() (bodies in fl_variant_impl.h, one
// copy per instruction set).
#include "fl_kernels.h"

#include "cpu_variant.h"

namespace mk {
namespace fl {

template <class T>
void adam_step_cpu(T* params, const T* grads, accum_t<T>* exp_avg, accum_t<T>* exp_avg_sq, int64_t* step,
                   const bool* active, int64_t C, int64_t D, const AdamHyper& hyper) {
  MK_CPU_DISPATCH(adam_step_cpu<T>(params, grads, exp_avg, exp_avg_sq, step, active, C, D, hyper));
}

template <class T>
void sgd_step_cpu(T* params, const T* grads, accum_t<T>* momentum_buffer, const bool* active, int64_t C, int64_t D,
                  const SgdHyper& hyper) {
  MK_CPU_DISPATCH(sgd_step_cpu<T>(params, grads, momentum_buffer, active, C, D, hyper));
}

template <class T>
void weighted_mean_cpu(const T* x, const accum_t<T>* weights, const bool* active, int64_t C, int64_t D, T* out) {
  MK_CPU_DISPATCH(weighted_mean_cpu<T>(x, weights, active, C, D, out));
}

#define MK_INSTANTIATE(T)                                                                                         \
  template void adam_step_cpu<T>(T*, const T*, accum_t<T>*, accum_t<T>*, int64_t*, const bool*, int64_t, int64_t, \
                                 const AdamHyper&);                                                              \
  template void sgd_step_cpu<T>(T*, const T*, accum_t<T>*, const bool*, int64_t, int64_t, const SgdHyper&);       \
  template void weighted_mean_cpu<T>(const T*, const accum_t<T>*, const bool*, int64_t, int64_t, T*);
MK_INSTANTIATE(float)
MK_INSTANTIATE(double)
MK_INSTANTIATE(half_t)
MK_INSTANTIATE(bf16_t)
#undef MK_INSTANTIATE

}  // namespace fl
}  // namespace mk
