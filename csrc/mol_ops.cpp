// Schemas and CPU implementations of the fused multi-objective passes: combine_into (write or
// accumulate Σ w_k g_k into parameters or their gradients) and MoCo's tracking passes. Fake
// implementations live in molkernels/_ops.py; CUDA ones in mol_ops_cuda.cpp.
#include <vector>

#include "core/mol_kernels.h"
#include "stack.h"

namespace molkernels {
namespace {

void combine_into_cpu(const std::vector<at::Tensor>& g, const at::Tensor& weights, const std::vector<at::Tensor>& out,
                      double alpha, bool accumulate) {
  const Stack stack(g, "g");
  const at::ScalarType out_dtype = check_outputs(out, stack);
  const at::Tensor w = accum_vector(weights, stack, "weights");
  dispatch_two(stack.blocks[0].scalar_type(), out_dtype, [&](auto g_tag, auto out_tag) {
    using T = decltype(g_tag);
    using U = decltype(out_tag);
    using A = mk::accum_t<T>;
    std::vector<const T*> pointers;
    mk::combine_into_cpu<T, U>(stack.view<T>(pointers), w.const_data_ptr<A>(), output_pointers<U>(out).data(), A(alpha),
                               accumulate);
  });
}

at::Tensor moco_track_gram_cpu(const std::vector<at::Tensor>& y, const std::vector<at::Tensor>& g,
                               const at::Tensor& beta) {
  const Stack grads(g, "g"), state(y, "y", /*writable=*/true);
  check_state(state, grads);
  const at::Tensor b = accum_scalar(beta, grads, "beta");
  const at::ScalarType dtype = grads.blocks[0].scalar_type();
  at::Tensor out = at::empty({grads.K, grads.K}, grads.blocks[0].options().dtype(accum_dtype(dtype)));
  dispatch_float_types(dtype, "g", [&](auto tag) {
    using T = decltype(tag);
    using A = mk::accum_t<T>;
    std::vector<const T*> gp;
    std::vector<A*> yp;
    mk::track_gram_cpu<T>(grads.view<T>(gp), state.mutable_view<A>(yp), b.const_data_ptr<A>()[0], out.data_ptr<A>());
  });
  return out;
}

at::Tensor joint_gram_cpu(const std::vector<at::Tensor>& y, const std::vector<at::Tensor>& g) {
  const Stack grads(g, "g"), state(y, "y");
  check_state(state, grads);
  const at::ScalarType dtype = grads.blocks[0].scalar_type();
  at::Tensor out = at::empty({2 * grads.K, 2 * grads.K}, grads.blocks[0].options().dtype(accum_dtype(dtype)));
  dispatch_float_types(dtype, "g", [&](auto tag) {
    using T = decltype(tag);
    using A = mk::accum_t<T>;
    std::vector<const T*> gp;
    std::vector<const A*> yp;
    mk::joint_gram_cpu<T>(grads.view<T>(gp), state.view<A>(yp), out.data_ptr<A>());
  });
  return out;
}

void moco_track_combine_cpu(const std::vector<at::Tensor>& y, const std::vector<at::Tensor>& g, const at::Tensor& scale,
                            const at::Tensor& beta, const at::Tensor& weights, const std::vector<at::Tensor>& out, double alpha,
                            bool accumulate) {
  const Stack grads(g, "g"), state(y, "y", /*writable=*/true);
  check_state(state, grads);
  const at::ScalarType out_dtype = check_outputs(out, grads);
  const at::Tensor s = accum_vector(scale, grads, "scale"), w = accum_vector(weights, grads, "weights");
  const at::Tensor b = accum_scalar(beta, grads, "beta");
  dispatch_two(grads.blocks[0].scalar_type(), out_dtype, [&](auto g_tag, auto out_tag) {
    using T = decltype(g_tag);
    using U = decltype(out_tag);
    using A = mk::accum_t<T>;
    std::vector<const T*> gp;
    std::vector<A*> yp;
    mk::track_combine_cpu<T, U>(grads.view<T>(gp), state.mutable_view<A>(yp), s.const_data_ptr<A>(), b.const_data_ptr<A>()[0],
                                w.const_data_ptr<A>(), output_pointers<U>(out).data(), A(alpha), accumulate);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(molkernels, m) {
  m.def("combine_into(Tensor[] g, Tensor weights, Tensor(a!)[] out, float alpha, bool accumulate) -> ()");
  m.def("moco_track_gram(Tensor(a!)[] y, Tensor[] g, Tensor beta) -> Tensor");
  m.def("joint_gram(Tensor[] y, Tensor[] g) -> Tensor");
  m.def(
      "moco_track_combine(Tensor(a!)[] y, Tensor[] g, Tensor scale, Tensor beta, Tensor weights, Tensor(b!)[] out, "
      "float alpha, bool accumulate) -> ()");
}

TORCH_LIBRARY_IMPL(molkernels, CPU, m) {
  m.impl("combine_into", &combine_into_cpu);
  m.impl("moco_track_gram", &moco_track_gram_cpu);
  m.impl("joint_gram", &joint_gram_cpu);
  m.impl("moco_track_combine", &moco_track_combine_cpu);
}

}  // namespace molkernels
