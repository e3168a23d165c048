// CUDA implementations of the federated learning ops declared in fl_ops.cpp. Kernels run on the
// current stream and read the step counts and the mask on the device: no host sync.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>

#include "core/fl_cuda_kernels.h"
#include "fl_ops.h"
#include "stack.h"  // dispatch_float_types

namespace molkernels {
namespace {

void fl_adam_step_cuda(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& exp_avg,
                       const at::Tensor& exp_avg_sq, const at::Tensor& step, const at::Tensor& active, double lr,
                       double beta1, double beta2, double eps, double weight_decay) {
  const fl::ClientShape shape = fl::check_adam(params, grads, exp_avg, exp_avg_sq, step, active);
  const c10::cuda::CUDAGuard guard(params.device());
  dispatch_float_types(params.scalar_type(), "params", [&](auto tag) {
    using T = decltype(tag);
    using A = mk::accum_t<T>;
    mk::fl::adam_step_cuda<T>(reinterpret_cast<T*>(params.data_ptr()),
                              reinterpret_cast<const T*>(grads.const_data_ptr()), exp_avg.data_ptr<A>(),
                              exp_avg_sq.data_ptr<A>(), step.data_ptr<int64_t>(), active.const_data_ptr<bool>(),
                              shape.C, shape.D, mk::fl::AdamHyper{lr, beta1, beta2, eps, weight_decay},
                              at::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void fl_sgd_step_cuda(const at::Tensor& params, const at::Tensor& grads,
                      const std::optional<at::Tensor>& momentum_buffer, const at::Tensor& active, double lr,
                      double momentum, double weight_decay) {
  const fl::ClientShape shape = fl::check_sgd(params, grads, momentum_buffer, active, momentum);
  const c10::cuda::CUDAGuard guard(params.device());
  dispatch_float_types(params.scalar_type(), "params", [&](auto tag) {
    using T = decltype(tag);
    using A = mk::accum_t<T>;
    mk::fl::sgd_step_cuda<T>(reinterpret_cast<T*>(params.data_ptr()), reinterpret_cast<const T*>(grads.const_data_ptr()),
                             fl::momentum_pointer<A>(momentum_buffer, momentum), active.const_data_ptr<bool>(),
                             shape.C, shape.D, mk::fl::SgdHyper{lr, momentum, weight_decay},
                             at::cuda::getCurrentCUDAStream());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor fl_weighted_mean_cuda(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& active) {
  const fl::ClientShape shape = fl::check_mean(x, weights, active);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes().slice(1), x.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float_types(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    using A = mk::accum_t<T>;
    // Fresh bytes from the caching allocator: the tickets at their start are zeroed on the call's
    // stream (under graph capture a node that runs before the kernel on every replay).
    at::Tensor workspace = at::empty({int64_t(mk::fl::weighted_mean_cuda_workspace_bytes<T>(shape.C, shape.D))},
                                     x.options().dtype(at::kByte));
    C10_CUDA_CHECK(cudaMemsetAsync(workspace.data_ptr(), 0, mk::fl::weighted_mean_cuda_ticket_bytes(shape.D), stream));
    mk::fl::weighted_mean_cuda<T>(reinterpret_cast<const T*>(x.const_data_ptr()), weights.const_data_ptr<A>(),
                                  active.const_data_ptr<bool>(), shape.C, shape.D, workspace.data_ptr(),
                                  reinterpret_cast<T*>(out.data_ptr()), stream);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(molkernels, CUDA, m) {
  m.impl("fl_adam_step", &fl_adam_step_cuda);
  m.impl("fl_sgd_step", &fl_sgd_step_cuda);
  m.impl("fl_weighted_mean", &fl_weighted_mean_cuda);
}

}  // namespace molkernels
