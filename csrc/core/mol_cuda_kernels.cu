#include "cuda_kernels.h"
#include "cuda_gram.cuh"
#include "cuda_products.cuh"

namespace mk {
template <class T>
void track_gram_cuda(const StackView<T>& g, const MutableStackView<accum_t<T>>& y, const accum_t<T>* beta,
                     void* workspace, accum_t<T>* out, cudaStream_t stream) {
  // The update is fused into the Gram's loads for every K: each element of y is read, updated and
  // written exactly once.
  gpu::launch_gram<T, gpu::GramKind::track>(g.data, g.row_stride, reinterpret_cast<const void* const*>(y.data),
                                            y.row_stride, g.cols, g.num_blocks, g.K, beta, workspace, out, stream);
}

template <class T>
void joint_gram_cuda(const StackView<T>& g, const StackView<accum_t<T>>& y, void* workspace, accum_t<T>* out,
                     cudaStream_t stream) {
  gpu::launch_gram<T, gpu::GramKind::joint>(g.data, g.row_stride, reinterpret_cast<const void* const*>(y.data),
                                            y.row_stride, g.cols, g.num_blocks, g.K, nullptr, workspace, out, stream);
}

template <class T, class U>
void track_combine_cuda(const StackView<T>& g, const MutableStackView<accum_t<T>>& y, const accum_t<T>* scale,
                        const accum_t<T>* beta, const accum_t<T>* weights, U* const* out, accum_t<T> alpha,
                        bool accumulate, cudaStream_t stream) {
  // y <- y + beta (scale_k g - y) is fused into the combination's loads: each element of y is read
  // and written once.
  const gpu::CombineArgs<accum_t<T>> args{g.K, weights, scale, beta, alpha, accumulate ? 1 : 0};
  gpu::launch_combine<T, U, gpu::CombineKind::track>(g.data, g.row_stride, g.cols, g.num_blocks, y.data, y.row_stride,
                                                     out, args, stream);
}

#define MK_INSTANTIATE_OUT(T, U)                                                                              \
  template void track_combine_cuda<T, U>(const StackView<T>&, const MutableStackView<accum_t<T>>&,            \
                                         const accum_t<T>*, const accum_t<T>*, const accum_t<T>*, U* const*,    \
                                         accum_t<T>, bool, cudaStream_t);
#define MK_INSTANTIATE(T)                                                                                     \
  template void track_gram_cuda<T>(const StackView<T>&, const MutableStackView<accum_t<T>>&, const accum_t<T>*, \
                                   void*, accum_t<T>*, cudaStream_t);                                         \
  template void joint_gram_cuda<T>(const StackView<T>&, const StackView<accum_t<T>>&, void*, accum_t<T>*,     \
                                   cudaStream_t);                                                             \
  MK_INSTANTIATE_OUT(T, float)                                                                                \
  MK_INSTANTIATE_OUT(T, double)                                                                               \
  MK_INSTANTIATE_OUT(T, half_t)                                                                               \
  MK_INSTANTIATE_OUT(T, bf16_t)
MK_INSTANTIATE(float)
MK_INSTANTIATE(double)
MK_INSTANTIATE(half_t)
MK_INSTANTIATE(bf16_t)
#undef MK_INSTANTIATE
#undef MK_INSTANTIATE_OUT

}  // namespace mk
