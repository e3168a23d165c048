#include "cuda_kernels.h"

#include <algorithm>

#include "convert.h"
#include "cuda_gram.cuh"
#include "cuda_min_norm.cuh"
#include "cuda_products.cuh"
#include "min_norm.h"
#include "simplex.h"

namespace mk {
namespace {

using gpu::blocks_for;

template <class T>
__global__ void project_simplex_kernel(const T* v, int64_t rows, int64_t K, T* out) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const T* in_row = v + r * K;
  T* out_row = out + r * K;
  project_simplex_row(
      K, [&](int64_t i) { return double(to_float(in_row[i])); },
      [&](int64_t i, double x) { out_row[i] = from_float<T>(accum_t<T>(x)); });
}

// K > gpu::kMinNormWarpMaxK: a thread per problem running min_norm.h's solver on its workspace.
template <class T>
__global__ void min_norm_kernel(const T* gram, int64_t batch, int64_t K, T* out, double* work) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  const T* G = gram + b * K * K;
  T* lambda = out + b * K;
  min_norm_solve(
      K, [&](int64_t i, int64_t j) { return double(to_float(G[i * K + j])); },
      [&](int64_t i, double x) { lambda[i] = from_float<T>(accum_t<T>(x)); }, work + b * min_norm_workspace(K));
}

}  // namespace

size_t gram_cuda_workspace_bytes(int64_t n) { return gpu::gram_workspace_bytes(n); }

template <class T>
void gram_cuda(const StackView<T>& a, const StackView<T>* b, void* workspace, accum_t<T>* out,
               cudaStream_t stream) {
  if (b) {
    gpu::launch_gram<T, gpu::GramKind::cross>(a.data, a.row_stride, reinterpret_cast<const void* const*>(b->data),
                                              b->row_stride, a.cols, a.num_blocks, a.K, nullptr, workspace, out,
                                              stream);
  } else {
    gpu::launch_gram<T, gpu::GramKind::gram>(a.data, a.row_stride, nullptr, nullptr, a.cols, a.num_blocks, a.K,
                                             nullptr, workspace, out, stream);
  }
}

template <class T, class U>
void combine_into_cuda(const StackView<T>& g, const accum_t<T>* weights, U* const* out, accum_t<T> alpha,
                       bool accumulate, cudaStream_t stream) {
  const gpu::CombineArgs<accum_t<T>> args{g.K, weights, nullptr, nullptr, alpha, accumulate ? 1 : 0};
  gpu::launch_combine<T, U, gpu::CombineKind::plain>(g.data, g.row_stride, g.cols, g.num_blocks, nullptr, nullptr, out,
                                                     args, stream);
}

template <class T>
void combine_cuda(const StackView<T>& g, const accum_t<T>* weights, T* const* out, cudaStream_t stream) {
  combine_into_cuda<T, T>(g, weights, out, accum_t<T>(1), false, stream);
}

template <class T>
void project_simplex_cuda(const T* v, int64_t rows, int64_t K, T* out, cudaStream_t stream) {
  launch_kernel(project_simplex_kernel<T>, unsigned(blocks_for(rows, 128)), 128, 0, stream, v, rows, K, out);
}

int64_t min_norm_cuda_workspace(int64_t batch, int64_t K) {
  return K <= gpu::kMinNormWarpMaxK ? 0 : batch * min_norm_workspace(K);
}

template <class T>
void min_norm_cuda(const T* gram, int64_t batch, int64_t K, T* out, double* work, cudaStream_t stream) {
  if (batch == 0) return;
  if (K <= gpu::kMinNormWarpMaxK) {
    // The warps stride over the batch, so any batch fits the grid; 8 CTAs per SM are more than its
    // shared memory holds at once.
    const int64_t ctas =
        std::min<int64_t>(blocks_for(batch, gpu::kMinNormWarps), 8 * int64_t(device_multiprocessors()));
    launch_kernel(gpu::min_norm_warp_kernel<T>, unsigned(ctas), gpu::kMinNormWarps * 32, 0, stream, gram, batch,
                  int(K), out);
  } else {
    launch_kernel(min_norm_kernel<T>, unsigned(blocks_for(batch, 64)), 64, 0, stream, gram, batch, K, out, work);
  }
}

#define MK_INSTANTIATE_INTO(T, U)                                                                            \
  template void combine_into_cuda<T, U>(const StackView<T>&, const accum_t<T>*, U* const*, accum_t<T>, bool,   \
                                        cudaStream_t);
#define MK_INSTANTIATE(T)                                                                                      \
  template void gram_cuda<T>(const StackView<T>&, const StackView<T>*, void*, accum_t<T>*, cudaStream_t);       \
  template void combine_cuda<T>(const StackView<T>&, const accum_t<T>*, T* const*, cudaStream_t);             \
  MK_INSTANTIATE_INTO(T, float)                                                                                \
  MK_INSTANTIATE_INTO(T, double)                                                                               \
  MK_INSTANTIATE_INTO(T, half_t)                                                                               \
  MK_INSTANTIATE_INTO(T, bf16_t)                                                                               \
  template void project_simplex_cuda<T>(const T*, int64_t, int64_t, T*, cudaStream_t);                        \
  template void min_norm_cuda<T>(const T*, int64_t, int64_t, T*, double*, cudaStream_t);
MK_INSTANTIATE(float)
MK_INSTANTIATE(double)
MK_INSTANTIATE(half_t)
MK_INSTANTIATE(bf16_t)
#undef MK_INSTANTIATE
#undef MK_INSTANTIATE_INTO

}  // namespace mk
