#include "cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

namespace mk {
namespace {

#if defined(__x86_64__) || defined(__i386__)
constexpr bool kX86 = true;
#else
constexpr bool kX86 = false;
#endif

#if defined(__aarch64__)
constexpr const char* kBaselineName = "neon";  // the baseline of aarch64 is Advanced SIMD
#else
constexpr const char* kBaselineName = "baseline";
#endif

constexpr int kUnresolved = -1;
std::atomic<int> active{kUnresolved};
std::mutex resolve_mutex;
std::string env_error;  // why MOLKERNELS_CPU_ISA could not be honoured (guarded by resolve_mutex)

bool parse(const std::string& name, CpuIsa* out) {
  if (name == "baseline" || name == kBaselineName) {
    *out = CpuIsa::baseline;
  } else if (name == "avx2") {
    *out = CpuIsa::avx2;
  } else if (name == "avx512") {
    *out = CpuIsa::avx512;
  } else {
    return false;
  }
  return true;
}

CpuIsa best() {
  const std::vector<CpuIsa> all = supported_cpu_isas();
  return all.back();
}

// The variant for `name`, or an exception naming what is wrong.
CpuIsa checked(const std::string& name, const char* what) {
  if (name.empty() || name == "auto") return best();
  CpuIsa isa;
  if (!parse(name, &isa))
    throw std::runtime_error(std::string(what) + "=" + name + ": unknown CPU variant (expected auto, baseline" +
                             (kX86 ? ", avx2 or avx512)" : ")"));
  const std::string missing = cpu_isa_missing(isa);
  if (!missing.empty())
    throw std::runtime_error(std::string(what) + "=" + name + ": this CPU lacks " + missing +
                             (kX86 ? "" : " (this build's only variant is the baseline)"));
  return isa;
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx512:
      return "avx512";
    case CpuIsa::avx2:
      return "avx2";
    default:
      return kBaselineName;
  }
}

std::string cpu_isa_missing(CpuIsa isa) {
  if (isa == CpuIsa::baseline) return "";
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  std::string missing;
  auto need = [&](bool present, const char* feature) {
    if (!present) missing += (missing.empty() ? "" : ", ") + std::string(feature);
  };
  need(__builtin_cpu_supports("avx2"), "avx2");
  need(__builtin_cpu_supports("fma"), "fma");
  if (isa == CpuIsa::avx512) {
    need(__builtin_cpu_supports("avx512f"), "avx512f");
    need(__builtin_cpu_supports("avx512bw"), "avx512bw");
    need(__builtin_cpu_supports("avx512vl"), "avx512vl");
  }
  return missing;
#else
  return isa == CpuIsa::avx512 ? "avx512f, avx512bw, avx512vl (not an x86-64 CPU)" : "avx2, fma (not an x86-64 CPU)";
#endif
}

std::vector<CpuIsa> supported_cpu_isas() {
  std::vector<CpuIsa> out{CpuIsa::baseline};
  for (CpuIsa isa : {CpuIsa::avx2, CpuIsa::avx512})
    if (cpu_isa_missing(isa).empty()) out.push_back(isa);
  return out;
}

CpuIsa cpu_isa() {
  const int now = active.load(std::memory_order_acquire);
  if (now != kUnresolved) return CpuIsa(now);
  std::lock_guard<std::mutex> lock(resolve_mutex);
  if (active.load() == kUnresolved && env_error.empty()) {
    const char* env = std::getenv("MOLKERNELS_CPU_ISA");
    try {
      active.store(int(checked(env ? env : "", "MOLKERNELS_CPU_ISA")), std::memory_order_release);
    } catch (const std::runtime_error& error) {
      env_error = error.what();
    }
  }
  if (active.load() == kUnresolved) throw std::runtime_error(env_error);
  return CpuIsa(active.load());
}

void set_cpu_isa(const std::string& name) {
  const CpuIsa isa = checked(name, "cpu_isa");
  std::lock_guard<std::mutex> lock(resolve_mutex);
  env_error.clear();
  active.store(int(isa), std::memory_order_release);
}

}  // namespace mk
