// The Python module molkernels._C: importing it registers the ops (TORCH_LIBRARY in ops.cpp) and
// exposes what the build contains.
#include <torch/extension.h>

#include "core/cpu_kernels.h"

#ifndef MOLKERNELS_VERSION
#define MOLKERNELS_VERSION "unknown"
#endif
#ifndef MOLKERNELS_CUDA_ARCHS
#define MOLKERNELS_CUDA_ARCHS ""
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = MOLKERNELS_VERSION;
#ifdef MOLKERNELS_WITH_CUDA
  info["cuda_compiled"] = true;
#else
  info["cuda_compiled"] = false;
#endif
  info["cuda_archs"] = std::string(MOLKERNELS_CUDA_ARCHS);
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["openmp_threads"] = mk::cpu_threads();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "molkernels compiled kernels";
  m.def("build_info", &build_info, "What this build of the extension contains");
}
