// The CUDA runtime types the launchers' declarations need (cudaStream_t, dim3): the real runtime
// header, or the SIMT emulation's stand-ins in the CTest build (MK_SIMT_EMULATION).
#pragma once

#if defined(MK_SIMT_EMULATION) && !defined(__CUDACC__)
#include "simt_emulation.h"
#else
#include <cuda_runtime_api.h>
#endif
