"""The combined direction Σ_k w_k g_k of a gradient stack, one output per block.

Each program owns BLOCK_D columns of a block and walks down its K rows BLOCK_K at a time, so every
input element is read once and every output element written once, with a fixed summation order.
One launch per non-empty block: the outputs are separate tensors (a custom op's outputs may not
alias each other), so adjacent input views cannot share a launch as they do for the Gram.
"""

from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from .._stack import accum_dtype
from ._launch import interpreted, row_view


# K only bounds the rows (never the vectorised column axis): one variant for every K of a tile size.
@triton.jit(do_not_specialize=["K"])
def _combine_kernel(
    g_ptr, weights_ptr, out_ptr, K, cols, row_stride, weights_stride,
    ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    col = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_cols = col < cols
    acc = tl.zeros((BLOCK_D,), dtype=ACC_DTYPE)
    for first_row in range(0, K, BLOCK_K):
        rows = first_row + tl.arange(0, BLOCK_K)
        in_rows = rows < K
        w = tl.load(weights_ptr + rows * weights_stride, mask=in_rows, other=0.0).to(ACC_DTYPE)
        x = tl.load(
            g_ptr + rows.to(tl.int64)[:, None] * row_stride + col[None, :],
            mask=in_rows[:, None] & in_cols[None, :], other=0.0,
        ).to(ACC_DTYPE)
        acc += tl.sum(x * w[:, None], axis=0)
    tl.store(out_ptr + col, acc.to(out_ptr.dtype.element_ty), mask=in_cols)


def _tiling(K: int, device: torch.device):
    """(BLOCK_K, BLOCK_D): a [BLOCK_K, BLOCK_D] tile of 4K elements per step on a GPU; in the
    interpreter a whole K of up to 64 rows and long column spans, so that few programs run."""
    if interpreted(device):
        block_k = min(triton.next_power_of_2(K), 64)
        return block_k, max(1024, (1 << 20) // block_k)
    block_k = min(triton.next_power_of_2(K), 16)
    return block_k, max(128, 4096 // block_k)


def combine(g: List[torch.Tensor], weights: torch.Tensor) -> List[torch.Tensor]:
    """[Σ_k w_k block[k] for each block], in the blocks' dtype, accumulated in float32 (float64 for
    float64 blocks)."""
    K = g[0].shape[0]
    acc_dtype = accum_dtype(g[0].dtype)
    acc_tl = tl.float64 if acc_dtype == torch.float64 else tl.float32
    block_k, block_d = _tiling(K, g[0].device)
    outputs = []
    for block in g:
        out = torch.empty(block.shape[1:], dtype=block.dtype, device=block.device)
        rows = row_view(block)
        cols = rows.shape[1]
        if cols > 0:
            # Narrow blocks get narrow tiles in the interpreter; a GPU keeps one width, one variant.
            block_cols = min(block_d, triton.next_power_of_2(cols)) if interpreted(block.device) else block_d
            _combine_kernel[(triton.cdiv(cols, block_cols),)](
                rows, weights, out, K, cols, rows.stride(0), weights.stride(0),
                ACC_DTYPE=acc_tl, BLOCK_K=block_k, BLOCK_D=block_cols,
            )
        outputs.append(out)
    return outputs
