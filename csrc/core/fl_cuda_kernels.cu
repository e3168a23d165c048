// CUDA kernels of the federated learning steps. An Adam/SGD CTA covers kColumnChunk columns of one
// client's row and returns at once for an inactive client, so inactive rows are never touched and
// an active row is read and written once. The weighted mean sums each group of kMeanGroup clients
// into a partial per column (one CTA per group and column block), then the partials in group order:
// the order every backend uses (federated.h).
#include "fl_cuda_kernels.h"

#include <algorithm>

#include "convert.h"
#include "gpu_launch.cuh"

namespace mk {
namespace fl {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kColumnChunk = 4 * kThreads;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Counted before the update kernel runs, which then reads each client's new step: CTAs of one row
// run in any order, so none of them may both read and write the count.
__global__ void count_steps_kernel(int64_t* step, const bool* active, int64_t C) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c < C && active[c]) step[c] += 1;
}

template <class T>
__global__ void adam_kernel(T* params, const T* grads, accum_t<T>* exp_avg, accum_t<T>* exp_avg_sq,
                            const int64_t* step, const bool* active, int64_t D, int64_t chunks, AdamHyper hyper,
                            AdamConstants<accum_t<T>> k) {
  using A = accum_t<T>;
  const int64_t c = int64_t(blockIdx.x) / chunks;
  if (!active[c]) return;
  const AdamRow<A> row = adam_row<A>(hyper, step[c]);
  const int64_t col0 = (int64_t(blockIdx.x) % chunks) * kColumnChunk;
  const int64_t end = c * D + min(col0 + kColumnChunk, D);
  for (int64_t at = c * D + col0 + threadIdx.x; at < end; at += kThreads) {
    A p = A(to_float(params[at]));
    adam_update(p, A(to_float(grads[at])), exp_avg[at], exp_avg_sq[at], k, row);
    params[at] = from_float<T>(p);
  }
}

template <class T>
__global__ void sgd_kernel(T* params, const T* grads, accum_t<T>* momentum_buffer, const bool* active, int64_t D,
                           int64_t chunks, SgdConstants<accum_t<T>> k) {
  using A = accum_t<T>;
  const int64_t c = int64_t(blockIdx.x) / chunks;
  if (!active[c]) return;
  const int64_t col0 = (int64_t(blockIdx.x) % chunks) * kColumnChunk;
  const int64_t end = c * D + min(col0 + kColumnChunk, D);
  for (int64_t at = c * D + col0 + threadIdx.x; at < end; at += kThreads) {
    A p = A(to_float(params[at]));
    sgd_update<A>(p, A(to_float(grads[at])), momentum_buffer ? momentum_buffer + at : nullptr, k);
    params[at] = from_float<T>(p);
  }
}

// partials[group * D + j] = sum over the group's active clients c of weights[c] x[c, j].
template <class T>
__global__ void mean_partials_kernel(const T* x, const accum_t<T>* weights, const bool* active, int64_t C, int64_t D,
                                     int64_t column_blocks, accum_t<T>* partials) {
  using A = accum_t<T>;
  const int64_t group = int64_t(blockIdx.x) / column_blocks;
  const int64_t j = (int64_t(blockIdx.x) % column_blocks) * kThreads + threadIdx.x;
  if (j >= D) return;
  A sum = 0;
  const int64_t first = group * kMeanGroup, last = min(C, first + kMeanGroup);
  for (int64_t c = first; c < last; ++c)
    if (active[c]) sum = weighted_term(sum, weights[c], A(to_float(x[c * D + j])));
  partials[group * D + j] = sum;
}

// *total = the active weights summed in client order (one thread: C is small next to C x D).
template <class A>
__global__ void total_weight_kernel(const A* weights, const bool* active, int64_t C, A* total) {
  A sum = 0;
  for (int64_t c = 0; c < C; ++c)
    if (active[c]) sum += weights[c];
  *total = sum;
}

template <class T>
__global__ void mean_finish_kernel(const accum_t<T>* partials, int64_t groups, int64_t D, const accum_t<T>* total,
                                   T* out) {
  using A = accum_t<T>;
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= D) return;
  A sum = 0;
  for (int64_t group = 0; group < groups; ++group) sum += partials[group * D + j];
  out[j] = from_float<T>(mean_or_nan(sum, *total));
}

}  // namespace

template <class T>
void adam_step_cuda(T* params, const T* grads, accum_t<T>* exp_avg, accum_t<T>* exp_avg_sq, int64_t* step,
                    const bool* active, int64_t C, int64_t D, const AdamHyper& hyper, cudaStream_t stream) {
  launch_kernel(count_steps_kernel, unsigned(ceil_div(C, kThreads)), kThreads, 0, stream, step, active, C);
  if (D == 0) return;
  const int64_t chunks = ceil_div(D, kColumnChunk);
  launch_kernel(adam_kernel<T>, unsigned(C * chunks), kThreads, 0, stream, params, grads, exp_avg, exp_avg_sq, step,
                active, D, chunks, hyper, adam_constants<accum_t<T>>(hyper));
}

template <class T>
void sgd_step_cuda(T* params, const T* grads, accum_t<T>* momentum_buffer, const bool* active, int64_t C, int64_t D,
                   const SgdHyper& hyper, cudaStream_t stream) {
  if (D == 0) return;
  const int64_t chunks = ceil_div(D, kColumnChunk);
  launch_kernel(sgd_kernel<T>, unsigned(C * chunks), kThreads, 0, stream, params, grads, momentum_buffer, active, D,
                chunks, sgd_constants<accum_t<T>>(hyper));
}

int64_t weighted_mean_cuda_partials(int64_t C, int64_t D) { return ceil_div(C, kMeanGroup) * D + 1; }

template <class T>
void weighted_mean_cuda(const T* x, const accum_t<T>* weights, const bool* active, int64_t C, int64_t D,
                        accum_t<T>* partials, T* out, cudaStream_t stream) {
  using A = accum_t<T>;
  const int64_t groups = ceil_div(C, kMeanGroup), column_blocks = ceil_div(D, kThreads);
  A* total = partials + groups * D;
  launch_kernel(total_weight_kernel<A>, 1, 1, 0, stream, weights, active, C, total);
  if (D == 0) return;
  launch_kernel(mean_partials_kernel<T>, unsigned(groups * column_blocks), kThreads, 0, stream, x, weights, active, C,
                D, column_blocks, partials);
  launch_kernel(mean_finish_kernel<T>, unsigned(column_blocks), kThreads, 0, stream, partials, groups, D, total,
                out);
}

#define MK_INSTANTIATE(T)                                                                                          \
  template void adam_step_cuda<T>(T*, const T*, accum_t<T>*, accum_t<T>*, int64_t*, const bool*, int64_t, int64_t, \
                                  const AdamHyper&, cudaStream_t);                                                  \
  template void sgd_step_cuda<T>(T*, const T*, accum_t<T>*, const bool*, int64_t, int64_t, const SgdHyper&,        \
                                 cudaStream_t);                                                                     \
  template void weighted_mean_cuda<T>(const T*, const accum_t<T>*, const bool*, int64_t, int64_t, accum_t<T>*, T*,  \
                                      cudaStream_t);
MK_INSTANTIATE(float)
MK_INSTANTIATE(double)
MK_INSTANTIATE(half_t)
MK_INSTANTIATE(bf16_t)
#undef MK_INSTANTIATE

}  // namespace fl
}  // namespace mk
