// The avx2 variant of the vectorised CPU kernels: AVX2 + FMA: 16 ymm registers, 2 x 4 register tiles of 32-byte vectors.
// See cpu_variant.h and cpu_products.h.
#if defined(__x86_64__) || defined(__i386__)
#include "cpu_variant_prelude.h"

#define MK_VARIANT_NS isa_avx2
#define MK_VECTOR_BYTES 32
#define MK_REG_ROWS 2

MK_TARGET_BEGIN("avx2,fma")
#include "cpu_variant_impl.h"
MK_TARGET_END
#endif
