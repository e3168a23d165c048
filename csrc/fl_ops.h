// Shared by the CPU and CUDA bindings of the federated learning ops: the checks that guard the
// kernels (the Python layer checks first and names the argument; these keep a direct torch.ops
// call from reaching a kernel with bad memory) and the views the kernels take.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <optional>

#include "core/federated.h"

namespace molkernels {
namespace fl {

inline at::ScalarType state_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// The clients' dimension C and parameters per client D of a contiguous [C, ...] tensor.
struct ClientShape {
  int64_t C, D;
};

inline ClientShape client_shape(const at::Tensor& params, const char* name) {
  TORCH_CHECK_VALUE(params.dim() >= 1 && params.size(0) >= 1, name, ": expected a [C, D] tensor with C >= 1, got ",
                    params.sizes());
  TORCH_CHECK_VALUE(params.is_contiguous(), name, ": must be contiguous");
  return {params.size(0), params.size(0) > 0 ? params.numel() / params.size(0) : 0};
}

inline void check_like(const at::Tensor& t, const at::Tensor& params, at::ScalarType dtype, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == params.sizes(), name, ": shape ", t.sizes(), " differs from params' ", params.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == params.device(), name, ": on ", t.device(), ", params on ", params.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, ": must be contiguous");
}

inline void check_clients(const at::Tensor& t, int64_t C, at::ScalarType dtype, const at::Tensor& params,
                          const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C, name, ": expected shape [", C, "], got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == params.device(), name, ": on ", t.device(), ", params on ", params.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, ": must be contiguous");
}

inline ClientShape check_adam(const at::Tensor& params, const at::Tensor& grads, const at::Tensor& exp_avg,
                              const at::Tensor& exp_avg_sq, const at::Tensor& step, const at::Tensor& active) {
  const ClientShape shape = client_shape(params, "params");
  check_like(grads, params, params.scalar_type(), "grads");
  check_like(exp_avg, params, state_dtype(params.scalar_type()), "exp_avg");
  check_like(exp_avg_sq, params, state_dtype(params.scalar_type()), "exp_avg_sq");
  check_clients(step, shape.C, at::kLong, params, "step");
  check_clients(active, shape.C, at::kBool, params, "active");
  return shape;
}

inline ClientShape check_sgd(const at::Tensor& params, const at::Tensor& grads,
                             const std::optional<at::Tensor>& momentum_buffer, const at::Tensor& active,
                             double momentum) {
  const ClientShape shape = client_shape(params, "params");
  check_like(grads, params, params.scalar_type(), "grads");
  TORCH_CHECK_VALUE(momentum == 0 || momentum_buffer.has_value(), "momentum_buffer: required when momentum > 0");
  if (momentum_buffer) check_like(*momentum_buffer, params, state_dtype(params.scalar_type()), "momentum_buffer");
  check_clients(active, shape.C, at::kBool, params, "active");
  return shape;
}

inline ClientShape check_mean(const at::Tensor& x, const at::Tensor& weights, const at::Tensor& active) {
  const ClientShape shape = client_shape(x, "x");
  check_clients(weights, shape.C, state_dtype(x.scalar_type()), x, "weights");
  check_clients(active, shape.C, at::kBool, x, "active");
  return shape;
}

// The momentum buffer the kernels update: none without momentum (a given one is left alone).
template <class A>
A* momentum_pointer(const std::optional<at::Tensor>& momentum_buffer, double momentum) {
  return momentum != 0 ? reinterpret_cast<A*>(momentum_buffer->data_ptr()) : nullptr;
}

}  // namespace fl
}  // namespace molkernels
