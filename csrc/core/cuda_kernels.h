// CUDA launchers of the core ops on raw device pointers. No torch headers: the stream and all
// device memory (outputs and workspaces) come from the caller. Nothing here synchronises with the
// host, so every launcher is safe under CUDA graph capture.
#pragma once

#include "cuda_runtime_types.h"

#include "cpu_kernels.h"  // StackView

namespace mk {

// Partial K x K sums the Gram kernels write before their fixed-order reduction: the caller
// allocates gram_cuda_parts(...) * K * K accumulators of workspace.
int64_t gram_cuda_parts(const int64_t* cols, int64_t num_blocks, int64_t K);

// out[K*K] (device) = sum over blocks of A B^T; b == nullptr computes the symmetric Gram of a.
// The StackView's pointer arrays live on the host; the data they point to on the device.
template <class T>
void gram_cuda(const StackView<T>& a, const StackView<T>* b, accum_t<T>* partials, accum_t<T>* out, cudaStream_t stream);

// out[j] (device) = sum_k weights[k] * block_j[k, :]; weights is a device array of K accumulators.
template <class T>
void combine_cuda(const StackView<T>& g, const accum_t<T>* weights, T* const* out, cudaStream_t stream);

// out[j] = alpha * sum_k weights[k] * block_j[k, :], or out[j] += that with `accumulate`.
template <class T, class U>
void combine_into_cuda(const StackView<T>& g, const accum_t<T>* weights, U* const* out, accum_t<T> alpha,
                       bool accumulate, cudaStream_t stream);

template <class T>
void project_simplex_cuda(const T* v, int64_t rows, int64_t K, T* out, cudaStream_t stream);

// work: batch * min_norm_workspace(K) doubles of device memory.
template <class T>
void min_norm_cuda(const T* gram, int64_t batch, int64_t K, T* out, double* work, cudaStream_t stream);

}  // namespace mk

// Fused multi-objective passes (mol_kernels.h describes them); y is the tracking state in the
// accumulation type, with g's structure. track_gram and joint_gram need gram_cuda_parts(...) slots
// of rows x rows partials (rows = K, and 2K for joint_gram). beta points to one value in device memory.
#include "mol_kernels.h"

namespace mk {

template <class T>
void track_gram_cuda(const StackView<T>& g, const MutableStackView<accum_t<T>>& y, const accum_t<T>* beta,
                     accum_t<T>* partials, accum_t<T>* out, cudaStream_t stream);

template <class T>
void joint_gram_cuda(const StackView<T>& g, const StackView<accum_t<T>>& y, accum_t<T>* partials, accum_t<T>* out,
                     cudaStream_t stream);

template <class T, class U>
void track_combine_cuda(const StackView<T>& g, const MutableStackView<accum_t<T>>& y, const accum_t<T>* scale,
                        const accum_t<T>* beta, const accum_t<T>* weights, U* const* out, accum_t<T> alpha,
                        bool accumulate, cudaStream_t stream);

}  // namespace mk
