// CUDA launchers of the federated learning kernels (fl_kernels.h describes what each computes). They
// take device pointers, run on `stream` and never synchronise with the host: the step counts and
// the mask are read on the device.
#pragma once

#include "cuda_runtime_types.h"

#include <cstddef>

#include "fl_kernels.h"

namespace mk {
namespace fl {

template <class T>
void adam_step_cuda(T* params, const T* grads, accum_t<T>* exp_avg, accum_t<T>* exp_avg_sq, int64_t* step,
                    const bool* active, int64_t C, int64_t D, const AdamHyper& hyper, cudaStream_t stream);

template <class T>
void sgd_step_cuda(T* params, const T* grads, accum_t<T>* momentum_buffer, const bool* active, int64_t C, int64_t D,
                   const SgdHyper& hyper, cudaStream_t stream);

// One launch. workspace: weighted_mean_cuda_workspace_bytes<T>(C, D) bytes of device memory whose
// first weighted_mean_cuda_ticket_bytes(D) bytes (the column blocks' ticket counters) are zero
// before the first call; every call leaves them zero again, so a workspace can be reused by later
// calls on the same stream and under CUDA graph replay. The rest needs no initialisation.
size_t weighted_mean_cuda_ticket_bytes(int64_t D);
template <class T>
size_t weighted_mean_cuda_workspace_bytes(int64_t C, int64_t D);
template <class T>
void weighted_mean_cuda(const T* x, const accum_t<T>* weights, const bool* active, int64_t C, int64_t D,
                        void* workspace, T* out, cudaStream_t stream);

}  // namespace fl
}  // namespace mk
