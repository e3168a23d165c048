"""Combined directions: out_j (+)= α Σ_k w_k r_j[k] for every block j of a stack, in one launch.

r is the gradient stack g itself (`combine`, `combine_into`), or MoCo's tracking state y updated in
place as y ← y + β (s_k g_k − y) (`moco_track_combine`, whose update is fused into the same pass).

One launch covers every block, however many there are: a tile table (one int64 row per program:
the block's addresses, row strides, column count and the program's first column) tells each program
where its BLOCK_D columns are (_launch.cached_table keeps it for the next call with the same
blocks). A model of a few hundred parameter tensors then costs one launch, not one per tensor. Each
program walks down its K rows BLOCK_K at a time, so every input element is read once and every
output element written once, in a fixed summation order.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from .._stack import accum_dtype
from ._launch import TL_DTYPES, cached_table, interpreted, row_view, scalar_argument

_FIELDS = 7  # g address, g row stride, y address, y row stride, out address, columns, first column


# K only bounds the rows (never the vectorised column axis): one variant for every K of a tile size.
@triton.jit(do_not_specialize=["K"])
def _table_combine_kernel(
    table_ptr, scale_ptr, weights_ptr, beta_ptr, alpha_ptr, K,
    TRACK: tl.constexpr, ACCUMULATE: tl.constexpr, ALIGNED: tl.constexpr, G_DTYPE: tl.constexpr,
    G_VECTOR: tl.constexpr, Y_DTYPE: tl.constexpr, Y_VECTOR: tl.constexpr, OUT_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = table_ptr + tl.program_id(0).to(tl.int64) * 7
    g_ptr = tl.load(row).to(tl.pointer_type(G_DTYPE), bitcast=True)
    g_row_stride = tl.load(row + 1)
    y_ptr = tl.load(row + 2).to(tl.pointer_type(Y_DTYPE), bitcast=True)
    y_row_stride = tl.load(row + 3)
    out_ptr = tl.load(row + 4).to(tl.pointer_type(OUT_DTYPE), bitcast=True)
    cols = tl.load(row + 5)
    col = tl.load(row + 6) + tl.arange(0, BLOCK_D)
    if ALIGNED:
        # Every base address and row stride of the table is a multiple of 16 bytes (checked on the
        # host), so the compiler may use 16-byte vector loads and stores.
        g_ptr = tl.multiple_of(g_ptr, 16)
        y_ptr = tl.multiple_of(y_ptr, 16)
        out_ptr = tl.multiple_of(out_ptr, 16)
        g_row_stride = tl.multiple_of(g_row_stride, G_VECTOR)  # elements per 16 bytes
        y_row_stride = tl.multiple_of(y_row_stride, Y_VECTOR)
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
            tl.store(y_at, r.to(Y_DTYPE), mask=mask)
        acc += tl.sum(r * w[:, None], axis=0)
    value = alpha * acc
    if ACCUMULATE:
        value += tl.load(out_ptr + col, mask=in_cols, other=0.0).to(ACC_DTYPE)
    tl.store(out_ptr + col, value.to(OUT_DTYPE), mask=in_cols)


def _tile_table(rows: List[tuple], block_d: int, device: torch.device) -> torch.Tensor:
    """[programs, 7] int64 on `device`: each block's row repeated for each of its BLOCK_D-column
    tiles, with the tile's first column appended."""

    def build() -> torch.Tensor:
        blocks = torch.tensor(rows, dtype=torch.int64)
        tiles = (blocks[:, 5] + block_d - 1) // block_d
        block_of_tile = torch.repeat_interleave(torch.arange(len(rows)), tiles)
        first_tile = torch.cumsum(tiles, 0) - tiles
        first_col = (torch.arange(int(tiles.sum())) - first_tile[block_of_tile]) * block_d
        return torch.cat([blocks[block_of_tile, :6], first_col[:, None]], 1)

    return cached_table(("combine", tuple(rows), block_d), build, device)


def _aligned(tensor: torch.Tensor, row_stride: int) -> bool:
    return tensor.data_ptr() % 16 == 0 and (row_stride * tensor.element_size()) % 16 == 0


