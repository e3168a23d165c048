// Test-only SIMT execution layer: the CUDA sources of the core compile as C++ (MK_SIMT_EMULATION,
// never with nvcc, never in the Python extension) and their kernels run on the CPU with CUDA's
// semantics where the kernels depend on them:
// - each block's threads are fibers on one OS thread, so __syncthreads() is a real
//   barrier: every thread runs until it reaches a barrier or exits, and only then does any thread
//   pass it. A barrier that only part of the block reaches, or threads waiting at different
//   barriers, is an error, reported and fatal, never a hang;
// - threads run in ascending order up to the first barrier and in alternating order between later
//   ones, and blocks run last to first, so a kernel that relies on an order CUDA does not promise
//   reads data that was not written yet;
// - static and dynamic shared memory are per block and filled with 0xFF bytes (NaN in every float
//   type) before the block starts, so a read of an unstaged element shows;
// - the launch limits of sm_90 are enforced: <= 1024 threads per block (x, y <= 1024, z <= 64),
//   grid x <= 2^31 - 1, y and z <= 65535, shared memory <= 48 KB per block (the limit without the
//   cudaFuncAttributeMaxDynamicSharedMemorySize opt-in, which the core never requests).
// Streams are accepted and ignored: a launch runs to completion before it returns, "device memory"
// is host memory. The kernels use no warp intrinsics and no atomics, so none are emulated.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#if defined(__CUDACC__)
#error "simt_emulation.h replaces the CUDA runtime for host-compiled tests; nvcc uses the real one"
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __syncthreads() ::mk::simt::sync_threads(__FILE__, __LINE__)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

using cudaStream_t = struct CUstream_st*;

// The built-in index variables of the running emulated thread (set by the scheduler at each switch).
inline thread_local uint3 threadIdx{}, blockIdx{};
inline thread_local dim3 blockDim, gridDim;

// CUDA's device overload of min, which the kernels call unqualified.
template <class T>
inline T min(T a, T b) {
  return b < a ? b : a;
}

namespace mk {
namespace simt {

constexpr size_t kMaxSharedBytesPerBlock = 48 * 1024;

[[noreturn]] void fail(const char* format, ...);

// Runs `thread` for every thread of every block of the grid (see the header comment).
void run_grid(dim3 grid, dim3 block, size_t dynamic_shared_bytes, const std::function<void()>& thread);

void sync_threads(const char* file, int line);

// The block's instance of the static shared array declared at file:line, allocated (and poisoned)
// by the first of the block's threads to reach the declaration.
void* static_shared_bytes(const char* file, int line, size_t bytes, size_t alignment);
void* dynamic_shared_bytes();

template <class Array>
Array* static_shared(const char* file, int line) {
  return static_cast<Array*>(static_shared_bytes(file, line, sizeof(Array), alignof(Array)));
}
template <class T>
T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_bytes());
}

// Like <<<grid, block, shmem, stream>>>: the arguments are converted to the kernel's parameter
// types and copied once at the launch; every thread receives its own copy, as on the GPU.
template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_shared_bytes,
                   cudaStream_t /*stream*/, Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong number of arguments");
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  run_grid(grid, block, dynamic_shared_bytes, [&] { std::apply(kernel, params); });
}

}  // namespace simt
}  // namespace mk
