// The fused passes of the multi-objective steps: the variant of cpu_isa() (bodies in
// cpu_variant_impl.h, one copy per instruction set).
#include "mol_kernels.h"

#include "cpu_variant.h"

namespace mk {

template <class T>
void track_gram_cpu(const StackView<T>& g, const MutableStackView<accum_t<T>>& y, accum_t<T> beta, accum_t<T>* out) {
  MK_CPU_DISPATCH(track_gram_cpu<T>(g, y, beta, out));
}

template <class T>
void joint_gram_cpu(const StackView<T>& g, const StackView<accum_t<T>>& y, accum_t<T>* out) {
  MK_CPU_DISPATCH(joint_gram_cpu<T>(g, y, out));
}

template <class T, class U>
void track_combine_cpu(const StackView<T>& g, const MutableStackView<accum_t<T>>& y, const accum_t<T>* scale,
                       accum_t<T> beta, const accum_t<T>* weights, U* const* out, accum_t<T> alpha, bool accumulate) {
  MK_CPU_DISPATCH(track_combine_cpu<T, U>(g, y, scale, beta, weights, out, alpha, accumulate));
}

#define MK_INSTANTIATE_OUT(T, U)                                                                               \
  template void track_combine_cpu<T, U>(const StackView<T>&, const MutableStackView<accum_t<T>>&,              \
                                        const accum_t<T>*, accum_t<T>, const accum_t<T>*, U* const*, accum_t<T>, \
                                        bool);
#define MK_INSTANTIATE(T)                                                                                         \
  template void track_gram_cpu<T>(const StackView<T>&, const MutableStackView<accum_t<T>>&, accum_t<T>, accum_t<T>*); \
  template void joint_gram_cpu<T>(const StackView<T>&, const StackView<accum_t<T>>&, accum_t<T>*);                \
  MK_INSTANTIATE_OUT(T, float)                                                                                    \
  MK_INSTANTIATE_OUT(T, double)                                                                                   \
  MK_INSTANTIATE_OUT(T, half_t)                                                                                   \
  MK_INSTANTIATE_OUT(T, bf16_t)
MK_INSTANTIATE(float)
MK_INSTANTIATE(double)
MK_INSTANTIATE(half_t)
MK_INSTANTIATE(bf16_t)
#undef MK_INSTANTIATE
#undef MK_INSTANTIATE_OUT

}  // namespace mk
