// Internal to the CUDA kernels: the column-wise combination behind combine and the fused second
// pass, over row loaders, device functors `A operator()(int64_t row, int64_t col)`, so that a pass
// can transform (and write back) each element as it is read. The Gram family is in cuda_gram.cuh.
#pragma once

#include <algorithm>

#include "convert.h"
#include "cpu_kernels.h"  // StackView
#include "gpu_launch.cuh"

namespace mk {
namespace gpu {

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t blocks_for(int64_t n, int64_t threads) { return std::max<int64_t>(1, ceil_div(n, threads)); }

// Reads a block of a stack: element (row, col) widened to the accumulation type.
template <class T>
struct BlockLoad {
  const T* data;
  int64_t row_stride;
  __device__ accum_t<T> operator()(int64_t row, int64_t col) const { return to_float(data[row * row_stride + col]); }
};

// out[c] (+)= alpha * sum_k weights[k] * load(k, c), accumulated in A, rounded once on store.
template <class A, class U, class Load>
__global__ void combine_kernel(Load load, int64_t K, int64_t cols, const A* weights, U* out, A alpha,
                               bool accumulate) {
  MK_DYNAMIC_SHARED(unsigned char, weight_bytes);
  A* w = reinterpret_cast<A*>(weight_bytes);
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) w[k] = weights[k];
  __syncthreads();
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < cols; c += int64_t(gridDim.x) * blockDim.x) {
    A acc = 0;
    for (int64_t k = 0; k < K; ++k) acc += w[k] * load(k, c);
    const A value = accumulate ? A(to_float(out[c])) + alpha * acc : alpha * acc;
    out[c] = from_float<U>(accum_t<U>(value));
  }
}

template <class A, class U, class Load>
inline void launch_combine(const Load& load, int64_t K, int64_t cols, const A* weights, U* out, A alpha,
                           bool accumulate, cudaStream_t stream) {
  constexpr int threads = 256;
  const int64_t grid = std::min<int64_t>(blocks_for(cols, threads), 65535);
  launch_kernel(combine_kernel<A, U, Load>, unsigned(grid), threads, size_t(K) * sizeof(A), stream, load, K, cols,
                weights, out, alpha, accumulate);
}

}  // namespace gpu
}  // namespace mk
