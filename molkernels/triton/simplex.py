"""Euclidean projection of each row of [..., K] onto the probability simplex {x >= 0, Σ x = 1}.

x_i = max(v_i − τ, 0) with τ the root of Σ_i max(v_i − τ, 0) = 1, found exactly by Michelot's fixed
point, as in csrc/core/simplex.h. The projection is invariant to adding a constant, so each row is
shifted by its maximum m first: with w = v − m the root lies in [−1, 0), and no sum of large |v|
loses the "− 1" or overflows. τ starts at −1 (below the root), then repeatedly becomes
(Σ_{w_i > τ} w_i − 1) / #{w_i > τ}; τ never decreases and the kept set only shrinks, so a row
settles after at most K + 1 passes. A program projects BLOCK_R rows at once and sweeps them
BLOCK_K columns at a time (K has no upper bound), passing again while any of its rows still moves.
Arithmetic is in float64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import interpreted


@triton.jit
def _project_simplex_kernel(v_ptr, out_ptr, n_rows, K, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_rows = row < n_rows
    row_start = v_ptr + row[:, None] * K

    top = tl.full((BLOCK_R,), float("-inf"), dtype=tl.float64)
    # v − v is 0 for finite v and NaN for NaN and ±Inf: summed, it flags a row without a projection.
    non_finite = tl.zeros((BLOCK_R,), dtype=tl.float64)
    for first_col in range(0, K, BLOCK_K):
        col = first_col + tl.arange(0, BLOCK_K)
        mask = in_rows[:, None] & (col < K)[None, :]
        v = tl.load(row_start + col[None, :], mask=mask, other=0.0).to(tl.float64)
        top = tl.maximum(top, tl.max(tl.where(mask, v, float("-inf")), axis=1))
        non_finite += tl.sum(v - v, axis=1)
    finite = in_rows & (non_finite == 0.0)
    top = tl.where(finite, top, 0.0)

    tau = tl.full((BLOCK_R,), -1.0, dtype=tl.float64)
    kept = tl.zeros((BLOCK_R,), dtype=tl.int32)  # no pass yet: the first one always sets τ
    moving = finite
    passes = 0
    while (passes <= K) & (tl.max(moving.to(tl.int32), axis=0) > 0):
        kept_sum = tl.zeros((BLOCK_R,), dtype=tl.float64)
        now_kept = tl.zeros((BLOCK_R,), dtype=tl.int32)
        for first_col in range(0, K, BLOCK_K):
            col = first_col + tl.arange(0, BLOCK_K)
            v = tl.load(row_start + col[None, :], mask=in_rows[:, None] & (col < K)[None, :], other=float("-inf"))
            # w may round to −inf for an entry far below the maximum; it is never kept.
            w = v.to(tl.float64) - top[:, None]
            above = w > tau[:, None]
            kept_sum += tl.sum(tl.where(above, w, 0.0), axis=1)
            now_kept += tl.sum(above.to(tl.int32), axis=1)
        # The maximum (w = 0) is always kept: τ ≤ −1 / kept < 0, also after rounding.
        moving = moving & (now_kept != kept)
        tau = tl.where(moving, (kept_sum - 1.0) / tl.maximum(now_kept, 1).to(tl.float64), tau)
        kept = tl.where(moving, now_kept, kept)
        passes += 1

    out_start = out_ptr + row[:, None] * K
    for first_col in range(0, K, BLOCK_K):
        col = first_col + tl.arange(0, BLOCK_K)
        mask = in_rows[:, None] & (col < K)[None, :]
        v = tl.load(row_start + col[None, :], mask=mask, other=0.0).to(tl.float64)
        x = tl.where(finite[:, None], tl.maximum((v - top[:, None]) - tau[:, None], 0.0), float("nan"))
        if out_ptr.dtype.element_ty != tl.float64:
            x = x.to(tl.float32)  # the interpreter cannot cast float64 to bfloat16 directly
        tl.store(out_start + col[None, :], x.to(out_ptr.dtype.element_ty), mask=mask)


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Each row of v [..., K] projected onto the simplex: same shape and dtype, contiguous."""
    rows = v.contiguous()
    out = torch.empty_like(rows)
    K = rows.shape[-1]
    n_rows = rows.numel() // K
    if n_rows == 0:
        return out
    # A row tile of 1K elements on a GPU; 64K in the interpreter, which pays per operation.
    tile = (1 << 16) if interpreted(v.device) else 1024
    block_k = min(triton.next_power_of_2(K), tile)
    block_r = min(tile // block_k, triton.next_power_of_2(n_rows))
    # A warp per 32 elements of the tile, at most 4: a few rows of a small K on 4 warps left most
    # threads holding copies, and ptxas spilled on sm_90 (float64, BLOCK_R = 4, BLOCK_K = 2).
    num_warps = min(max(block_r * block_k // 32, 1), 4)
    _project_simplex_kernel[(triton.cdiv(n_rows, block_r),)](
        rows, out, n_rows, K, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps,
    )
    return out
