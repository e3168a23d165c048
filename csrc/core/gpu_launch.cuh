// The one way the core launches a kernel and declares shared memory, so that the same .cu sources
// compile with nvcc for the GPU and, under MK_SIMT_EMULATION (the CTest build only), as C++ that
// runs every kernel on the CPU's SIMT emulation (simt_emulation.h).
#pragma once

#include <cstddef>
#include <utility>

#if defined(__CUDACC__)

#include <cuda_runtime_api.h>

// A static __shared__ array of the block: MK_SHARED(float, tile, [32][33]).
#define MK_SHARED(type, name, dims) __shared__ type name dims
// The launch's dynamic shared memory as an array of `type`.
#define MK_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
// A large read-only kernel parameter read in place from the parameter space (no copy to local
// memory, even when indexed at run time): sm_70+, CUDA >= 11.7.
#define MK_GRID_CONSTANT(type, name) const __grid_constant__ type name

namespace mk {
// SMs of the current device (launchers size persistent grids by it).
inline int device_multiprocessors() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 1;
  return count > 0 ? count : 1;
}

template <class... Params, class... Args>
inline void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_shared_bytes,
                          cudaStream_t stream, Args&&... args) {
  kernel<<<grid, block, dynamic_shared_bytes, stream>>>(std::forward<Args>(args)...);
}
}  // namespace mk

#elif defined(MK_SIMT_EMULATION)

#include "simt_emulation.h"

#define MK_SHARED(type, name, dims) \
  type(&name) dims = *::mk::simt::static_shared<type dims>(__FILE__, __LINE__)
#define MK_DYNAMIC_SHARED(type, name) type* name = ::mk::simt::dynamic_shared<type>()
// A reference to the launch's one copy of the parameter (not a copy per emulated thread).
#define MK_GRID_CONSTANT(type, name) const type& name

namespace mk {
using simt::launch_kernel;
inline int device_multiprocessors() { return simt::multiprocessor_count(); }
}  // namespace mk

#else
#error "the CUDA sources compile with nvcc, or as C++ only for the SIMT emulation (MK_SIMT_EMULATION)"
#endif
