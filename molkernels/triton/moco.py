"""The fused passes of the multi-objective steps in Triton (the CPU/CUDA kernels are in
csrc/core/mol_*_kernels.*):

- `moco_track_gram(y, g, β)`: y ← y − β (y − g) in place and the Gram of the updated y, in one pass:
  each program updates its span of columns of all K rows and multiplies the updated tile by itself.
- `joint_gram(y, g)`: the [2K, 2K] Gram of the rows [y; g] in one read of y and g.
- `combine_into(g, w, out, α, accumulate)` and `moco_track_combine(y, g, s, β, w, out, α, accumulate)`:
  out (+)= α Σ_k w_k r_k, where r = g, or r = y updated in place as y ← y + β (s_k g_k − y).

The single-pass Gram kernels hold all K rows in one tile (K ≤ 64); a larger K tracks first and
then reuses gram.py, one more pass over y.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import triton
import triton.language as tl

from .._stack import accum_dtype
from ._launch import interpreted, programs_to_fill, row_view
from .gram import cross_gram, gram

MAX_FUSED_K = 64


def _acc_tl(dtype: torch.dtype):
    return tl.float64 if accum_dtype(dtype) == torch.float64 else tl.float32


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """A scalar argument as a one-element tensor in the accumulation dtype: Triton would pass a
    Python float as float32, which rounds β for float64 stacks."""
    return torch.full((1,), value, dtype=accum_dtype(like.dtype), device=like.device)


@triton.jit
def _tile_product(a, b, USE_DOT: tl.constexpr):
    if USE_DOT:
        return tl.dot(a, tl.trans(b), input_precision="ieee")  # fp32 products, never TF32
    return tl.sum(a[:, None, :] * b[None, :, :], axis=2)


@triton.jit
def _track_gram_kernel(
    y_ptr, g_ptr, partial_ptr, K, cols, y_row_stride, g_row_stride, span, beta_ptr,
    USE_DOT: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    chunk = tl.program_id(0)
    beta = tl.load(beta_ptr)
    rows = tl.arange(0, BLOCK_K)
    y_rows = y_ptr + rows.to(tl.int64)[:, None] * y_row_stride
    g_rows = g_ptr + rows.to(tl.int64)[:, None] * g_row_stride
    acc = tl.zeros((BLOCK_K, BLOCK_K), dtype=ACC_DTYPE)
    for offset in range(0, span, BLOCK_D):
        col = chunk.to(tl.int64) * span + offset + tl.arange(0, BLOCK_D)
        mask = (rows < K)[:, None] & (col < cols)[None, :]
        y = tl.load(y_rows + col[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        g = tl.load(g_rows + col[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        y = y - beta * (y - g)
        tl.store(y_rows + col[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        acc += _tile_product(y, y, USE_DOT)
    tile = tl.arange(0, BLOCK_K)
    tl.store(partial_ptr + chunk * (BLOCK_K * BLOCK_K) + tile[:, None] * BLOCK_K + tile[None, :], acc)


@triton.jit
def _joint_gram_kernel(
    y_ptr, g_ptr, yy_ptr, yg_ptr, gg_ptr, K, cols, y_row_stride, g_row_stride, span,
    USE_DOT: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    chunk = tl.program_id(0)
    rows = tl.arange(0, BLOCK_K)
    yy = tl.zeros((BLOCK_K, BLOCK_K), dtype=ACC_DTYPE)
    yg = tl.zeros((BLOCK_K, BLOCK_K), dtype=ACC_DTYPE)
    gg = tl.zeros((BLOCK_K, BLOCK_K), dtype=ACC_DTYPE)
    for offset in range(0, span, BLOCK_D):
        col = chunk.to(tl.int64) * span + offset + tl.arange(0, BLOCK_D)
        mask = (rows < K)[:, None] & (col < cols)[None, :]
        y = tl.load(y_ptr + rows.to(tl.int64)[:, None] * y_row_stride + col[None, :], mask=mask, other=0.0)
        g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * g_row_stride + col[None, :], mask=mask, other=0.0)
        y = y.to(ACC_DTYPE)
        g = g.to(ACC_DTYPE)
        yy += _tile_product(y, y, USE_DOT)
        yg += _tile_product(y, g, USE_DOT)
        gg += _tile_product(g, g, USE_DOT)
    tile = tl.arange(0, BLOCK_K)
    at = chunk * (BLOCK_K * BLOCK_K) + tile[:, None] * BLOCK_K + tile[None, :]
    tl.store(yy_ptr + at, yy)
    tl.store(yg_ptr + at, yg)
    tl.store(gg_ptr + at, gg)


@triton.jit
def _track_combine_kernel(
    g_ptr, y_ptr, scale_ptr, weights_ptr, out_ptr, K, cols, g_row_stride, y_row_stride, beta_ptr, alpha_ptr,
    TRACK: tl.constexpr, ACCUMULATE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    col = tl.program_id(0).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_cols = col < cols
    beta = tl.load(beta_ptr)
    alpha = tl.load(alpha_ptr)
    acc = tl.zeros((BLOCK_D,), dtype=ACC_DTYPE)
    for first_row in range(0, K, BLOCK_K):
        rows = first_row + tl.arange(0, BLOCK_K)
        in_rows = rows < K
        mask = in_rows[:, None] & in_cols[None, :]
        w = tl.load(weights_ptr + rows, mask=in_rows, other=0.0).to(ACC_DTYPE)
        r = tl.load(g_ptr + rows.to(tl.int64)[:, None] * g_row_stride + col[None, :], mask=mask, other=0.0)
        r = r.to(ACC_DTYPE)
        if TRACK:
            s = tl.load(scale_ptr + rows, mask=in_rows, other=0.0).to(ACC_DTYPE)
            y_at = y_ptr + rows.to(tl.int64)[:, None] * y_row_stride + col[None, :]
            y = tl.load(y_at, mask=mask, other=0.0).to(ACC_DTYPE)
            r = y + beta * (s[:, None] * r - y)
            tl.store(y_at, r.to(y_ptr.dtype.element_ty), mask=mask)
        acc += tl.sum(r * w[:, None], axis=0)
    value = alpha * acc
    if ACCUMULATE:
        value += tl.load(out_ptr + col, mask=in_cols, other=0.0).to(ACC_DTYPE)
    tl.store(out_ptr + col, value.to(out_ptr.dtype.element_ty), mask=in_cols)


def _gram_tiling(K: int, dtype: torch.dtype, device: torch.device):
    """(BLOCK_K, BLOCK_D, USE_DOT): one tile holds all K rows."""
    use_dot = dtype != torch.float64 and K > 8
    block_k = max(triton.next_power_of_2(K), 16) if use_dot else triton.next_power_of_2(K)
    if interpreted(device):
        return block_k, (8192 if use_dot else min(max((1 << 20) // (block_k * block_k), 64), 8192)), use_dot
    if use_dot:
        return block_k, (64 if block_k == 64 else 128), True
    return block_k, min(max(8192 // (block_k * block_k), 32), 1024), False


def _spans(cols: int, block_d: int, device: torch.device):
    """(span, chunks): the columns of one block cut into enough spans to fill the device."""
    chunks = max(1, min(programs_to_fill(device), triton.cdiv(cols, block_d)))
    span = triton.cdiv(triton.cdiv(cols, chunks), block_d) * block_d
    return span, triton.cdiv(cols, span)


def _reduce(partials: torch.Tensor, K: int) -> torch.Tensor:
    """The per-program partials summed in a fixed order (torch's reduction has no atomics)."""
    return partials.sum(0)[:K, :K]


def _fused_gram_pass(kernel, y: Sequence[torch.Tensor], g: Sequence[torch.Tensor], products: int, *scalars):
    """Runs a one-tile Gram kernel over every block pair (y_j, g_j); returns `products` [K, K]
    results, each reduced in a fixed order from per-program partials."""
    K, device = g[0].shape[0], g[0].device
    acc_dtype = accum_dtype(g[0].dtype)
    block_k, block_d, use_dot = _gram_tiling(K, g[0].dtype, device)
    plans = []
    for yb, gb in zip(y, g):
        y_rows, g_rows = row_view(yb), row_view(gb)
        cols = g_rows.shape[1]
        if cols == 0:
            continue
        block_cols = min(block_d, max(16, triton.next_power_of_2(cols)))
        plans.append((y_rows, g_rows, cols, block_cols) + _spans(cols, block_cols, device))
    n_partials = max(1, sum(plan[-1] for plan in plans))
    partials = [torch.zeros((n_partials, block_k, block_k), dtype=acc_dtype, device=device) for _ in range(products)]
    first = 0
    for y_rows, g_rows, cols, block_cols, span, chunks in plans:
        kernel[(chunks,)](
            y_rows, g_rows, *(p[first:] for p in partials), K, cols, y_rows.stride(0), g_rows.stride(0), span,
            *scalars, USE_DOT=use_dot, ACC_DTYPE=_acc_tl(acc_dtype), BLOCK_K=block_k, BLOCK_D=block_cols,
        )
        first += chunks
    return [_reduce(p, K) for p in partials]


def moco_track_gram(y: List[torch.Tensor], g: List[torch.Tensor], beta: float) -> torch.Tensor:
    """y ← y − β (y − g) in place; returns the Gram of the updated y (float32, float64 for float64)."""
    if g[0].shape[0] > MAX_FUSED_K:
        ones = torch.ones(g[0].shape[0], dtype=accum_dtype(g[0].dtype), device=g[0].device)
        _track_combine(y, g, ones, beta, ones, None, 0.0, False, track=True)
        return gram(y)
    (result,) = _fused_gram_pass(_track_gram_kernel, y, g, 1, _scalar(beta, g[0]))
    # The kernel computes the full tile; mirror the upper triangle so the result is exactly symmetric.
    return torch.triu(result) + torch.triu(result, 1).T


def joint_gram(y: List[torch.Tensor], g: List[torch.Tensor]) -> torch.Tensor:
    """The [2K, 2K] Gram of the rows [y; g], in one read of y and g (K ≤ 64)."""
    if g[0].shape[0] > MAX_FUSED_K:
        yy, yg, gg = gram(y), cross_gram(y, [b.to(y[0].dtype) for b in g]), gram(g)
    else:
        yy, yg, gg = _fused_gram_pass(_joint_gram_kernel, y, g, 3)
    yy, gg = (torch.triu(m) + torch.triu(m, 1).T for m in (yy, gg))
    return torch.cat([torch.cat([yy, yg], 1), torch.cat([yg.T, gg], 1)], 0)


def _track_combine(y, g, scale, beta, weights, out, alpha, accumulate, *, track: bool) -> None:
    K, device = g[0].shape[0], g[0].device
    acc_dtype = accum_dtype(g[0].dtype)
    block_k = min(triton.next_power_of_2(K), 64 if interpreted(device) else 16)
    block_d = max(1024, (1 << 20) // block_k) if interpreted(device) else max(128, 4096 // block_k)
    scale = scale.to(acc_dtype).contiguous()
    weights = weights.to(acc_dtype).contiguous()
    beta_t, alpha_t = _scalar(beta, g[0]), _scalar(alpha, g[0])
    for j, gb in enumerate(g):
        g_rows = row_view(gb)
        y_rows = row_view(y[j]) if track else g_rows
        cols = g_rows.shape[1]
        if cols == 0:
            continue
        # Tracking alone (out is None) runs with weights 0 into a scratch output.
        target = out[j] if out is not None else torch.empty(cols, dtype=acc_dtype, device=device)
        block_cols = min(block_d, triton.next_power_of_2(cols))
        _track_combine_kernel[(triton.cdiv(cols, block_cols),)](
            g_rows, y_rows, scale, weights, target, K, cols, g_rows.stride(0), y_rows.stride(0), beta_t, alpha_t,
            TRACK=track, ACCUMULATE=accumulate, ACC_DTYPE=_acc_tl(acc_dtype), BLOCK_K=block_k, BLOCK_D=block_cols,
        )


def combine_into(g: List[torch.Tensor], weights: torch.Tensor, out: List[torch.Tensor], alpha: float,
                 accumulate: bool) -> None:
    """out_j = α Σ_k w_k g_j[k], or out_j += that with `accumulate`, in one pass."""
    _track_combine(g, g, weights, 0.0, weights, out, alpha, accumulate, track=False)


def moco_track_combine(y: List[torch.Tensor], g: List[torch.Tensor], scale: torch.Tensor, beta: float,
                       weights: torch.Tensor, out: List[torch.Tensor], alpha: float, accumulate: bool) -> None:
    """y ← y + β (s_k g_k − y) in place, then out (+)= α Σ_k w_k y_k, in one pass."""
    _track_combine(y, g, scale, beta, weights, out, alpha, accumulate, track=True)
