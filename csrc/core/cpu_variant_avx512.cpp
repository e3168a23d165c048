// The avx512 variant of the vectorised CPU kernels: AVX-512 (F, BW, VL): 32 zmm registers, 4 x 4 register tiles of 64-byte vectors.
// See cpu_variant.h and cpu_products.h.
#if defined(__x86_64__) || defined(__i386__)
#include "cpu_variant_prelude.h"

#define MK_VARIANT_NS isa_avx512
#define MK_VECTOR_BYTES 64
#define MK_REG_ROWS 4

MK_TARGET_BEGIN("avx512f,avx512bw,avx512vl,avx2,fma")
#include "cpu_variant_impl.h"
MK_TARGET_END
#endif
