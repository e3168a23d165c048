// The Python module molkernels._C: importing it registers the ops (TORCH_LIBRARY in ops.cpp) and
// exposes what the build contains.
#include <torch/extension.h>

#include <stdexcept>
#include <string>

#include "core/cpu_isa.h"
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
  info["cpu_isa"] = std::string(mk::cpu_isa_name(mk::cpu_isa()));
  pybind11::list isas;
  for (mk::CpuIsa isa : mk::supported_cpu_isas()) isas.append(std::string(mk::cpu_isa_name(isa)));
  info["cpu_isas"] = isas;
  return info;
}

// The variant in use (resolving MOLKERNELS_CPU_ISA on the first call: RuntimeError if it names a
// variant this CPU lacks).
std::string cpu_isa() {
  try {
    return mk::cpu_isa_name(mk::cpu_isa());
  } catch (const std::runtime_error& error) {
    throw pybind11::value_error(error.what());
  }
}

void set_cpu_isa(const std::string& name) {
  try {
    mk::set_cpu_isa(name);
  } catch (const std::runtime_error& error) {
    throw pybind11::value_error(error.what());
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "molkernels compiled kernels";
  m.def("build_info", &build_info, "What this build of the extension contains");
  m.def("_cpu_isa", &cpu_isa, "The CPU kernels' instruction-set variant in use");
  m.def("_set_cpu_isa", &set_cpu_isa, "Switch the CPU kernels' variant (tests): auto, baseline, avx2, avx512");
}
