"""The fused passes of the multi-objective steps in Triton (the CPU/CUDA kernels are in
csrc/core/mol_*_kernels.*):

- `moco_track_gram(y, g, β)`: y ← y − β (y − g) in place and the Gram of the updated y: each
  diagonal program updates one row tile over its span of columns and multiplies it by itself; where
  K spans several of gram.py's row tiles, a second launch multiplies the updated tiles pairwise.
- `joint_gram(y, g)`: the [2K, 2K] Gram of the rows [y; g], in one read of y and g where all K rows
  fit one tile in registers (every K ≤ 64 but float64 above 16; on a GPU above 32 rows g is read
  twice), otherwise from gram.py's products.
Both walk gram.py's span tables (span_plans, span_launches, span_row): one launch covers every
block of the model, whatever their number, and one reduction (gram.reduce_partials) sums the
partials, at most one per program that fills the device plus one per block.
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
from ._launch import TL_DTYPES, interpreted, row_view
from .combine import device_scalar
from .gram import cross_gram, gram, reduce_partials, span_launches, span_plans, span_row, tiling


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
    table_ptr, partial_ptr, beta_ptr, K,
    TRACK: tl.constexpr, USE_DOT: tl.constexpr, ALIGNED: tl.constexpr, Y_DTYPE: tl.constexpr,
    Y_VECTOR: tl.constexpr, G_DTYPE: tl.constexpr, G_VECTOR: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Chunk c is row c of a span table of (y, g) blocks. With TRACK, program (i, 0, c) updates
    row tile i of y over the chunk's span in place and writes the product of the updated tile with
    itself; without, program (i, j, c) with i < j multiplies the already updated tiles i and j. Only
    the diagonal programs write y, and the off-diagonal ones run in a later launch: within one
    launch a program reading a tile could see it before or after its update."""
    tile_i = tl.program_id(0)
    if TRACK:
        tile_j = tile_i
    else:
        tile_j = tl.program_id(1)
    if not TRACK and tile_j <= tile_i:
        return
    chunk = tl.program_id(2)
    n_tiles = tl.num_programs(0)
    y_ptr, y_row_stride, g_ptr, g_row_stride, n_cols = span_row(
        table_ptr, chunk, Y_DTYPE, Y_VECTOR, G_DTYPE, G_VECTOR, ALIGNED)
    rows_i = tile_i * BLOCK_K + tl.arange(0, BLOCK_K)
    rows_j = tile_j * BLOCK_K + tl.arange(0, BLOCK_K)
    # 64-bit offsets: K rows of a billion-column buffer overflow int32.
    y_rows_i = y_ptr + rows_i.to(tl.int64)[:, None] * y_row_stride
    y_rows_j = y_ptr + rows_j.to(tl.int64)[:, None] * y_row_stride
    g_rows_i = g_ptr + rows_i.to(tl.int64)[:, None] * g_row_stride
    beta = tl.load(beta_ptr)
    acc = tl.zeros((BLOCK_K, BLOCK_K), dtype=ACC_DTYPE)
    for offset in range(0, n_cols, BLOCK_D):
        col = offset + tl.arange(0, BLOCK_D)
        in_cols = (col < n_cols)[None, :]
        mask_i = (rows_i < K)[:, None] & in_cols
        y_i = tl.load(y_rows_i + col[None, :], mask=mask_i, other=0.0).to(ACC_DTYPE)
        if TRACK:
            g_i = tl.load(g_rows_i + col[None, :], mask=mask_i, other=0.0).to(ACC_DTYPE)
            y_i = y_i - beta * (y_i - g_i)
            # The product uses the stored (rounded) value, as the Gram of y would.
            y_i = y_i.to(Y_DTYPE)
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
    table_ptr, partial_ptr, K,
    Y_PRODUCTS: tl.constexpr, G_PRODUCT: tl.constexpr, USE_DOT: tl.constexpr, ALIGNED: tl.constexpr,
    Y_DTYPE: tl.constexpr, Y_VECTOR: tl.constexpr, G_DTYPE: tl.constexpr, G_VECTOR: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Chunk c (program c) is row c of a span table of (y, g) blocks; its partial is a [2, 2] grid
    of [BLOCK_K, BLOCK_K] tiles: yy in tile (0, 0) and yg in (0, 1) (Y_PRODUCTS), gg in (1, 1)
    (G_PRODUCT). Tile (1, 0), the mirror of yg, is never written nor read."""
    chunk = tl.program_id(0)
    y_ptr, y_row_stride, g_ptr, g_row_stride, n_cols = span_row(
        table_ptr, chunk, Y_DTYPE, Y_VECTOR, G_DTYPE, G_VECTOR, ALIGNED)
    rows = tl.arange(0, BLOCK_K)
    y_rows = y_ptr + rows.to(tl.int64)[:, None] * y_row_stride
    g_rows = g_ptr + rows.to(tl.int64)[:, None] * g_row_stride
    yy = tl.zeros((BLOCK_K, BLOCK_K), dtype=ACC_DTYPE)
    yg = tl.zeros((BLOCK_K, BLOCK_K), dtype=ACC_DTYPE)
    gg = tl.zeros((BLOCK_K, BLOCK_K), dtype=ACC_DTYPE)
    for offset in range(0, n_cols, BLOCK_D):
        col = offset + tl.arange(0, BLOCK_D)
        mask = (rows < K)[:, None] & (col < n_cols)[None, :]
        g = tl.load(g_rows + col[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        if Y_PRODUCTS:
            y = tl.load(y_rows + col[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
            yy = _add_tile_product(yy, y, y, USE_DOT)
            yg = _add_tile_product(yg, y, g, USE_DOT)
        if G_PRODUCT:
            gg = _add_tile_product(gg, g, g, USE_DOT)
    tile = tl.arange(0, BLOCK_K)
    tile_size = BLOCK_K * BLOCK_K
    at = partial_ptr + chunk * (4 * tile_size) + tile[:, None] * BLOCK_K + tile[None, :]
    if Y_PRODUCTS:
        tl.store(at, yy)
        tl.store(at + tile_size, yg)
    if G_PRODUCT:
        tl.store(at + 3 * tile_size, gg)


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
    """(y_j, g_j) row views of every non-empty block, each its own segment of span_plans. Adjacent
    views are not merged, unlike gram's: a flat gradient buffer then gives bitwise the step of its
    separate blocks (the partials' spans stay per block). The span table makes one launch cover
    every block all the same, and span_plans still bounds the partials by the programs that fill
    the device plus one per block. A g block whose trailing dimensions are not contiguous is copied
    (row_view): the caller keeps the views until the kernels have read them."""
    return [(row_view(yb), row_view(gb)) for yb, gb in zip(y, g) if gb.numel() > 0]


def _type_constexprs(y: Sequence[torch.Tensor], g: Sequence[torch.Tensor]) -> dict:
    return dict(Y_DTYPE=TL_DTYPES[y[0].dtype], Y_VECTOR=16 // y[0].element_size(), G_DTYPE=TL_DTYPES[g[0].dtype],
                G_VECTOR=16 // g[0].element_size())


def moco_track_gram(y: List[torch.Tensor], g: List[torch.Tensor], beta: torch.Tensor) -> torch.Tensor:
    """y ← y − β (y − g) in place (β: a one-element tensor, read by the kernel); returns the Gram
    of the updated y (float32, float64 for float64). One launch over every block updates y and
    multiplies each row tile by itself; where K spans several tiles, a second launch multiplies the
    updated tiles pairwise (gram's tiles, so no tile outgrows the registers); one reduction."""
    K, device = g[0].shape[0], g[0].device
    acc_dtype = accum_dtype(g[0].dtype)
    # Tiles as wide as gram's for y's dtype (the accumulation dtype), which the kernel loads, stores
    # and multiplies: gram's twice wider tiles of 16-bit data spilled on sm_90 under triton 3.6
    # (32 rows, bf16).
    block_k, block_d, use_dot, num_warps = tiling(K, y[0].dtype, device)
    if not use_dot and not interpreted(device):
        # Loading g and storing y on top of gram's product spilled on sm_90 (float64, 16 rows).
        block_d //= 2
    n_tiles = triton.cdiv(K, block_k)
    plans = span_plans(_block_pairs(y, g), block_d, n_tiles * (n_tiles + 1) // 2, device)
    launches = span_launches(plans, y[0].element_size(), g[0].element_size(), device)
    partials = torch.empty((sum(plan[-1] for plan in plans), n_tiles, n_tiles, block_k, block_k),
                           dtype=acc_dtype, device=device)
    beta_t = device_scalar(beta, g[0])
    for track in (True, False) if n_tiles > 1 else (True,):
        for launch in launches:
            _track_gram_kernel[(n_tiles, 1 if track else n_tiles, launch.chunks)](
                launch.table, partials[launch.first_partial:], beta_t, K,
                TRACK=track, USE_DOT=use_dot, ALIGNED=launch.aligned, **_type_constexprs(y, g),
                ACC_DTYPE=_acc_tl(acc_dtype), BLOCK_K=block_k, BLOCK_D=launch.block_d, num_warps=num_warps,
            )
    return reduce_partials(partials, K, symmetric=True)


def _fused_joint_gram(y: Sequence[torch.Tensor], g: Sequence[torch.Tensor], block_k: int, block_d: int,
                      use_dot: bool, num_warps: int, split: bool) -> torch.Tensor:
    """The joint Gram in one read of y and g (with `split`, g is read again for gg), all K rows in
    one tile, one launch over every block per read; one reduction, which mirrors yy's and gg's
    upper triangles and yg, so the result is exactly symmetric."""
    K, device = g[0].shape[0], g[0].device
    acc_dtype = accum_dtype(g[0].dtype)
    plans = span_plans(_block_pairs(y, g), block_d, 1, device)
    launches = span_launches(plans, y[0].element_size(), g[0].element_size(), device)
    partials = torch.empty((sum(plan[-1] for plan in plans), 2, 2, block_k, block_k), dtype=acc_dtype, device=device)
    # (Y_PRODUCTS, G_PRODUCT) of each read.
    passes = ((True, False), (False, True)) if split else ((True, True),)
    for y_products, g_product in passes:
        for launch in launches:
            _joint_gram_kernel[(launch.chunks,)](
                launch.table, partials[launch.first_partial:], K,
                Y_PRODUCTS=y_products, G_PRODUCT=g_product, USE_DOT=use_dot, ALIGNED=launch.aligned,
                **_type_constexprs(y, g), ACC_DTYPE=_acc_tl(acc_dtype), BLOCK_K=block_k, BLOCK_D=launch.block_d,
                num_warps=num_warps,
            )
    return reduce_partials(partials, 2 * K, symmetric=True, rows_per_tile=K)


def joint_gram(y: List[torch.Tensor], g: List[torch.Tensor]) -> torch.Tensor:
    """The [2K, 2K] Gram of the rows [y; g]: in one read of y and g where all K rows fit one tile,
    otherwise (float64 above 16 rows) as gram(y), cross_gram(y, g) and gram(g)."""
    fused = joint_tiling(g[0].shape[0], g[0].dtype, g[0].device)
    if fused is not None:
        return _fused_joint_gram(y, g, *fused)
    yy, yg, gg = gram(y), cross_gram(y, [b.to(y[0].dtype) for b in g]), gram(g)
    return torch.cat([torch.cat([yy, yg], 1), torch.cat([yg.T, gg], 1)], 0)
