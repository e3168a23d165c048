// Federated learning kernels on raw pointers, CPU (OpenMP; CUDA in fl_cuda_kernels.h); no torch headers.
// Client c's values are row c of row-major [C, D] arrays; step (int64) and active (bool) have one
// entry per client; the optimiser state is in accum_t<T>. The per-element math is in federated.h.
#pragma once

#include <cstdint>

#include "federated.h"

namespace mk {
namespace fl {

// For each active client c: step[c] += 1, then Adam's update of its row with bias corrections at
// step[c]. Inactive rows and their step are not written.
template <class T>
void adam_step_cpu(T* params, const T* grads, accum_t<T>* exp_avg, accum_t<T>* exp_avg_sq, int64_t* step,
                   const bool* active, int64_t C, int64_t D, const AdamHyper& hyper);

// For each active client: SGD's update of its row; momentum_buffer is null when momentum is 0.
template <class T>
void sgd_step_cpu(T* params, const T* grads, accum_t<T>* momentum_buffer, const bool* active, int64_t C, int64_t D,
                  const SgdHyper& hyper);

// out[D] = sum over active c of weights[c] x[c, :] / sum over active c of weights[c] (NaN where
// that total is zero), summed in the order of federated.h's kMeanGroup groups.
template <class T>
void weighted_mean_cpu(const T* x, const accum_t<T>* weights, const bool* active, int64_t C, int64_t D, T* out);

}  // namespace fl
}  // namespace mk
