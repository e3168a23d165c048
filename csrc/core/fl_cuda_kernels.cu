// CUDA kernels of the federated learning steps. An Adam/SGD work item is kColumnChunk columns of
// one client's row; it is skipped at once for an inactive client, so inactive rows are never
// touched and an active row is read and written once. The weighted mean's work item is one group
// of kMeanGroup clients over kThreads columns: it writes the group's partial sums, then takes its
// column block's ticket, and the item that draws the last ticket sums the partials in group order
// (the order every backend uses, federated.h) and divides by the total weight, which it sums in
// parallel in the same fixed order: one launch, deterministic whichever item comes last.
//
// Every grid is capped at kCtasPerSm CTAs per SM and strides over its work items, so no count of
// clients or columns can overflow a grid dimension.
#include "fl_cuda_kernels.h"

#include <algorithm>

#include "convert.h"
#include "gpu_launch.cuh"

namespace mk {
namespace fl {
namespace {

constexpr int kThreads = 256;
constexpr int kElementsPerThread = 4;
constexpr int64_t kColumnChunk = kElementsPerThread * kThreads;
constexpr int64_t kCtasPerSm = 16;
constexpr unsigned kFullWarp = 0xFFFFFFFFu;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The grid for `items` work items: at most kCtasPerSm per SM, at least one.
unsigned grid_for(int64_t items) {
  return unsigned(std::max<int64_t>(1, std::min<int64_t>(items, kCtasPerSm * device_multiprocessors())));
}

// Counted before the update kernel runs, which then reads each client's new step: CTAs of one row
// run in any order, so none of them may both read and write the count.
__global__ void count_steps_kernel(int64_t* step, const bool* active, int64_t C) {
  for (int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; c < C; c += int64_t(gridDim.x) * blockDim.x)
    if (active[c]) step[c] += 1;
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(T* params, const T* grads, accum_t<T>* exp_avg, accum_t<T>* exp_avg_sq, const int64_t* step,
                const bool* active, int64_t D, int64_t chunks, int64_t items, AdamHyper hyper,
                AdamConstants<accum_t<T>> k) {
  using A = accum_t<T>;
  MK_SHARED(AdamRow<A>, client_row, [1]);
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t c = item / chunks;
    if (!active[c]) continue;  // the whole CTA skips the item
    const int64_t row = c * D, col0 = (item % chunks) * kColumnChunk;
    A p[kElementsPerThread] = {}, g[kElementsPerThread] = {}, m[kElementsPerThread] = {}, v[kElementsPerThread] = {};
    // The loads go out while thread 0 computes the client's bias corrections (two pow calls in
    // double): once per item rather than in every thread.
#pragma unroll
    for (int e = 0; e < kElementsPerThread; ++e) {
      const int64_t col = col0 + threadIdx.x + e * kThreads;
      if (col < D) {
        p[e] = A(to_float(params[row + col]));
        g[e] = A(to_float(grads[row + col]));
        m[e] = exp_avg[row + col];
        v[e] = exp_avg_sq[row + col];
      }
    }
    if (threadIdx.x == 0) client_row[0] = adam_row<A>(hyper, step[c]);
    __syncthreads();
    const AdamRow<A> bias = client_row[0];
    __syncthreads();  // every thread has its copy before the next item's replaces it
#pragma unroll
    for (int e = 0; e < kElementsPerThread; ++e) {
      const int64_t col = col0 + threadIdx.x + e * kThreads;
      if (col < D) {
        adam_update(p[e], g[e], m[e], v[e], k, bias);
        params[row + col] = from_float<T>(p[e]);
        exp_avg[row + col] = m[e];
        exp_avg_sq[row + col] = v[e];
      }
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(T* params, const T* grads, accum_t<T>* momentum_buffer, const bool* active, int64_t D, int64_t chunks,
               int64_t items, SgdConstants<accum_t<T>> k) {
  using A = accum_t<T>;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t c = item / chunks;
    if (!active[c]) continue;
    const int64_t col0 = (item % chunks) * kColumnChunk;
    const int64_t end = c * D + min(col0 + kColumnChunk, D);
    for (int64_t at = c * D + col0 + threadIdx.x; at < end; at += kThreads) {
      A p = A(to_float(params[at]));
      sgd_update<A>(p, A(to_float(grads[at])), momentum_buffer ? momentum_buffer + at : nullptr, k);
      params[at] = from_float<T>(p);
    }
  }
}

// The weighted mean's workspace: one ticket per column block, then groups x D partial sums.
int64_t mean_column_blocks(int64_t D) { return ceil_div(D, kThreads); }
size_t mean_ticket_bytes(int64_t D) {
  return size_t(ceil_div(mean_column_blocks(D) * int64_t(sizeof(unsigned)), 16)) * 16;
}

// Item (column block b, group): partials[group * D + j] = the sum over the group's active clients
// c of weights[c] x[c, j] for the block's columns j; the last item of block b then writes out[j].
template <class T>
__global__ void __launch_bounds__(kThreads)
    weighted_mean_kernel(const T* x, const accum_t<T>* weights, const bool* active, int64_t C, int64_t D,
                         int64_t groups, int64_t items, unsigned* tickets, accum_t<T>* partials, T* out) {
  using A = accum_t<T>;
  MK_SHARED(int, is_last, [1]);
  MK_SHARED(A, total_weight, [1]);
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t block = item / groups, group = item % groups;  // a block's groups are neighbours
    const int64_t j = block * kThreads + threadIdx.x, first = group * kMeanGroup;
    if (j < D) {
      A sum = 0;
      // Unrolled, so the group's loads are in flight together.
#pragma unroll
      for (int i = 0; i < int(kMeanGroup); ++i) {
        const int64_t c = first + i;
        if (c < C && active[c]) sum = weighted_term(sum, weights[c], A(to_float(x[c * D + j])));
      }
      partials[group * D + j] = sum;
    }
    __threadfence();  // this item's partials are visible before its ticket is
    __syncthreads();
    if (threadIdx.x == 0) is_last[0] = atomicAdd(tickets + block, 1u) == unsigned(groups - 1);
    __syncthreads();
    if (!is_last[0]) continue;
    __threadfence();
    if (threadIdx.x == 0) tickets[block] = 0;  // every group has drawn: ready for the next launch
    if (threadIdx.x < 32) {
      // The total weight in federated.h's order: lane l sums one group's share, the shares are
      // added in group order; every lane of warp 0 ends with the same total.
      A total = 0;
      for (int64_t base = 0; base < groups; base += 32) {
        const int64_t g = base + threadIdx.x;
        const A share = g < groups ? group_weight(weights, active, g * kMeanGroup, min(C, g * kMeanGroup + kMeanGroup))
                                   : A(0);
        const int present = int(min(groups - base, int64_t(32)));
        for (int l = 0; l < present; ++l) total += __shfl_sync(kFullWarp, share, l);
      }
      if (threadIdx.x == 0) total_weight[0] = total;
    }
    A column_sum = 0;
    if (j < D)
      for (int64_t g = 0; g < groups; ++g) column_sum += __ldcg(partials + g * D + j);
    __syncthreads();
    if (j < D) out[j] = from_float<T>(mean_or_nan(column_sum, total_weight[0]));
  }
}

}  // namespace

template <class T>
void adam_step_cuda(T* params, const T* grads, accum_t<T>* exp_avg, accum_t<T>* exp_avg_sq, int64_t* step,
                    const bool* active, int64_t C, int64_t D, const AdamHyper& hyper, cudaStream_t stream) {
  if (C == 0) return;
  launch_kernel(count_steps_kernel, grid_for(ceil_div(C, kThreads)), kThreads, 0, stream, step, active, C);
  if (D == 0) return;
  const int64_t chunks = ceil_div(D, kColumnChunk), items = C * chunks;
  launch_kernel(adam_kernel<T>, grid_for(items), kThreads, 0, stream, params, grads, exp_avg, exp_avg_sq, step,
                active, D, chunks, items, hyper, adam_constants<accum_t<T>>(hyper));
}

template <class T>
void sgd_step_cuda(T* params, const T* grads, accum_t<T>* momentum_buffer, const bool* active, int64_t C, int64_t D,
                   const SgdHyper& hyper, cudaStream_t stream) {
  if (C == 0 || D == 0) return;
  const int64_t chunks = ceil_div(D, kColumnChunk), items = C * chunks;
  launch_kernel(sgd_kernel<T>, grid_for(items), kThreads, 0, stream, params, grads, momentum_buffer, active, D,
                chunks, items, sgd_constants<accum_t<T>>(hyper));
}

size_t weighted_mean_cuda_ticket_bytes(int64_t D) { return mean_ticket_bytes(D); }

template <class T>
size_t weighted_mean_cuda_workspace_bytes(int64_t C, int64_t D) {
  return mean_ticket_bytes(D) + size_t(ceil_div(C, kMeanGroup) * D) * sizeof(accum_t<T>);
}

template <class T>
void weighted_mean_cuda(const T* x, const accum_t<T>* weights, const bool* active, int64_t C, int64_t D,
                        void* workspace, T* out, cudaStream_t stream) {
  if (D == 0) return;
  const int64_t groups = ceil_div(C, kMeanGroup), items = groups * mean_column_blocks(D);
  unsigned* tickets = static_cast<unsigned*>(workspace);
  accum_t<T>* partials =
      reinterpret_cast<accum_t<T>*>(static_cast<unsigned char*>(workspace) + mean_ticket_bytes(D));
  launch_kernel(weighted_mean_kernel<T>, grid_for(items), kThreads, 0, stream, x, weights, active, C, D, groups,
                items, tickets, partials, out);
}

#define MK_INSTANTIATE(T)                                                                                          \
  template void adam_step_cuda<T>(T*, const T*, accum_t<T>*, accum_t<T>*, int64_t*, const bool*, int64_t, int64_t, \
                                  const AdamHyper&, cudaStream_t);                                                  \
  template void sgd_step_cuda<T>(T*, const T*, accum_t<T>*, const bool*, int64_t, int64_t, const SgdHyper&,        \
                                 cudaStream_t);                                                                     \
  template size_t weighted_mean_cuda_workspace_bytes<T>(int64_t, int64_t);                                        \
  template void weighted_mean_cuda<T>(const T*, const accum_t<T>*, const bool*, int64_t, int64_t, void*, T*,        \
                                      cudaStream_t);
MK_INSTANTIATE(float)
MK_INSTANTIATE(double)
MK_INSTANTIATE(half_t)
MK_INSTANTIATE(bf16_t)
#undef MK_INSTANTIATE

}  // namespace fl
}  // namespace mk
