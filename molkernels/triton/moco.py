"""The fused passes of the multi-objective steps in Triton (the CPU/CUDA kernels are in
csrc/core/mol_*_kernels.*):

- `moco_track_gram(y, g, β)`: y ← y − β (y − g) in place and the Gram of the updated y: each
  diagonal program updates one row tile over its span of columns and multiplies it by itself; where
  K spans several of gram.py's row tiles, a second launch multiplies the updated tiles pairwise.
- `joint_gram(y, g)`: the [2K, 2K] Gram of the rows [y; g], in one read of y and g where all K rows
  fit one tile in registers (every K ≤ 64 but float64 above 16; on a GPU above 32 rows g is read
  twice), otherwise from gram.py's products.
MoCo's second pass, `moco_track_combine`, is combine.py's one-launch combination with the tracking
update fused in.

Tiles follow gram.py's `tiling`, sized so that sm_90 keeps them in registers (benchmarks/gpu_preflight.py
checks every configuration for spills).
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import triton
import triton.language as tl

from .._stack import accum_dtype
from ._launch import interpreted, row_view
from .combine import device_scalar
from .gram import cross_gram, gram, reduce_partials, span_plans, tiling


def _acc_tl(dtype: torch.dtype):
    return tl.float64 if accum_dtype(dtype) == torch.float64 else tl.float32


@triton.jit
def _add_tile_product(acc, a, b, USE_DOT: tl.constexpr):
    """acc + a bᵀ. tl.dot accumulates into acc itself: no product tile is live beside the
    accumulators (the joint Gram holds three)."""
    # if/else, not an early return: the compiler would also build the broadcast product after a
    # constexpr branch's return (see federated._sqrt).
    if USE_DOT:
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")  # fp32 products, never TF32
    else:
        acc += tl.sum(a[:, None, :] * b[None, :, :], axis=2)
    return acc


# K only bounds the rows (never the vectorised column axis): one variant for every K of a tile size.
@triton.jit(do_not_specialize=["K"])
def _track_gram_kernel(
    y_ptr, g_ptr, partial_ptr, K, cols, y_row_stride, g_row_stride, span, beta_ptr,
    TRACK: tl.constexpr, USE_DOT: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """With TRACK, program (i, 0, c) updates row tile i of y over span c in place and writes the
    product of the updated tile with itself; without, program (i, j, c) with i < j multiplies the
    already updated tiles i and j. Only the diagonal programs write y, and the off-diagonal ones run
    in a later launch: within one launch a program reading a tile could see it before or after its
    update."""
    tile_i = tl.program_id(0)
    if TRACK:
        tile_j = tile_i
    else:
        tile_j = tl.program_id(1)
    if not TRACK and tile_j <= tile_i:
        return
    chunk = tl.program_id(2)
    n_tiles = tl.num_programs(0)
    rows_i = tile_i * BLOCK_K + tl.arange(0, BLOCK_K)
    rows_j = tile_j * BLOCK_K + tl.arange(0, BLOCK_K)
    y_rows_i = y_ptr + rows_i.to(tl.int64)[:, None] * y_row_stride
    y_rows_j = y_ptr + rows_j.to(tl.int64)[:, None] * y_row_stride
    g_rows_i = g_ptr + rows_i.to(tl.int64)[:, None] * g_row_stride
    beta = tl.load(beta_ptr)
    acc = tl.zeros((BLOCK_K, BLOCK_K), dtype=ACC_DTYPE)
    for offset in range(0, span, BLOCK_D):
        col = chunk.to(tl.int64) * span + offset + tl.arange(0, BLOCK_D)
        in_cols = (col < cols)[None, :]
        mask_i = (rows_i < K)[:, None] & in_cols
        y_i = tl.load(y_rows_i + col[None, :], mask=mask_i, other=0.0).to(ACC_DTYPE)
        if TRACK:
            g_i = tl.load(g_rows_i + col[None, :], mask=mask_i, other=0.0).to(ACC_DTYPE)
            y_i = y_i - beta * (y_i - g_i)
            # The product uses the stored (rounded) value, as the Gram of y would.
            y_i = y_i.to(y_ptr.dtype.element_ty)
            tl.store(y_rows_i + col[None, :], y_i, mask=mask_i)
            y_i = y_i.to(ACC_DTYPE)
            acc = _add_tile_product(acc, y_i, y_i, USE_DOT)
        else:
            y_j = tl.load(y_rows_j + col[None, :], mask=(rows_j < K)[:, None] & in_cols, other=0.0).to(ACC_DTYPE)
            acc = _add_tile_product(acc, y_i, y_j, USE_DOT)
    tile = tl.arange(0, BLOCK_K)
    out = partial_ptr + ((chunk * n_tiles + tile_i) * n_tiles + tile_j) * (BLOCK_K * BLOCK_K)
    tl.store(out + tile[:, None] * BLOCK_K + tile[None, :], acc)


# K only bounds the rows (never the vectorised column axis): one variant for every K of a tile size.
@triton.jit(do_not_specialize=["K"])
def _joint_gram_kernel(
    y_ptr, g_ptr, yy_ptr, yg_ptr, gg_ptr, K, cols, y_row_stride, g_row_stride, span,
    Y_PRODUCTS: tl.constexpr, G_PRODUCT: tl.constexpr, USE_DOT: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program c writes its span's partials of yy and yg (Y_PRODUCTS) and of gg (G_PRODUCT)."""
    chunk = tl.program_id(0)
    rows = tl.arange(0, BLOCK_K)
    yy = tl.zeros((BLOCK_K, BLOCK_K), dtype=ACC_DTYPE)
    yg = tl.zeros((BLOCK_K, BLOCK_K), dtype=ACC_DTYPE)
    gg = tl.zeros((BLOCK_K, BLOCK_K), dtype=ACC_DTYPE)
    for offset in range(0, span, BLOCK_D):
        col = chunk.to(tl.int64) * span + offset + tl.arange(0, BLOCK_D)
        mask = (rows < K)[:, None] & (col < cols)[None, :]
        g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * g_row_stride + col[None, :], mask=mask, other=0.0)
        g = g.to(ACC_DTYPE)
        if Y_PRODUCTS:
            y = tl.load(y_ptr + rows.to(tl.int64)[:, None] * y_row_stride + col[None, :], mask=mask, other=0.0)
            y = y.to(ACC_DTYPE)
            yy = _add_tile_product(yy, y, y, USE_DOT)
            yg = _add_tile_product(yg, y, g, USE_DOT)
        if G_PRODUCT:
            gg = _add_tile_product(gg, g, g, USE_DOT)
    tile = tl.arange(0, BLOCK_K)
    at = chunk * (BLOCK_K * BLOCK_K) + tile[:, None] * BLOCK_K + tile[None, :]
    if Y_PRODUCTS:
        tl.store(yy_ptr + at, yy)
        tl.store(yg_ptr + at, yg)
    if G_PRODUCT:
        tl.store(gg_ptr + at, gg)


