// Schemas and CPU implementations of the federated learning ops (molkernels.federated): batched
// Adam and SGD steps of client-stacked [C, D] tensors, in place, and the server's masked weighted
// mean. Fake implementations live in molkernels/_ops.py; CUDA ones in fl_ops_cuda.cpp.
#include <optional>

#include "core/fl_kernels.h"
#include "fl_ops.h"
#include "stack.h"  // dispatch_float_types

namespace molkernels {
namespace {

void fl_adam_step_cpu(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& exp_avg,
                      const at::Tensor& exp_avg_sq, const at::Tensor& step, const at::Tensor& active, double lr,
                      double beta1, double beta2, double eps, double weight_decay) {
  const fl::ClientShape shape = fl::check_adam(params, grads, exp_avg, exp_avg_sq, step, active);
  dispatch_float_types(params.scalar_type(), "params", [&](auto tag) {
    using T = decltype(tag);
    using A = mk::accum_t<T>;
    mk::fl::adam_step_cpu<T>(reinterpret_cast<T*>(params.data_ptr()), reinterpret_cast<const T*>(grads.const_data_ptr()),
                             exp_avg.data_ptr<A>(), exp_avg_sq.data_ptr<A>(), step.data_ptr<int64_t>(),
                             active.const_data_ptr<bool>(), shape.C, shape.D,
                             mk::fl::AdamHyper{lr, beta1, beta2, eps, weight_decay});
  });
}

void fl_sgd_step_cpu(const at::Tensor& params, const at::Tensor& grads, const std::optional<at::Tensor>& momentum_buffer,
                     const at::Tensor& active, double lr, double momentum, double weight_decay) {
  const fl::ClientShape shape = fl::check_sgd(params, grads, momentum_buffer, active, momentum);
  dispatch_float_types(params.scalar_type(), "params", [&](auto tag) {
    using T = decltype(tag);
    using A = mk::accum_t<T>;
    mk::fl::sgd_step_cpu<T>(reinterpret_cast<T*>(params.data_ptr()), reinterpret_cast<const T*>(grads.const_data_ptr()),
                            fl::momentum_pointer<A>(momentum_buffer, momentum), active.const_data_ptr<bool>(),
                            shape.C, shape.D, mk::fl::SgdHyper{lr, momentum, weight_decay});
  });
}

at::Tensor fl_weighted_mean_cpu(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& active) {
  const fl::ClientShape shape = fl::check_mean(x, weights, active);
  at::Tensor out = at::empty(x.sizes().slice(1), x.options());
  dispatch_float_types(x.scalar_type(), "x", [&](auto tag) {
    using T = decltype(tag);
    using A = mk::accum_t<T>;
    mk::fl::weighted_mean_cpu<T>(reinterpret_cast<const T*>(x.const_data_ptr()), weights.const_data_ptr<A>(),
                                 active.const_data_ptr<bool>(), shape.C, shape.D, reinterpret_cast<T*>(out.data_ptr()));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(molkernels, m) {
  m.def(
      "fl_adam_step(Tensor(a!) params, Tensor grads, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) step, "
      "Tensor active, float lr, float beta1, float beta2, float eps, float weight_decay) -> ()");
  m.def(
      "fl_sgd_step(Tensor(a!) params, Tensor grads, Tensor(b!)? momentum_buffer, Tensor active, float lr, "
      "float momentum, float weight_decay) -> ()");
  m.def("fl_weighted_mean(Tensor x, Tensor weights, Tensor active) -> Tensor");
}

TORCH_LIBRARY_IMPL(molkernels, CPU, m) {
  m.impl("fl_adam_step", &fl_adam_step_cpu);
  m.impl("fl_sgd_step", &fl_sgd_step_cpu);
  m.impl("fl_weighted_mean", &fl_weighted_mean_cpu);
}

}  // namespace molkernels
