// The baseline variant of the federated learning CPU kernels (see fl_variant_impl.h).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#endif
#include "cpu_variant_prelude.h"

#define MK_VARIANT_NS isa_baseline
#include "fl_variant_impl.h"
