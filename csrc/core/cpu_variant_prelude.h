// Included by every cpu_variant_<isa>.cpp and fl_variant_<isa>.cpp before it switches the target:
// every standard and shared header the variant bodies use, so that their inline functions and
// templates keep the build's default target (one copy, safe on every CPU) and only the functions
// defined in the variant's namespace get the variant's instructions.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "convert.h"
#include "cpu_kernels.h"
#include "cpu_variant.h"
#include "federated.h"
#include "fl_kernels.h"
#include "mol_kernels.h"

// MK_TARGET_BEGIN("avx2,fma") ... MK_TARGET_END: the functions defined in between are compiled for
// those features (GCC's #pragma GCC target; clang's #pragma clang attribute).
#define MK_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define MK_TARGET_BEGIN(features) \
  MK_PRAGMA(clang attribute push(__attribute__((target(features))), apply_to = function))
#define MK_TARGET_END MK_PRAGMA(clang attribute pop)
#elif defined(__GNUC__)
#define MK_TARGET_BEGIN(features) MK_PRAGMA(GCC push_options) MK_PRAGMA(GCC target(features))
#define MK_TARGET_END MK_PRAGMA(GCC pop_options)
#else
#define MK_TARGET_BEGIN(features)
#define MK_TARGET_END
#endif
