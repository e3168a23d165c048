// Shared by the CPU and CUDA bindings: argument checks that guard the kernels, the dtype switch,
// and the conversion of a list of [K, *shape] blocks into the core's StackView without copying.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <vector>

#include "core/cpu_kernels.h"

namespace molkernels {

// Dispatches on the four floating dtypes; fn receives a value of the matching core storage type.
template <class Fn>
void dispatch_float_types(at::ScalarType dtype, const char* what, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kDouble: return fn(double{});
    case at::kHalf: return fn(mk::half_t{});
    case at::kBFloat16: return fn(mk::bf16_t{});
    default: TORCH_CHECK_TYPE(false, what, ": expected a float16, bfloat16, float32 or float64 tensor, got ", dtype);
  }
}

inline at::ScalarType accum_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// Each block as K rows of contiguous elements. A block whose trailing dimensions are not
// contiguous (rare: a transposed parameter) is made contiguous; views of a flat [K, D] buffer are
// used in place.
struct Stack {
  std::vector<at::Tensor> blocks;
  std::vector<int64_t> cols, row_stride;
  int64_t K = 0;

  Stack(const std::vector<at::Tensor>& input, const char* name) {
    TORCH_CHECK_VALUE(!input.empty(), name, ": expected at least one block, got an empty list");
    K = input[0].dim() > 0 ? input[0].size(0) : 0;
    TORCH_CHECK_VALUE(K > 0, name, ": blocks must have a leading objective dimension K >= 1");
    for (size_t j = 0; j < input.size(); ++j) {
      const at::Tensor& t = input[j];
      TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(0) == K, name, "[", j, "]: expected leading dimension K = ", K,
                        ", got shape ", t.sizes());
      TORCH_CHECK_VALUE(t.scalar_type() == input[0].scalar_type(), name, "[", j, "]: dtype ", t.scalar_type(),
                        " differs from block 0's ", input[0].scalar_type());
      TORCH_CHECK_VALUE(t.device() == input[0].device(), name, "[", j, "]: on ", t.device(), ", block 0 on ",
                        input[0].device());
      at::Tensor rows = trailing_contiguous(t) ? t : t.contiguous();
      blocks.push_back(rows);
      cols.push_back(K > 0 ? rows.numel() / K : 0);
      row_stride.push_back(rows.stride(0));
    }
  }

  template <class T>
  mk::StackView<T> view(std::vector<const T*>& pointers) const {
    pointers.clear();
    for (const at::Tensor& t : blocks) pointers.push_back(reinterpret_cast<const T*>(t.const_data_ptr()));
    return {pointers.data(), cols.data(), row_stride.data(), int64_t(blocks.size()), K};
  }

 private:
  static bool trailing_contiguous(const at::Tensor& t) {
    if (t.dim() == 1) return true;  // [K]: one column per row, any stride
    int64_t expected = 1;
    for (int64_t d = t.dim() - 1; d >= 1; --d) {
      if (t.size(d) != 1 && t.stride(d) != expected) return false;
      expected *= t.size(d);
    }
    return true;
  }
};

// a and b must pair up block by block.
inline void check_same_structure(const Stack& a, const Stack& b) {
  TORCH_CHECK_VALUE(a.blocks.size() == b.blocks.size(), "b: has ", b.blocks.size(), " blocks, a has ",
                    a.blocks.size());
  TORCH_CHECK_VALUE(a.K == b.K, "b: K = ", b.K, " differs from a's K = ", a.K);
  for (size_t j = 0; j < a.blocks.size(); ++j) {
    TORCH_CHECK_VALUE(a.blocks[j].sizes() == b.blocks[j].sizes(), "b[", j, "]: shape ", b.blocks[j].sizes(),
                      " differs from a[", j, "]'s ", a.blocks[j].sizes());
    TORCH_CHECK_VALUE(a.blocks[j].scalar_type() == b.blocks[j].scalar_type(), "b[", j, "]: dtype differs from a's");
    TORCH_CHECK_VALUE(a.blocks[j].device() == b.blocks[j].device(), "b[", j, "]: device differs from a's");
  }
}

// One output per block, shaped like the block without its leading K.
inline std::vector<at::Tensor> combine_outputs(const Stack& g) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : g.blocks) out.push_back(at::empty(t.sizes().slice(1), t.options()));
  return out;
}

inline void check_gram_argument(const at::Tensor& gram) {
  TORCH_CHECK_VALUE(gram.dim() >= 2 && gram.size(-1) == gram.size(-2) && gram.size(-1) >= 1,
                    "gram: expected a square [..., K, K] tensor with K >= 1, got shape ", gram.sizes());
}

inline void check_simplex_argument(const at::Tensor& v) {
  TORCH_CHECK_VALUE(v.dim() >= 1 && v.size(-1) >= 1, "v: expected a [..., K] tensor with K >= 1, got shape ",
                    v.sizes());
}

}  // namespace molkernels