def device_scalar(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A rate computed on the device (a one-element tensor) in the accumulation dtype, for the kernel
    to load: it is never read on the host, so a graph replay uses each step's value."""
    if value.numel() != 1:
        raise ValueError(f"beta: expected a tensor with one element, got shape {tuple(value.shape)}")
    if value.device != like.device:
        raise ValueError(f"beta: on {value.device}, g on {like.device}")
    return value.to(accum_dtype(like.dtype)).reshape(1).contiguous()


def run_combine(g: List[torch.Tensor], weights: torch.Tensor, out: List[torch.Tensor], alpha: float,
                accumulate: bool, y: Optional[List[torch.Tensor]] = None, scale: Optional[torch.Tensor] = None,
                beta: Optional[torch.Tensor] = None) -> None:
    """out_j (+)= α Σ_k w_k r_j[k], r = g, or r = y tracked toward s_k g_k (when y is given), in one
    launch over every non-empty block."""
    K, device = g[0].shape[0], g[0].device
    acc_dtype = accum_dtype(g[0].dtype)
    track = y is not None
    rows, aligned, widest = [], True, 0
    # row_view copies a block whose trailing dimensions are not contiguous: the copies must live
    # until the kernel has read them (to the end of this function), since the table holds only
    # their addresses. y's views are the tracking state's own rows, never copies.
    views = []
    for j, gb in enumerate(g):
        g_rows = row_view(gb)
        cols = g_rows.shape[1]
        if cols == 0:
            continue
        y_rows = row_view(y[j]) if track else g_rows
        views.append((g_rows, y_rows))
        rows.append((g_rows.data_ptr(), g_rows.stride(0), y_rows.data_ptr(), y_rows.stride(0), out[j].data_ptr(),
                     cols))
        aligned = aligned and _aligned(g_rows, g_rows.stride(0)) and _aligned(y_rows, y_rows.stride(0)) \
            and out[j].data_ptr() % 16 == 0
        widest = max(widest, cols)
    if not rows:
        return
    block_k = min(triton.next_power_of_2(K), 64 if interpreted(device) else 16)
    if interpreted(device):
        # The interpreter pays per element of a tile: long tiles, but no longer than the widest block.
        block_d = min(max(1024, (1 << 20) // block_k), max(16, triton.next_power_of_2(widest)))
    else:
        # A [BLOCK_K, BLOCK_D] tile of 2K elements (1K in float64): with y, g and the stored update
        # live at once, 4K spilled on sm_90 at BLOCK_K = 1, and 2K of float64 at BLOCK_K = 8 (the
        # column split does not change any sum).
        block_d = max(128, (1024 if acc_dtype == torch.float64 else 2048) // block_k)
    # Chosen by benchmarks/gpu_preflight.py, not by register pressure: ptxas on sm_90 put a few bytes
    # on the stack at 4 warps for fp16, BLOCK_K = 2 and at 8 warps for fp64, BLOCK_K = 16.
    num_warps = 8 if block_k <= 8 else 4
    table = _tile_table(rows, block_d, device)
    weights = weights.to(acc_dtype).contiguous()
    alpha_t = scalar_argument(alpha, g[0])
    scale = scale.to(acc_dtype).contiguous() if track else weights  # unread without tracking
    beta_t = device_scalar(beta, g[0]) if track else alpha_t
    y_dtype = (y if track else g)[0].dtype
    _table_combine_kernel[(table.shape[0],)](
        table, scale, weights, beta_t, alpha_t, K,
        TRACK=track, ACCUMULATE=accumulate, ALIGNED=aligned and not interpreted(device),
        G_DTYPE=TL_DTYPES[g[0].dtype], G_VECTOR=16 // g[0].element_size(), Y_DTYPE=TL_DTYPES[y_dtype],
        Y_VECTOR=16 // y_dtype.itemsize, OUT_DTYPE=TL_DTYPES[out[0].dtype], ACC_DTYPE=TL_DTYPES[acc_dtype], BLOCK_K=block_k, BLOCK_D=block_d,
        num_warps=num_warps,
    )


def combine(g: List[torch.Tensor], weights: torch.Tensor) -> List[torch.Tensor]:
    """[Σ_k w_k block[k] for each block], in the blocks' dtype, accumulated in float32 (float64 for
    float64 blocks)."""
    outputs = [torch.empty(block.shape[1:], dtype=block.dtype, device=block.device) for block in g]
    run_combine(g, weights, outputs, 1.0, False)
    return outputs


def combine_into(g: List[torch.Tensor], weights: torch.Tensor, out: List[torch.Tensor], alpha: float,
                 accumulate: bool) -> None:
    """out_j = α Σ_k w_k g_j[k], or out_j += that with `accumulate`, in one pass."""
    run_combine(g, weights, out, alpha, accumulate)


def moco_track_combine(y: List[torch.Tensor], g: List[torch.Tensor], scale: torch.Tensor, beta: torch.Tensor,
                       weights: torch.Tensor, out: List[torch.Tensor], alpha: float, accumulate: bool) -> None:
    """y ← y + β (s_k g_k − y) in place, then out (+)= α Σ_k w_k y_k, in one pass."""
    run_combine(g, weights, out, alpha, accumulate, y=y, scale=scale, beta=beta)
