// Tests of the SIMT emulation itself. Without an argument: kernels that depend on a real barrier
// and on per-block shared memory give CUDA's results. With the name of a misuse, that misuse runs
// and the emulation must stop it with its error message (CTest matches the message), not hang.
#include <cstdio>
#include <cstring>
#include <vector>

#include "check.h"
#include "gpu_launch.cuh"

namespace {

// Reverses each block's segment through shared memory: correct only if every thread's store is
// visible to every other thread after the barrier, and the array is the block's own.
__global__ void reverse_kernel(const int* in, int* out) {
  MK_SHARED(int, tile, [256]);
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  tile[threadIdx.x] = in[i];
  __syncthreads();
  out[i] = tile[blockDim.x - 1 - threadIdx.x];
}

// Sums the block's values through dynamic shared memory, one barrier per halving step.
__global__ void block_sum_kernel(const float* in, float* out) {
  MK_DYNAMIC_SHARED(float, partial);
  partial[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// Reads shared memory no thread wrote: the poison (NaN) must show.
__global__ void unwritten_shared_kernel(float* out) {
  MK_SHARED(float, tile, [32]);
  out[threadIdx.x] = tile[threadIdx.x];
}

__global__ void early_exit_kernel(int* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void large_shared_kernel(int* out) {
  MK_SHARED(double, big, [7000]);
  big[threadIdx.x] = 1.0;
  out[threadIdx.x] = int(big[threadIdx.x]);
}

__global__ void noop_kernel(int*) {}

void test_kernels() {
  const unsigned blocks = 3, threads = 256;
  std::vector<int> in(blocks * threads), out(blocks * threads, -1);
  for (unsigned i = 0; i < in.size(); ++i) in[i] = int(i);
  mk::launch_kernel(reverse_kernel, blocks, threads, 0, nullptr, in.data(), out.data());
  for (unsigned b = 0; b < blocks; ++b)
    for (unsigned t = 0; t < threads; ++t)
      CHECK(out[b * threads + t] == int(b * threads + threads - 1 - t), "reverse: block %u thread %u", b, t);

  std::vector<float> values(blocks * 128), sums(blocks, -1.0f);
  for (unsigned i = 0; i < values.size(); ++i) values[i] = float(i % 7);
  mk::launch_kernel(block_sum_kernel, blocks, 128, 128 * sizeof(float), nullptr, values.data(), sums.data());
  for (unsigned b = 0; b < blocks; ++b) {
    float expected = 0.0f;
    for (unsigned t = 0; t < 128; ++t) expected += values[b * 128 + t];
    CHECK(sums[b] == expected, "block sum %u: %g, expected %g", b, sums[b], expected);
  }

  std::vector<float> unwritten(32, 0.0f);
  mk::launch_kernel(unwritten_shared_kernel, 1, 32, 0, nullptr, unwritten.data());
  for (float x : unwritten) CHECK(x != x, "unwritten shared memory reads as NaN, not %g", x);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> out(2048);
  if (argc < 2) {
    test_kernels();
    if (failures) std::printf("%d checks failed\n", failures);
    return failures ? 1 : 0;
  }
  const char* misuse = argv[1];
  if (!std::strcmp(misuse, "early-exit")) mk::launch_kernel(early_exit_kernel, 2, 64, 0, nullptr, out.data());
  if (!std::strcmp(misuse, "divergent-barrier"))
    mk::launch_kernel(divergent_barrier_kernel, 1, 64, 0, nullptr, out.data());
  if (!std::strcmp(misuse, "static-shared")) mk::launch_kernel(large_shared_kernel, 1, 32, 0, nullptr, out.data());
  if (!std::strcmp(misuse, "dynamic-shared"))
    mk::launch_kernel(noop_kernel, 1, 32, 48 * 1024 + 1, nullptr, out.data());
  if (!std::strcmp(misuse, "block-size")) mk::launch_kernel(noop_kernel, 1, 1025, 0, nullptr, out.data());
  if (!std::strcmp(misuse, "grid-y")) mk::launch_kernel(noop_kernel, dim3(1, 65536), 32, 0, nullptr, out.data());
  std::printf("misuse %s was not reported\n", misuse);
  return 1;
}
