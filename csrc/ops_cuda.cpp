// CUDA implementations of the ops declared in ops.cpp: allocate outputs and workspaces through the
// caching allocator and launch the core kernels on the current stream. No host synchronisation.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "core/cuda_kernels.h"
#include "gram_workspace_cuda.h"
#include "stack.h"

namespace molkernels {
namespace {

at::Tensor products_cuda(const Stack& a, const Stack* b) {
  const c10::cuda::CUDAGuard guard(a.blocks[0].device());
  const at::ScalarType acc = accum_dtype(a.blocks[0].scalar_type());
  const at::TensorOptions options = a.blocks[0].options().dtype(acc);
  at::Tensor out = at::empty({a.K, a.K}, options);
  at::Tensor workspace = gram_workspace_cuda(out, a.K, a.K);
  dispatch_float_types(a.blocks[0].scalar_type(), "g", [&](auto tag) {
    using T = decltype(tag);
    std::vector<const T*> pa, pb;
    const mk::StackView<T> va = a.view<T>(pa);
    mk::StackView<T> vb{};
    if (b) vb = b->view<T>(pb);
    mk::gram_cuda<T>(va, b ? &vb : nullptr, workspace.data_ptr(), out.data_ptr<mk::accum_t<T>>(),
                     at::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor gram_cuda(const std::vector<at::Tensor>& g) {
  const Stack stack(g, "g");
  return products_cuda(stack, nullptr);
}

at::Tensor cross_gram_cuda(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b) {
  const Stack sa(a, "a"), sb(b, "b");
  check_same_structure(sa, sb);
  return products_cuda(sa, &sb);
}

std::vector<at::Tensor> combine_cuda(const std::vector<at::Tensor>& g, const at::Tensor& weights) {
  const Stack stack(g, "g");
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.size(0) == stack.K, "weights: expected shape [", stack.K,
                    "], got ", weights.sizes());
  TORCH_CHECK_VALUE(weights.device() == stack.blocks[0].device(), "weights: on ", weights.device(), ", g on ",
                    stack.blocks[0].device());
  const c10::cuda::CUDAGuard guard(stack.blocks[0].device());
  std::vector<at::Tensor> out = combine_outputs(stack);
  const at::ScalarType dtype = stack.blocks[0].scalar_type();
  const at::Tensor w = weights.to(accum_dtype(dtype)).contiguous();
  dispatch_float_types(dtype, "g", [&](auto tag) {
    using T = decltype(tag);
    std::vector<const T*> pointers;
    std::vector<T*> outputs;
    for (at::Tensor& o : out) outputs.push_back(reinterpret_cast<T*>(o.data_ptr()));
    mk::combine_cuda<T>(stack.view<T>(pointers), w.const_data_ptr<mk::accum_t<T>>(), outputs.data(),
                        at::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor project_simplex_cuda(const at::Tensor& v) {
  check_simplex_argument(v);
  const c10::cuda::CUDAGuard guard(v.device());
  const at::Tensor input = v.contiguous();
  at::Tensor out = at::empty_like(input);
  const int64_t K = input.size(-1);
  dispatch_float_types(input.scalar_type(), "v", [&](auto tag) {
    using T = decltype(tag);
    mk::project_simplex_cuda<T>(reinterpret_cast<const T*>(input.const_data_ptr()), input.numel() / K, K,
                                reinterpret_cast<T*>(out.data_ptr()), at::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor min_norm_cuda(const at::Tensor& gram) {
  check_gram_argument(gram);
  const c10::cuda::CUDAGuard guard(gram.device());
  const at::Tensor input = gram.contiguous();
  const int64_t K = input.size(-1);
  const int64_t batch = input.numel() / (K * K);
  at::Tensor out = at::empty(input.sizes().slice(0, input.dim() - 1), input.options());
  const int64_t work_doubles = mk::min_norm_cuda_workspace(batch, K);
  const at::Tensor work =
      work_doubles > 0 ? at::empty({work_doubles}, input.options().dtype(at::kDouble)) : at::Tensor();
  dispatch_float_types(input.scalar_type(), "gram", [&](auto tag) {
    using T = decltype(tag);
    mk::min_norm_cuda<T>(reinterpret_cast<const T*>(input.const_data_ptr()), batch, K,
                         reinterpret_cast<T*>(out.data_ptr()), work.defined() ? work.data_ptr<double>() : nullptr,
                         at::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(molkernels, CUDA, m) {
  m.impl("gram", &gram_cuda);
  m.impl("cross_gram", &cross_gram_cuda);
  m.impl("combine", &combine_cuda);
  m.impl("project_simplex", &project_simplex_cuda);
  m.impl("min_norm", &min_norm_cuda);
}

}  // namespace molkernels
