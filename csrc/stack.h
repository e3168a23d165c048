// Shared by the CPU and CUDA bindings: argument checks that guard the kernels, the dtype switch,
// and the conversion of a list of [K, *shape] blocks into the core's StackView without copying.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "core/cpu_kernels.h"
#include "core/mol_kernels.h"

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

// Calls fn(T{}, U{}) for g's storage type T and the output storage type U.
template <class Fn>
void dispatch_two(at::ScalarType g_dtype, at::ScalarType out_dtype, Fn&& fn) {
  dispatch_float_types(g_dtype, "g", [&](auto g_tag) {
    dispatch_float_types(out_dtype, "out", [&](auto out_tag) { fn(g_tag, out_tag); });
  });
}

inline at::ScalarType accum_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// Each block as K rows of contiguous elements. A block whose trailing dimensions are not
// contiguous (rare: a transposed parameter) is made contiguous; views of a flat [K, D] buffer are
// used in place.
struct Stack {
  std::vector<at::Tensor> blocks;
  std::vector<int64_t> cols, row_stride;
  int64_t K = 0;

  // A `writable` stack is updated in place by the kernel, so its blocks must already have
  // contiguous rows: a contiguous copy would silently drop the update.
  Stack(const std::vector<at::Tensor>& input, const char* name, bool writable = false) {
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
      TORCH_CHECK_VALUE(!writable || trailing_contiguous(t), name, "[", j,
                        "]: is updated in place and needs contiguous trailing dimensions, got strides ", t.strides());
      at::Tensor rows = trailing_contiguous(t) ? t : t.contiguous();
      blocks.push_back(rows);
      cols.push_back(K > 0 ? rows.numel() / K : 0);
      row_stride.push_back(rows.stride(0));
    }
  }

  template <class T>
  mk::MutableStackView<T> mutable_view(std::vector<T*>& pointers) const {
    pointers.clear();
    for (const at::Tensor& t : blocks) pointers.push_back(reinterpret_cast<T*>(t.data_ptr()));
    return {pointers.data(), cols.data(), row_stride.data(), int64_t(blocks.size()), K};
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

// A large fresh CPU output is first touched by the kernel, one page fault per 4 KiB page, which
// costs as much as the combine itself (~4 GB/s here). Asking for transparent huge pages on it
// (where the kernel allows them with madvise) makes that 512 times fewer faults.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const size_t bytes = t.nbytes();
  if (!t.device().is_cpu() || bytes < 4 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(t.data_ptr()) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(t.data_ptr()) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// One output per block, shaped like the block without its leading K.
inline std::vector<at::Tensor> combine_outputs(const Stack& g) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : g.blocks) {
    out.push_back(at::empty(t.sizes().slice(1), t.options()));
    advise_huge_pages(out.back());
  }
  return out;
}

// y (the tracking state) pairs with g block by block, in g's accumulation dtype.
inline void check_state(const Stack& y, const Stack& g) {
  TORCH_CHECK_VALUE(y.blocks.size() == g.blocks.size(), "state: has ", y.blocks.size(), " blocks, grads have ",
                    g.blocks.size());
  const at::ScalarType expected = accum_dtype(g.blocks[0].scalar_type());
  for (size_t j = 0; j < y.blocks.size(); ++j) {
    TORCH_CHECK_VALUE(y.blocks[j].sizes() == g.blocks[j].sizes(), "state[", j, "]: shape ", y.blocks[j].sizes(),
                      " differs from grads[", j, "]'s ", g.blocks[j].sizes());
    TORCH_CHECK_TYPE(y.blocks[j].scalar_type() == expected, "state[", j, "]: dtype ", y.blocks[j].scalar_type(),
                     ", expected ", expected, " for ", g.blocks[0].scalar_type(), " gradients");
    TORCH_CHECK_VALUE(y.blocks[j].device() == g.blocks[j].device(), "state[", j, "]: device differs from grads'");
  }
}

// The blocks a combination is written into (parameters or their .grad): one per block of g,
// shaped like it without K, contiguous, one dtype, g's device. Returns their dtype.
inline at::ScalarType check_outputs(const std::vector<at::Tensor>& out, const Stack& g) {
  TORCH_CHECK_VALUE(out.size() == g.blocks.size(), "out: has ", out.size(), " tensors, g has ", g.blocks.size(),
                    " blocks");
  for (size_t j = 0; j < out.size(); ++j) {
    TORCH_CHECK_VALUE(out[j].sizes() == g.blocks[j].sizes().slice(1), "out[", j, "]: shape ", out[j].sizes(),
                      ", expected ", g.blocks[j].sizes().slice(1));
    TORCH_CHECK_VALUE(out[j].is_contiguous(), "out[", j, "]: must be contiguous");
    TORCH_CHECK_TYPE(out[j].scalar_type() == out[0].scalar_type(), "out[", j, "]: dtype differs from out[0]'s");
    TORCH_CHECK_VALUE(out[j].device() == g.blocks[j].device(), "out[", j, "]: device differs from g's");
  }
  return out[0].scalar_type();
}

template <class U>
std::vector<U*> output_pointers(const std::vector<at::Tensor>& out) {
  std::vector<U*> pointers;
  for (const at::Tensor& o : out) pointers.push_back(reinterpret_cast<U*>(o.data_ptr()));
  return pointers;
}

// [K] weights or scales as a contiguous tensor of the accumulation dtype (no copy when they are).
inline at::Tensor accum_vector(const at::Tensor& v, const Stack& g, const char* name) {
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == g.K, name, ": expected shape [", g.K, "], got ", v.sizes());
  TORCH_CHECK_VALUE(v.device() == g.blocks[0].device(), name, ": on ", v.device(), ", g on ", g.blocks[0].device());
  return v.to(accum_dtype(g.blocks[0].scalar_type())).contiguous();
}

// A rate such as MoCo's beta as a one-element tensor of the accumulation dtype on g's device: the
// steps compute it there from the device-side step count, so that a captured CUDA graph replays
// each step with that step's rate (a host number would be frozen at its capture-time value).
inline at::Tensor accum_scalar(const at::Tensor& v, const Stack& g, const char* name) {
  TORCH_CHECK_VALUE(v.numel() == 1, name, ": expected a tensor with one element, got shape ", v.sizes());
  TORCH_CHECK_VALUE(v.device() == g.blocks[0].device(), name, ": on ", v.device(), ", g on ", g.blocks[0].device());
  TORCH_CHECK_TYPE(at::isFloatingType(v.scalar_type()), name, ": expected a floating-point tensor, got ",
                   v.scalar_type());
  return v.to(accum_dtype(g.blocks[0].scalar_type())).reshape({1}).contiguous();
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
