// CUDA implementations of the fused multi-objective passes declared in mol_ops.cpp. Outputs and
// workspaces come from the caching allocator; kernels run on the current stream; no host sync.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "core/cuda_kernels.h"
#include "gram_workspace_cuda.h"
#include "stack.h"

namespace molkernels {
namespace {

void combine_into_cuda(const std::vector<at::Tensor>& g, const at::Tensor& weights, const std::vector<at::Tensor>& out,
                       double alpha, bool accumulate) {
  const Stack stack(g, "g");
  const c10::cuda::CUDAGuard guard(stack.blocks[0].device());
  const at::ScalarType out_dtype = check_outputs(out, stack);
  const at::Tensor w = accum_vector(weights, stack, "weights");
  dispatch_two(stack.blocks[0].scalar_type(), out_dtype, [&](auto g_tag, auto out_tag) {
    using T = decltype(g_tag);
    using U = decltype(out_tag);
    using A = mk::accum_t<T>;
    std::vector<const T*> pointers;
    mk::combine_into_cuda<T, U>(stack.view<T>(pointers), w.const_data_ptr<A>(), output_pointers<U>(out).data(),
                                A(alpha), accumulate, at::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor moco_track_gram_cuda(const std::vector<at::Tensor>& y, const std::vector<at::Tensor>& g,
                                const at::Tensor& beta) {
  const Stack grads(g, "g"), state(y, "y", /*writable=*/true);
  check_state(state, grads);
  const c10::cuda::CUDAGuard guard(grads.blocks[0].device());
  const at::Tensor b = accum_scalar(beta, grads, "beta");
  const at::ScalarType dtype = grads.blocks[0].scalar_type();
  at::Tensor out = at::empty({grads.K, grads.K}, grads.blocks[0].options().dtype(accum_dtype(dtype)));
  at::Tensor workspace = gram_workspace_cuda(out, grads.K, grads.K);
  dispatch_float_types(dtype, "g", [&](auto tag) {
    using T = decltype(tag);
    using A = mk::accum_t<T>;
    std::vector<const T*> gp;
    std::vector<A*> yp;
    mk::track_gram_cuda<T>(grads.view<T>(gp), state.mutable_view<A>(yp), b.const_data_ptr<A>(), workspace.data_ptr(),
                           out.data_ptr<A>(), at::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor joint_gram_cuda(const std::vector<at::Tensor>& y, const std::vector<at::Tensor>& g) {
  const Stack grads(g, "g"), state(y, "y");
  check_state(state, grads);
  const c10::cuda::CUDAGuard guard(grads.blocks[0].device());
  const at::ScalarType dtype = grads.blocks[0].scalar_type();
  at::Tensor out = at::empty({2 * grads.K, 2 * grads.K}, grads.blocks[0].options().dtype(accum_dtype(dtype)));
  at::Tensor workspace = gram_workspace_cuda(out, 2 * grads.K, grads.K);
  dispatch_float_types(dtype, "g", [&](auto tag) {
    using T = decltype(tag);
    using A = mk::accum_t<T>;
    std::vector<const T*> gp;
    std::vector<const A*> yp;
    mk::joint_gram_cuda<T>(grads.view<T>(gp), state.view<A>(yp), workspace.data_ptr(), out.data_ptr<A>(),
                           at::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void moco_track_combine_cuda(const std::vector<at::Tensor>& y, const std::vector<at::Tensor>& g,
                             const at::Tensor& scale, const at::Tensor& beta, const at::Tensor& weights,
                             const std::vector<at::Tensor>& out, double alpha, bool accumulate) {
  const Stack grads(g, "g"), state(y, "y", /*writable=*/true);
  check_state(state, grads);
  const c10::cuda::CUDAGuard guard(grads.blocks[0].device());
  const at::ScalarType out_dtype = check_outputs(out, grads);
  const at::Tensor s = accum_vector(scale, grads, "scale"), w = accum_vector(weights, grads, "weights");
  const at::Tensor b = accum_scalar(beta, grads, "beta");
  dispatch_two(grads.blocks[0].scalar_type(), out_dtype, [&](auto g_tag, auto out_tag) {
    using T = decltype(g_tag);
    using U = decltype(out_tag);
    using A = mk::accum_t<T>;
    std::vector<const T*> gp;
    std::vector<A*> yp;
    mk::track_combine_cuda<T, U>(grads.view<T>(gp), state.mutable_view<A>(yp), s.const_data_ptr<A>(), b.const_data_ptr<A>(),
                                 w.const_data_ptr<A>(), output_pointers<U>(out).data(), A(alpha), accumulate,
                                 at::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(molkernels, CUDA, m) {
  m.impl("combine_into", &combine_into_cuda);
  m.impl("moco_track_gram", &moco_track_gram_cuda);
  m.impl("joint_gram", &joint_gram_cuda);
  m.impl("moco_track_combine", &moco_track_combine_cuda);
}

}  // namespace molkernels
