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
// - warp shuffles (__shfl_sync, __shfl_xor_sync, __shfl_down_sync, __shfl_up_sync) are a warp-level
//   rendezvous: warp w is threads 32w..32w+31 of the block (linear index); every lane named in the
//   mask must reach the same shuffle (same source line, same mask) before any of them gets its value,
//   and each lane then gets the value CUDA gives it (its own value where the source lane lies outside
//   its width segment). A mask that omits the calling lane, names a lane that does not exist or
//   exited, lanes at different shuffles or with different masks, a named lane waiting at a
//   __syncthreads(), or a source lane outside the mask is an error, reported and fatal, never a hang.
//   "The same shuffle" means the same source line: lanes at one line reached through different
//   call sites of an inlined helper count as one intrinsic;
// - __ballot_sync(mask, predicate) and __syncwarp(mask) are the same rendezvous (same rules and
//   errors): the ballot gives every named lane the bits of the named lanes whose predicate is
//   nonzero, __syncwarp lets them go on only once all of them are there. Without it, lanes of one
//   warp that exchange data through shared memory would read each other's stores in whatever
//   order the fibers happen to run, as they may on the GPU. __popc and __ffs are CUDA's bit counts;
// - atomics (atomicAdd, atomicExch, atomicInc, atomicMax) are plain read-modify-writes: one OS thread
//   runs the whole grid and a fiber is only ever suspended at a barrier or a shuffle, never inside an
//   atomic, so each one is indivisible as on the GPU. __threadfence() is a no-op: all "device memory"
//   is host memory written and read by that one OS thread in program order, and blocks run one after
//   another, so every store is visible to every later load, which is all a fence orders;
// - the device has multiprocessor_count() SMs (2 unless a test sets another count), for launchers
//   that size their grid by it.
// Streams are accepted and ignored: a launch runs to completion before it returns, "device memory"
// is host memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
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
#define __threadfence() ((void)0)
#define __shfl_sync(...) ::mk::simt::shuffle(__FILE__, __LINE__, ::mk::simt::ShuffleMode::index, __VA_ARGS__)
#define __shfl_xor_sync(...) ::mk::simt::shuffle(__FILE__, __LINE__, ::mk::simt::ShuffleMode::xor_, __VA_ARGS__)
#define __shfl_down_sync(...) ::mk::simt::shuffle(__FILE__, __LINE__, ::mk::simt::ShuffleMode::down, __VA_ARGS__)
#define __shfl_up_sync(...) ::mk::simt::shuffle(__FILE__, __LINE__, ::mk::simt::ShuffleMode::up, __VA_ARGS__)
#define __ballot_sync(mask, predicate)                                                                 \
  unsigned(::mk::simt::shuffle_bits(__FILE__, __LINE__, ::mk::simt::ShuffleMode::ballot, mask, (predicate) ? 1 : 0, \
                                    0, 32))
// __syncwarp() or __syncwarp(mask): WarpMask{} is the full warp, CUDA's default argument.
#define __syncwarp(...)                                                                               \
  ((void)::mk::simt::shuffle_bits(__FILE__, __LINE__, ::mk::simt::ShuffleMode::sync,                 \
                                  ::mk::simt::WarpMask{__VA_ARGS__}.bits, 0, 0, 32))

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

// Atomics on "device memory" (see the header comment for why a plain read-modify-write is atomic here).
template <class T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
template <class T>
inline T atomicExch(T* address, T value) {
  const T old = *address;
  *address = value;
  return old;
}
template <class T>
inline T atomicMax(T* address, T value) {
  const T old = *address;
  *address = value > old ? value : old;
  return old;
}
// ((old >= limit) ? 0 : old + 1), as CUDA's atomicInc.
inline unsigned atomicInc(unsigned* address, unsigned limit) {
  const unsigned old = *address;
  *address = old >= limit ? 0u : old + 1u;
  return old;
}
// A load that bypasses L1 on the GPU; here just a load.
template <class T>
inline T __ldcg(const T* address) {
  return *address;
}

// The number of set bits, and the 1-based position of the lowest one (0 for none), as CUDA's.
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

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

// Warp shuffles: the raw rendezvous on 64-bit payloads, and the typed front end the macros call.
// ballot and sync are the other warp intrinsics, which meet at the same rendezvous.
enum class ShuffleMode { index, xor_, down, up, ballot, sync };
struct WarpMask {
  unsigned bits = 0xFFFFFFFFu;
};
uint64_t shuffle_bits(const char* file, int line, ShuffleMode mode, unsigned mask, uint64_t bits, int argument,
                      int width);
template <class T>
T shuffle(const char* file, int line, ShuffleMode mode, unsigned mask, T value, int argument, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  bits = shuffle_bits(file, line, mode, mask, bits, argument, width);
  T result;
  std::memcpy(&result, &bits, sizeof(T));
  return result;
}

// The emulated device's SM count (2 by default); tests set others to vary launchers' grids.
int multiprocessor_count();
void set_multiprocessor_count(int count);

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
