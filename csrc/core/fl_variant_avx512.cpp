// The avx512 variant of the federated learning CPU kernels (see fl_variant_impl.h).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#if defined(__x86_64__) || defined(__i386__)
#include "cpu_variant_prelude.h"

#define MK_VARIANT_NS isa_avx512
MK_TARGET_BEGIN("avx512f,avx512bw,avx512vl,avx2,fma")
#include "fl_variant_impl.h"
MK_TARGET_END
#endif
