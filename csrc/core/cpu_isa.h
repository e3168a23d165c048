// Run-time choice of the CPU kernels' instruction-set variant. One build holds every variant of the
// hot loops (cpu_variant_*.cpp: AVX-512, AVX2 + FMA and a portable baseline on x86-64; on other
// targets the baseline alone, which is NEON on aarch64). The variant is chosen once, at the first
// kernel call, from the CPU's features, unless MOLKERNELS_CPU_ISA=baseline|avx2|avx512 forces one;
// forcing a variant the CPU cannot run is an error naming the missing features. No torch headers.
#pragma once

#include <string>
#include <vector>

namespace mk {

enum class CpuIsa : int { baseline = 0, avx2 = 1, avx512 = 2 };

// "baseline", "avx2", "avx512" (on aarch64 the baseline is reported as "neon").
const char* cpu_isa_name(CpuIsa isa);

// The features `isa` needs that this CPU (and OS) lacks, e.g. "avx512f, avx512bw"; empty if it runs.
std::string cpu_isa_missing(CpuIsa isa);

// The variants this build holds and this CPU runs, slowest first.
std::vector<CpuIsa> supported_cpu_isas();

// The variant in use. The first call resolves it: MOLKERNELS_CPU_ISA if set (an unknown name or a
// variant this CPU lacks throws std::runtime_error, on this and every later call until
// set_cpu_isa succeeds), else the fastest supported.
CpuIsa cpu_isa();

// Switches the variant ("auto" or "": the fastest supported); throws std::runtime_error (unknown
// name, or the CPU lacks a feature) and leaves the variant unchanged. Not meant to race with kernel
// calls in other threads (tests switch between calls).
void set_cpu_isa(const std::string& name);

}  // namespace mk