def joint_tiling(K: int, dtype: torch.dtype, device: torch.device):
    """(BLOCK_K, BLOCK_D, USE_DOT, num_warps, split) of the joint Gram kernel, or None where one tile
    of all K rows does not fit in registers (float64 above gram's BLOCK_K). With three
    [BLOCK_K, BLOCK_K] accumulators gram's tiles spilled on sm_90 (benchmarks/gpu_preflight.py):
    tl.dot tiles get 8 warps, float64 broadcast tiles of 8 rows and more half gram's column step,
    and above 32 rows (64 × 64 accumulators) the products are `split` over two launches, yy and yg
    in one, gg in the other: g is read twice, y once."""
    block_k, block_d, use_dot, num_warps = tiling(K, dtype, device)
    if block_k < K:
        return None
    if interpreted(device):
        return block_k, block_d, use_dot, num_warps, False
    if use_dot:
        if block_k > 32:
            return block_k, max(16, block_d // 2), use_dot, 8, True
        return block_k, block_d, use_dot, 8, False
    if dtype == torch.float64 and block_k >= 8:
        return block_k, block_d // 2, use_dot, num_warps, False
    return block_k, block_d, use_dot, num_warps, False


def _block_pairs(y: Sequence[torch.Tensor], g: Sequence[torch.Tensor]):
    """(y_j, g_j) row views of every non-empty block. Adjacent views are not merged, unlike gram's:
    a flat gradient buffer then gives bitwise the step of its separate blocks (the partials' spans
    stay per block)."""
    return [(row_view(yb), row_view(gb)) for yb, gb in zip(y, g) if gb.numel() > 0]


def moco_track_gram(y: List[torch.Tensor], g: List[torch.Tensor], beta: torch.Tensor) -> torch.Tensor:
    """y ← y − β (y − g) in place (β: a one-element tensor, read by the kernel); returns the Gram of the updated y (float32, float64 for float64).
    One launch updates y and multiplies each row tile by itself; where K spans several tiles, a
    second launch multiplies the updated tiles pairwise (gram's tiles, so no tile outgrows the
    registers)."""
    K, device = g[0].shape[0], g[0].device
    acc_dtype = accum_dtype(g[0].dtype)
    block_k, block_d, use_dot, num_warps = tiling(K, g[0].dtype, device)
    if not use_dot and not interpreted(device):
        # Loading g and storing y on top of gram's product spilled on sm_90 (float64, 16 rows).
        block_d //= 2
    n_tiles = triton.cdiv(K, block_k)
    plans = span_plans(_block_pairs(y, g), block_d, n_tiles * (n_tiles + 1) // 2, device)
    partials = torch.empty((sum(plan[-1] for plan in plans), n_tiles, n_tiles, block_k, block_k),
                           dtype=acc_dtype, device=device)
    beta_t = device_scalar(beta, g[0])
    for track, tile_columns in ((True, 1), (False, n_tiles)):
        if not track and n_tiles == 1:
            break
        first = 0
        for (y_rows, g_rows), cols, block_cols, span, chunks in plans:
            _track_gram_kernel[(n_tiles, tile_columns, chunks)](
                y_rows, g_rows, partials[first:], K, cols, y_rows.stride(0), g_rows.stride(0), span, beta_t,
                TRACK=track, USE_DOT=use_dot, ACC_DTYPE=_acc_tl(acc_dtype), BLOCK_K=block_k, BLOCK_D=block_cols,
                num_warps=num_warps,
            )
            first += chunks
    return reduce_partials(partials, K, symmetric=True)


def _fused_joint_gram(y: Sequence[torch.Tensor], g: Sequence[torch.Tensor], block_k: int, block_d: int,
                      use_dot: bool, num_warps: int, split: bool):
    """yy, yg, gg of the joint Gram in one read of y and g (with `split`, g is read again for gg),
    all K rows in one tile; each reduced in a fixed order from per-program partials."""
    K, device = g[0].shape[0], g[0].device
    acc_dtype = accum_dtype(g[0].dtype)
    plans = span_plans(_block_pairs(y, g), block_d, 1, device)
    n_partials = max(1, sum(plan[-1] for plan in plans))
    partials = [torch.zeros((n_partials, block_k, block_k), dtype=acc_dtype, device=device) for _ in range(3)]
    # (Y_PRODUCTS, G_PRODUCT) of each launch over the blocks.
    passes = ((True, False), (False, True)) if split else ((True, True),)
    for y_products, g_product in passes:
        first = 0
        for (y_rows, g_rows), cols, block_cols, span, chunks in plans:
            _joint_gram_kernel[(chunks,)](
                y_rows, g_rows, *(p[first:] for p in partials), K, cols, y_rows.stride(0), g_rows.stride(0), span,
                Y_PRODUCTS=y_products, G_PRODUCT=g_product, USE_DOT=use_dot, ACC_DTYPE=_acc_tl(acc_dtype),
                BLOCK_K=block_k, BLOCK_D=block_cols, num_warps=num_warps,
            )
            first += chunks
    return [p.sum(0)[:K, :K] for p in partials]


def joint_gram(y: List[torch.Tensor], g: List[torch.Tensor]) -> torch.Tensor:
    """The [2K, 2K] Gram of the rows [y; g]: in one read of y and g where all K rows fit one tile,
    otherwise (float64 above 16 rows) as gram(y), cross_gram(y, g) and gram(g)."""
    fused = joint_tiling(g[0].shape[0], g[0].dtype, g[0].device)
    if fused is None:
        yy, yg, gg = gram(y), cross_gram(y, [b.to(y[0].dtype) for b in g]), gram(g)
    else:
        yy, yg, gg = _fused_joint_gram(y, g, *fused)
        # The kernel computes full tiles; mirror the upper triangles so yy and gg are exactly symmetric.
        yy, gg = (torch.triu(m) + torch.triu(m, 1).T for m in (yy, gg))
    return torch.cat([torch.cat([yy, yg], 1), torch.cat([yg.T, gg], 1)], 0)
