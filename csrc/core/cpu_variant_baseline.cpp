// The baseline variant of the vectorised CPU kernels: the build's default target (SSE2 on x86-64; NEON on aarch64, with 4-row register tiles for its 32 registers).
// See cpu_variant.h and cpu_products.h.
#include "cpu_variant_prelude.h"

#define MK_VARIANT_NS isa_baseline
#define MK_VECTOR_BYTES 16
#if defined(__aarch64__)
#define MK_REG_ROWS 4
#else
#define MK_REG_ROWS 2
#endif

#include "cpu_variant_impl.h"
