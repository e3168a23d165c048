// Portability layer for the torch-free kernel core: one macro marks the functions that both the
// C++ CPU kernels and the CUDA kernels call, so the math shared by the two backends has one home.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MK_HD __host__ __device__ __forceinline__
#else
#define MK_HD inline
#endif

namespace mk {

// Storage-only 16-bit float types. The core never does arithmetic in 16 bits: values are widened to
// float on load and narrowed (round to nearest even) on store.
struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

// Accumulation type of a storage type: float for the 16- and 32-bit types, double for double.
template <class T>
struct accum {
  using type = float;
};
template <>
struct accum<double> {
  using type = double;
};
template <class T>
using accum_t = typename accum<T>::type;

MK_HD bool is_finite(double x) { return x - x == 0.0; }

}  // namespace mk
