// Internal to the CUDA kernels: the block table that lets one persistent launch cover every block of
// a stack (the Gram family in cuda_gram.cuh, the combinations in cuda_products.cuh), and the vector
// loads and stores those launches use.
//
// - A table lists up to kTableBlocks non-empty blocks, passed by value (__grid_constant__): for
//   each, the first concatenated column, a pointer and row stride per operand, and the head (the
//   first column from which every operand is aligned for vector access). A longer list takes one
//   launch per kTableBlocks blocks (for_each_table).
// - CTA b of a grid owns the contiguous range [total * b / grid, total * (b + 1) / grid) of the
//   concatenated columns (cta_columns) and walks the blocks it touches (first_block, block_range):
//   vectors of V columns from the head on, scalar columns for what lies before and after.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "gpu_launch.cuh"

namespace mk {
namespace gpu {

constexpr int kTableBlocks = 512;
// Fewer concatenated columns per CTA than this and the grid shrinks (a CTA per 32 columns).
constexpr int64_t kMinColumnsPerCta = 32;

template <int kOperands>
struct BlockTable {
  int64_t begin[kTableBlocks + 1];  // first concatenated column of block j; begin[n] = columns
  const void* data[kOperands][kTableBlocks];
  int64_t stride[kOperands][kTableBlocks];  // elements between rows
  int32_t head[kTableBlocks];  // first column where every operand is vector-aligned; -1: scalar only
  int32_t num_blocks;
};

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ inline int64_t min_i64(int64_t a, int64_t b) { return b < a ? b : a; }
__host__ __device__ inline int64_t max_i64(int64_t a, int64_t b) { return a < b ? b : a; }

// ---- vector access ----------------------------------------------------------------------------

// The width of one access to N consecutive elements of X: 16 bytes, or all of them when they are
// fewer (an fp16 output of two fp64 columns is one 4-byte access).
template <class X, int N>
__host__ __device__ constexpr int vector_access_bytes() {
  return int(N * sizeof(X)) >= 16 ? 16 : int(N * sizeof(X));
}

template <int kBytes>
struct alignas(kBytes) VectorWord {
  uint32_t w[kBytes / 4];
};

// The GPU faults on a misaligned vector access; the CPU would not, so the emulation checks.
__device__ inline void check_vector_alignment(const void* p, int bytes) {
#if defined(MK_SIMT_EMULATION)
  if (reinterpret_cast<uintptr_t>(p) % uintptr_t(bytes) != 0)
    ::mk::simt::fail("misaligned %d-byte vector access at %p", bytes, p);
#else
  (void)p;
  (void)bytes;
#endif
}

// N elements of X as whole accesses of vector_access_bytes<X, N>() bytes each.
template <class X, int N>
struct VectorAccess {
  static constexpr int kBytes = vector_access_bytes<X, N>();
  static constexpr int kCount = int(N * sizeof(X) / kBytes);
  static_assert(kBytes % 4 == 0 && N * sizeof(X) % kBytes == 0, "whole 4-, 8- or 16-byte accesses");
  using Word = VectorWord<kBytes>;
};

// p aligned to the access width (load_vector and store_vector).
template <class X, int N>
__device__ inline void load_vector(const X* p, X (&out)[N]) {
  using A = VectorAccess<X, N>;
  check_vector_alignment(p, A::kBytes);
  typename A::Word v[A::kCount];
#pragma unroll
  for (int i = 0; i < A::kCount; ++i) v[i] = reinterpret_cast<const typename A::Word*>(p)[i];
  memcpy(out, v, sizeof out);
}
template <class X, int N>
__device__ inline void store_vector(X* p, const X (&in)[N]) {
  using A = VectorAccess<X, N>;
  check_vector_alignment(p, A::kBytes);
  typename A::Word v[A::kCount];
  memcpy(v, in, sizeof v);
#pragma unroll
  for (int i = 0; i < A::kCount; ++i) reinterpret_cast<typename A::Word*>(p)[i] = v[i];
}

// ---- walking the table (device) ---------------------------------------------------------------

__device__ inline void cta_columns(int64_t total, int64_t& c0, int64_t& c1) {
  c0 = total * int64_t(blockIdx.x) / int64_t(gridDim.x);
  c1 = total * (int64_t(blockIdx.x) + 1) / int64_t(gridDim.x);
}

// The part of block j inside the concatenated columns [c0, c1): local columns [lo, hi), of which
// [va, vb) are whole vectors (V columns from the head on) and the rest scalar.
struct BlockRange {
  int64_t lo, hi, va, vb;
};
template <class Table>
__device__ inline BlockRange block_range(const Table& tab, int j, int64_t c0, int64_t c1, int V) {
  BlockRange b;
  b.lo = max_i64(c0, tab.begin[j]) - tab.begin[j];
  b.hi = min_i64(c1, tab.begin[j + 1]) - tab.begin[j];
  const int64_t h = tab.head[j];
  if (h < 0 || b.hi - b.lo < V) {
    b.va = b.vb = b.hi;
    return b;
  }
  b.va = b.lo <= h ? h : h + ceil_div(b.lo - h, V) * V;
  if (b.va > b.hi) b.va = b.hi;
  b.vb = b.va + (b.hi - b.va) / V * V;
  return b;
}

// First block whose columns reach past column c (blocks are non-empty).
template <class Table>
__device__ inline int first_block(const Table& tab, int64_t c) {
  int lo = 0, hi = tab.num_blocks;  // answer in [lo, hi]
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (tab.begin[mid + 1] <= c) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// ---- filling tables (host) --------------------------------------------------------------------

// One operand of one block: rows of `size`-byte elements, `stride` elements apart, read or written
// with `align`-byte vector accesses. data == nullptr: the operand is absent.
struct TableOperand {
  const void* data;
  int64_t stride;
  size_t size;
  size_t align;
};

// The first column at which every present operand is `align`-aligned in every row, or -1. The
// first operand fixes the candidate; the others move by a multiple of their alignment per vector
// (a kernel's V columns), so no later column can fix one that is misaligned there.
template <int kOperands>
inline int32_t vector_head(const TableOperand (&ops)[kOperands]) {
  const uintptr_t a0 = reinterpret_cast<uintptr_t>(ops[0].data);
  if (a0 % ops[0].size != 0) return -1;
  const int64_t h = int64_t((ops[0].align - a0 % ops[0].align) % ops[0].align / ops[0].size);
  for (const TableOperand& op : ops) {
    if (op.data == nullptr) continue;
    const uintptr_t a = reinterpret_cast<uintptr_t>(op.data);
    if ((uint64_t(op.stride) * op.size) % op.align != 0 || (a + uint64_t(h) * op.size) % op.align != 0) return -1;
  }
  return int32_t(h);
}

// Fills tables with the non-empty blocks, kTableBlocks at a time, and calls launch(table, last)
// for each, `last` on the final one (which may hold no blocks when none are non-empty).
// operands(j, ops) fills the kOperands operands of block j.
template <int kOperands, class Operands, class Launch>
void for_each_table(int64_t num_blocks, const int64_t* cols, const Operands& operands, const Launch& launch) {
  BlockTable<kOperands> tab;
  tab.num_blocks = 0;
  tab.begin[0] = 0;
  int64_t remaining = 0;
  for (int64_t j = 0; j < num_blocks; ++j) remaining += cols[j] > 0 ? 1 : 0;
  for (int64_t j = 0; j < num_blocks; ++j) {
    if (cols[j] <= 0) continue;
    TableOperand ops[kOperands];
    operands(j, ops);
    const int n = tab.num_blocks;
    for (int i = 0; i < kOperands; ++i) {
      tab.data[i][n] = ops[i].data;
      tab.stride[i][n] = ops[i].stride;
    }
    tab.head[n] = vector_head(ops);
    tab.begin[n + 1] = tab.begin[n] + cols[j];
    tab.num_blocks = n + 1;
    --remaining;
    if (tab.num_blocks == kTableBlocks && remaining > 0) {
      launch(tab, false);
      tab.num_blocks = 0;
    }
  }
  launch(tab, true);
}

}  // namespace gpu
}  // namespace mk
