// The workspace of the CUDA Gram family (core/cuda_kernels.h: gram_cuda, track_gram_cuda,
// joint_gram_cuda), shared by ops_cuda.cpp and mol_ops_cuda.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "core/cuda_kernels.h"

namespace molkernels {

// gram_cuda_workspace_bytes(n) bytes on `like`'s device (the current one: callers hold a
// CUDAGuard) for an n x n result of K objectives. The bytes come fresh from the caching allocator,
// so the ticket counter at their start is zeroed here, once, on the call's stream (under graph
// capture this memset is a node of the graph and runs before the kernel on every replay); the
// kernel's last CTA leaves the counter zero again.
inline at::Tensor gram_workspace_cuda(const at::Tensor& like, int64_t n, int64_t K) {
  TORCH_CHECK_VALUE(K <= mk::kGramCudaMaxK, "g: the CUDA Gram kernels take K <= ", mk::kGramCudaMaxK, ", got K = ", K);
  at::Tensor workspace =
      at::empty({int64_t(mk::gram_cuda_workspace_bytes(n))}, like.options().dtype(at::kByte));
  C10_CUDA_CHECK(cudaMemsetAsync(workspace.data_ptr(), 0, mk::kGramCudaTicketBytes, at::cuda::getCurrentCUDAStream()));
  return workspace;
}

}  // namespace molkernels
