// CUDA launchers of the federated learning kernels (fl_kernels.h describes what each computes). They
// take device pointers, run on `stream` and never synchronise with the host: the step counts and
// the mask are read on the device.
#pragma once

#include "cuda_runtime_types.h"

#include "fl_kernels.h"

namespace mk {
namespace fl {

template <class T>
void adam_step_cuda(T* params, const T* grads, accum_t<T>* exp_avg, accum_t<T>* exp_avg_sq, int64_t* step,
                    const bool* active, int64_t C, int64_t D, const AdamHyper& hyper, cudaStream_t stream);

template <class T>
void sgd_step_cuda(T* params, const T* grads, accum_t<T>* momentum_buffer, const bool* active, int64_t C, int64_t D,
                   const SgdHyper& hyper, cudaStream_t stream);

// partials: weighted_mean_cuda_partials(C, D) accumulators of device workspace.
int64_t weighted_mean_cuda_partials(int64_t C, int64_t D);
template <class T>
void weighted_mean_cuda(const T* x, const accum_t<T>* weights, const bool* active, int64_t C, int64_t D,
                        accum_t<T>* partials, T* out, cudaStream_t stream);

}  // namespace fl
}  // namespace mk
