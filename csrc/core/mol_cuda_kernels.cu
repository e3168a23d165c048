#include "cuda_kernels.h"
#include "cuda_products.cuh"

namespace mk {
namespace {

// y <- y - beta (y - g) for one element as it is staged; returns the updated value. beta is read
// from device memory, where the step computed it, so that a graph replay uses the current rate.
template <class T>
struct TrackedLoad {
  const T* g;
  int64_t g_stride;
  accum_t<T>* y;
  int64_t y_stride;
  const accum_t<T>* beta;
  __device__ accum_t<T> operator()(int64_t row, int64_t col) const {
    accum_t<T>& yk = y[row * y_stride + col];
    const accum_t<T> updated = yk - *beta * (yk - accum_t<T>(to_float(g[row * g_stride + col])));
    yk = updated;
    return updated;
  }
};

// Rows [0, K) of y, then rows [K, 2K) of g.
template <class T>
struct JointLoad {
  const T* g;
  int64_t g_stride;
  const accum_t<T>* y;
  int64_t y_stride;
  int64_t K;
  __device__ accum_t<T> operator()(int64_t row, int64_t col) const {
    return row < K ? y[row * y_stride + col] : accum_t<T>(to_float(g[(row - K) * g_stride + col]));
  }
};

// y <- y + beta (scale_k g - y) for one element; returns the updated value.
template <class T>
struct ScaledTrackedLoad {
  const T* g;
  int64_t g_stride;
  accum_t<T>* y;
  int64_t y_stride;
  const accum_t<T>* scale;
  const accum_t<T>* beta;
  __device__ accum_t<T> operator()(int64_t row, int64_t col) const {
    accum_t<T>& yk = y[row * y_stride + col];
    const accum_t<T> updated = yk + *beta * (scale[row] * accum_t<T>(to_float(g[row * g_stride + col])) - yk);
    yk = updated;
    return updated;
  }
};

// The tracking update alone, for K > 32 where a CTA's rows do not cover all of K.
template <class T>
__global__ void track_kernel(TrackedLoad<T> load, int64_t K, int64_t cols) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < K * cols; e += int64_t(gridDim.x) * blockDim.x)
    load(e / cols, e % cols);
}

}  // namespace

template <class T>
void track_gram_cuda(const StackView<T>& g, const MutableStackView<accum_t<T>>& y, const accum_t<T>* beta,
                     accum_t<T>* partials, accum_t<T>* out, cudaStream_t stream) {
  using A = accum_t<T>;
  // The update is fused into the staging of the Gram when one 32-row tile holds all K rows, so
  // that each element is staged, and updated, exactly once. Larger K updates y first: one more
  // pass over y.
  const bool fused = g.K <= gpu::kRowTile;
  int64_t part0 = 0;
  for (int64_t j = 0; j < g.num_blocks; ++j) {
    const TrackedLoad<T> tracked{g.data[j], g.row_stride[j], y.data[j], y.row_stride[j], beta};
    if (fused) {
      gpu::launch_products<A>(tracked, tracked, g.K, g.cols[j], true, partials, part0, stream);
    } else {
      const int64_t grid = std::min<int64_t>(gpu::blocks_for(g.K * g.cols[j], 256), 65535);
      launch_kernel(track_kernel<T>, unsigned(grid), 256, 0, stream, tracked, g.K, g.cols[j]);
      const gpu::BlockLoad<A> state{y.data[j], y.row_stride[j]};
      gpu::launch_products<A>(state, state, g.K, g.cols[j], true, partials, part0, stream);
    }
    part0 += gpu::ctas_for_columns(g.cols[j]);
  }
  gpu::reduce_partials<A>(partials, part0, g.K, true, out, stream);
}

template <class T>
void joint_gram_cuda(const StackView<T>& g, const StackView<accum_t<T>>& y, accum_t<T>* partials, accum_t<T>* out,
                     cudaStream_t stream) {
  using A = accum_t<T>;
  int64_t part0 = 0;
  for (int64_t j = 0; j < g.num_blocks; ++j) {
    const JointLoad<T> joint{g.data[j], g.row_stride[j], y.data[j], y.row_stride[j], g.K};
    gpu::launch_products<A>(joint, joint, 2 * g.K, g.cols[j], true, partials, part0, stream);
    part0 += gpu::ctas_for_columns(g.cols[j]);
  }
  gpu::reduce_partials<A>(partials, part0, 2 * g.K, true, out, stream);
}

template <class T, class U>
void track_combine_cuda(const StackView<T>& g, const MutableStackView<accum_t<T>>& y, const accum_t<T>* scale,
                        const accum_t<T>* beta, const accum_t<T>* weights, U* const* out, accum_t<T> alpha,
                        bool accumulate, cudaStream_t stream) {
  for (int64_t j = 0; j < g.num_blocks; ++j) {
    const ScaledTrackedLoad<T> load{g.data[j], g.row_stride[j], y.data[j], y.row_stride[j], scale, beta};
    gpu::launch_combine<accum_t<T>, U>(load, g.K, g.cols[j], weights, out[j], alpha, accumulate, stream);
  }
}

#define MK_INSTANTIATE_OUT(T, U)                                                                              \
  template void track_combine_cuda<T, U>(const StackView<T>&, const MutableStackView<accum_t<T>>&,            \
                                         const accum_t<T>*, const accum_t<T>*, const accum_t<T>*, U* const*,    \
                                         accum_t<T>, bool, cudaStream_t);
#define MK_INSTANTIATE(T)                                                                                     \
  template void track_gram_cuda<T>(const StackView<T>&, const MutableStackView<accum_t<T>>&, const accum_t<T>*, \
                                   accum_t<T>*, accum_t<T>*, cudaStream_t);                                   \
  template void joint_gram_cuda<T>(const StackView<T>&, const StackView<accum_t<T>>&, accum_t<T>*,            \
                                   accum_t<T>*, cudaStream_t);                                                \
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
