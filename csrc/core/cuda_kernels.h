// CUDA launchers of the core ops on raw device pointers. No torch headers: the stream and all
// device memory (outputs and workspaces) come from the caller. Nothing here synchronises with the
// host, so every launcher is safe under CUDA graph capture.
#pragma once

#include "cuda_runtime_types.h"

#include <cstddef>

#include "cpu_kernels.h"  // StackView

namespace mk {

// The Gram family (gram_cuda, track_gram_cuda, joint_gram_cuda) is one launch per call (one per
// 512 non-empty blocks beyond that) with a grid of 2 CTAs per SM of the current device, each CTA
// writing one partial that the last CTA sums; see cuda_gram.cuh.
//
// Workspace: gram_cuda_workspace_bytes(n) bytes of device memory for an n x n result (n = K; 2K
// for joint_gram), on the device that runs the call. Its first 4 bytes are the CTAs' ticket
// counter: they must be zero before the first call, and every call leaves them zero again (the
// last CTA resets the counter), so a workspace can be reused by later calls on the same stream
// and under CUDA graph replay. The rest, (2 SMs + 1) n^2 doubles, needs no initialisation.
size_t gram_cuda_workspace_bytes(int64_t n);
// Bytes at the start of the workspace that hold the ticket (zero them once).
constexpr size_t kGramCudaTicketBytes = 16;
// The largest K the Gram family takes (gram, cross_gram, track_gram, joint_gram alike).
constexpr int64_t kGramCudaMaxK = 512;

// out[K*K] (device) = sum over blocks of A B^T; b == nullptr computes the symmetric Gram of a.
// The StackView's pointer arrays live on the host; the data they point to on the device.
// Bitwise deterministic on a given device (fixed grid); exactly symmetric for b == nullptr.
template <class T>
void gram_cuda(const StackView<T>& a, const StackView<T>* b, void* workspace, accum_t<T>* out, cudaStream_t stream);

// The combinations (combine_cuda, combine_into_cuda, track_combine_cuda) are one launch per call
// for all blocks (one per 512 non-empty blocks beyond that), any K, no workspace; each output
// element is summed in row order by one thread, so results are bitwise deterministic; see
// cuda_products.cuh.
//
// out[j] (device) = sum_k weights[k] * block_j[k, :]; weights is a device array of K accumulators.
template <class T>
void combine_cuda(const StackView<T>& g, const accum_t<T>* weights, T* const* out, cudaStream_t stream);

// out[j] = alpha * sum_k weights[k] * block_j[k, :], or out[j] += that with `accumulate`.
template <class T, class U>
void combine_into_cuda(const StackView<T>& g, const accum_t<T>* weights, U* const* out, accum_t<T> alpha,
                       bool accumulate, cudaStream_t stream);

template <class T>
void project_simplex_cuda(const T* v, int64_t rows, int64_t K, T* out, cudaStream_t stream);

// lambda = argmin over the simplex of lambda^T G lambda for each of the batch's K x K matrices
// (min_norm.h's contract). K <= 32: one warp per problem, no workspace (cuda_min_norm.cuh); above, a
// thread per problem with min_norm_workspace(K) doubles of its own. work: min_norm_cuda_workspace
// (batch, K) doubles of device memory (none, and work may be null, for K <= 32).
int64_t min_norm_cuda_workspace(int64_t batch, int64_t K);
template <class T>
void min_norm_cuda(const T* gram, int64_t batch, int64_t K, T* out, double* work, cudaStream_t stream);

}  // namespace mk

// Fused multi-objective passes (mol_kernels.h describes them); y is the tracking state in the
// accumulation type, with g's structure. track_gram and joint_gram take a workspace of
// gram_cuda_workspace_bytes(K) and gram_cuda_workspace_bytes(2K) bytes, its ticket zero (see
// gram_cuda). beta points to one value in device memory.
#include "mol_kernels.h"

namespace mk {

template <class T>
void track_gram_cuda(const StackView<T>& g, const MutableStackView<accum_t<T>>& y, const accum_t<T>* beta,
                     void* workspace, accum_t<T>* out, cudaStream_t stream);

template <class T>
void joint_gram_cuda(const StackView<T>& g, const StackView<accum_t<T>>& y, void* workspace, accum_t<T>* out,
                     cudaStream_t stream);

template <class T, class U>
void track_combine_cuda(const StackView<T>& g, const MutableStackView<accum_t<T>>& y, const accum_t<T>* scale,
                        const accum_t<T>* beta, const accum_t<T>* weights, U* const* out, accum_t<T> alpha,
                        bool accumulate, cudaStream_t stream);

}  // namespace mk
