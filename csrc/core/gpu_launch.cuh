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

namespace mk {
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

namespace mk {
using simt::launch_kernel;
}  // namespace mk

#else
#error "the CUDA sources compile with nvcc, or as C++ only for the SIMT emulation (MK_SIMT_EMULATION)"
#endif
