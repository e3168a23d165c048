// Conversions between the storage types and float, bit-exact on host and device: bf16 widens by a
// shift, fp16 through the hardware instruction where there is one (F16C on x86, the CUDA intrinsic
// on the GPU) and through the IEEE bit layout otherwise. Narrowing rounds to nearest even.
#pragma once

#include <cstring>

#include "platform.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#elif defined(__F16C__)
#include <immintrin.h>
#endif

namespace mk {

MK_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

MK_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// IEEE binary16 -> binary32 from the bit layout (used where no instruction exists).
MK_HD float half_bits_to_float_soft(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1Fu;
  const uint32_t mantissa = h & 0x3FFu;
  if (exponent == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (mantissa << 13));
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  // Zero or subnormal: mantissa * 2^-24, exact in float.
  const float magnitude = float(mantissa) * 5.9604644775390625e-8f;
  return sign ? -magnitude : magnitude;
}

// IEEE binary32 -> binary16, round to nearest even, overflow to infinity, NaN stays NaN.
MK_HD uint16_t float_to_half_bits_soft(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t abs_bits = u & 0x7FFFFFFFu;
  if (abs_bits > 0x7F800000u) return uint16_t(sign | 0x7E00u);  // NaN
  if (abs_bits >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // rounds to >= 65520: infinity
  if (abs_bits < 0x38800000u) {                                   // below 2^-14: subnormal half
    // Scale into the subnormal range; float addition performs the round to nearest even.
    const float magnitude = bits_to_float(abs_bits) + 0.5f;      // 0.5 = 2^-1 aligns ulp to 2^-24
    return uint16_t(sign | uint16_t(float_to_bits(magnitude) - 0x3F000000u));
  }
  const uint32_t rounded = abs_bits + 0x0FFFu + ((abs_bits >> 13) & 1u);
  return uint16_t(sign | uint16_t((rounded - 0x38000000u) >> 13));
}

MK_HD float to_float(float x) { return x; }
MK_HD double to_float(double x) { return x; }
MK_HD float to_float(bf16_t x) { return bits_to_float(uint32_t(x.bits) << 16); }
MK_HD float to_float(half_t x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#elif defined(__F16C__)
  return _cvtsh_ss(x.bits);
#else
  return half_bits_to_float_soft(x.bits);
#endif
}

template <class T>
MK_HD T from_float(accum_t<T> x);

template <>
MK_HD float from_float<float>(float x) {
  return x;
}
template <>
MK_HD double from_float<double>(double x) {
  return x;
}
template <>
MK_HD bf16_t from_float<bf16_t>(float x) {
  const uint32_t u = float_to_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return bf16_t{uint16_t((u >> 16) | 0x0040u)};  // quiet NaN
  return bf16_t{uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
}
template <>
MK_HD half_t from_float<half_t>(float x) {
#if defined(__CUDA_ARCH__)
  return half_t{__half_as_ushort(__float2half_rn(x))};
#elif defined(__F16C__)
  return half_t{uint16_t(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT))};
#else
  return half_t{float_to_half_bits_soft(x)};
#endif
}

}  // namespace mk
