// The op schemas (TORCH_LIBRARY) and their CPU implementations. Fake (meta) implementations live
// in molkernels/_ops.py; CUDA implementations in ops_cuda.cpp.
#include <vector>

#include "core/cpu_kernels.h"
#include "stack.h"

namespace molkernels {
namespace {

at::Tensor gram_cpu(const std::vector<at::Tensor>& g) {
  const Stack stack(g, "g");
  at::Tensor out = at::empty({stack.K, stack.K}, stack.blocks[0].options().dtype(accum_dtype(stack.blocks[0].scalar_type())));
  dispatch_float_types(stack.blocks[0].scalar_type(), "g", [&](auto tag) {
    using T = decltype(tag);
    std::vector<const T*> pointers;
    mk::gram_cpu<T>(stack.view<T>(pointers), out.data_ptr<mk::accum_t<T>>());
  });
  return out;
}

at::Tensor cross_gram_cpu(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  const Stack sa(a, "a"), sb(b, "b");
  check_same_structure(sa, sb);
  at::Tensor out = at::empty({sa.K, sa.K}, sa.blocks[0].options().dtype(accum_dtype(sa.blocks[0].scalar_type())));
  dispatch_float_types(sa.blocks[0].scalar_type(), "a", [&](auto tag) {
    using T = decltype(tag);
    std::vector<const T*> pa, pb;
    mk::cross_gram_cpu<T>(sa.view<T>(pa), sb.view<T>(pb), out.data_ptr<mk::accum_t<T>>());
  });
  return out;
}

std::vector<at::Tensor> combine_cpu(const std::vector<at::Tensor>& g, const at::Tensor& weights) {
  const Stack stack(g, "g");
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == stack.K, "weights: expected shape [", stack.K,
                    "], got ", weights.sizes());
  std::vector<at::Tensor> out = combine_outputs(stack);
  const at::ScalarType dtype = stack.blocks[0].scalar_type();
  const at::Tensor w = weights.to(accum_dtype(dtype)).contiguous();
  dispatch_float_types(dtype, "g", [&](auto tag) {
    using T = decltype(tag);
    std::vector<const T*> pointers;
    std::vector<T*> outputs;
    for (at::Tensor& o : out) outputs.push_back(reinterpret_cast<T*>(o.data_ptr()));
    mk::combine_cpu<T>(stack.view<T>(pointers), w.const_data_ptr<mk::accum_t<T>>(), outputs.data());
  });
  return out;
}

at::Tensor project_simplex_cpu(const at::Tensor& v) {
  check_simplex_argument(v);
  const at::Tensor input = v.contiguous();
  at::Tensor out = at::empty_like(input);
  const int64_t K = input.size(-1);
  dispatch_float_types(input.scalar_type(), "v", [&](auto tag) {
    using T = decltype(tag);
    mk::project_simplex_cpu<T>(reinterpret_cast<const T*>(input.const_data_ptr()), input.numel() / K, K,
                               reinterpret_cast<T*>(out.data_ptr()));
  });
  return out;
}

at::Tensor min_norm_cpu(const at::Tensor& gram) {
  check_gram_argument(gram);
  const at::Tensor input = gram.contiguous();
  const int64_t K = input.size(-1);
  at::Tensor out = at::empty(input.sizes().slice(0, input.dim() - 1), input.options());
  dispatch_float_types(input.scalar_type(), "gram", [&](auto tag) {
    using T = decltype(tag);
    mk::min_norm_cpu<T>(reinterpret_cast<const T*>(input.const_data_ptr()), input.numel() / (K * K), K,
                        reinterpret_cast<T*>(out.data_ptr()));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(molkernels, m) {
  m.def("gram(Tensor[] g) -> Tensor");
  m.def("cross_gram(Tensor[] a, Tensor[] b) -> Tensor");
  m.def("combine(Tensor[] g, Tensor weights) -> Tensor[]");
  m.def("project_simplex(Tensor v) -> Tensor");
  m.def("min_norm(Tensor gram) -> Tensor");
}

TORCH_LIBRARY_IMPL(molkernels, CPU, m) {
  m.impl("gram", &gram_cpu);
  m.impl("cross_gram", &cross_gram_cpu);
  m.impl("combine", &combine_cpu);
  m.impl("project_simplex", &project_simplex_cpu);
  m.impl("min_norm", &min_norm_cpu);
}

}  // namespace molkernels
