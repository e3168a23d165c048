"""Gram matrices of gradient stacks: gram(g) = Σ_blocks B Bᵀ and cross_gram(a, b) = Σ_blocks A Bᵀ.

Two kernels, so that the result is deterministic without atomics:
1. `_partial_products_kernel`: program (i, j, c) multiplies row tile i of A by row tile j of B over
   span c of the columns (row c of a table of block addresses, strides and column ranges) and
   writes the [BLOCK_K, BLOCK_K] partial product to a workspace.
   For gram only the tiles i <= j run.
2. `_reduce_partials_kernel`: sums the partials of every output element in a fixed order (several
   partials per load step) and writes the [K, K] result; for gram element (i, j) reads the upper-triangle entry (min, max), so
   the result is exactly symmetric.
Every run of adjacent block views (see _launch.merged_segments) is a segment; one launch of the first
kernel covers all segments (a span table: one row per chunk of columns, read by span_row), and one
reduction sums their partials. moco.py's passes walk the same tables and share the reduction.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from .._stack import accum_dtype
from ._launch import TL_DTYPES, cached_table, interpreted, merged_segments, programs_to_fill


@triton.jit
def span_row(table_ptr, chunk, A_DTYPE: tl.constexpr, A_VECTOR: tl.constexpr, B_DTYPE: tl.constexpr,
             B_VECTOR: tl.constexpr, ALIGNED: tl.constexpr):
    """Row `chunk` of a span table (see span_launches): the typed addresses of A's and B's first
    column of the chunk, their row strides, and how many columns the chunk has (its span, or fewer
    at the block's end). Only these stay live through a kernel's column loop: with the block's
    columns and the chunk's first column as well (64-bit each), a 64-row tile of 16-bit data
    spilled on sm_90."""
    row = table_ptr + chunk.to(tl.int64) * 7
    first_col = tl.load(row + 5)
    a_ptr = tl.load(row).to(tl.pointer_type(A_DTYPE), bitcast=True) + first_col
    a_row_stride = tl.load(row + 1)
    b_ptr = tl.load(row + 2).to(tl.pointer_type(B_DTYPE), bitcast=True) + first_col
    b_row_stride = tl.load(row + 3)
    n_cols = tl.minimum(tl.load(row + 6), tl.load(row + 4) - first_col)
    if ALIGNED:
        # Every address, row stride and first column of the table is a multiple of 16 bytes
        # (checked on the host): 16-byte vector loads.
        a_ptr = tl.multiple_of(a_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
        a_row_stride = tl.multiple_of(a_row_stride, A_VECTOR)
        b_row_stride = tl.multiple_of(b_row_stride, B_VECTOR)
    return a_ptr, a_row_stride, b_ptr, b_row_stride, n_cols


# K only bounds the rows (never the vectorised column axis): one variant for every K of a tile size.
@triton.jit(do_not_specialize=["K"])
def _partial_products_kernel(
    table_ptr, partial_ptr, K,
    SYMMETRIC: tl.constexpr, ONE_TILE: tl.constexpr, USE_DOT: tl.constexpr, DOT_UPCAST: tl.constexpr,
    ALIGNED: tl.constexpr, DTYPE: tl.constexpr, VECTOR: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile_i = tl.program_id(0)
    tile_j = tl.program_id(1)
    chunk = tl.program_id(2)
    if SYMMETRIC and tile_j < tile_i:
        return  # the lower triangle is the mirror of the upper one
    n_tiles = tl.num_programs(0)
    a_ptr, a_row_stride, b_ptr, b_row_stride, n_cols = span_row(table_ptr, chunk, DTYPE, VECTOR, DTYPE, VECTOR, ALIGNED)
    rows_i = tile_i * BLOCK_K + tl.arange(0, BLOCK_K)
    rows_j = tile_j * BLOCK_K + tl.arange(0, BLOCK_K)
    # 64-bit offsets: K rows of a billion-column buffer overflow int32.
    a_rows = a_ptr + rows_i.to(tl.int64)[:, None] * a_row_stride
    b_rows = b_ptr + rows_j.to(tl.int64)[:, None] * b_row_stride
    # A diagonal tile of gram reads its rows once. With one tile (every K up to the tile size) that
    # is known at compile time, so the loop holds no branch and its loads pipeline.
    diagonal = ONE_TILE or (SYMMETRIC and tile_i == tile_j)
    if USE_DOT:
        acc = tl.zeros((BLOCK_K, BLOCK_K), dtype=ACC_DTYPE)
    else:
        # Small tiles and float64 accumulate elementwise products and reduce across the columns
        # once, after the loop, instead of a cross-thread sum every step.
        acc_wide = tl.zeros((BLOCK_K, BLOCK_K, BLOCK_D), dtype=ACC_DTYPE)
    for offset in range(0, n_cols, BLOCK_D):
        col = offset + tl.arange(0, BLOCK_D)
        in_cols = col < n_cols
        # 16-bit data reaches tl.dot as it is stored: its products are exact in the fp32 accumulator.
        # The interpreter has no bfloat16 matmul (numpy lacks the type), so there it is upcast
        # first: the same exact products.
        a = tl.load(a_rows + col[None, :], mask=(rows_i < K)[:, None] & in_cols[None, :], other=0.0)
        if diagonal:
            b = a
        else:
            b = tl.load(b_rows + col[None, :], mask=(rows_j < K)[:, None] & in_cols[None, :], other=0.0)
        if DOT_UPCAST:
            a = a.to(ACC_DTYPE)
            b = b.to(ACC_DTYPE)
        if USE_DOT:
            if a.dtype == tl.float32:
                # "ieee": fp32 products, never TF32.
                acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
            else:
                acc = tl.dot(a, tl.trans(b), acc)
        else:
            acc_wide += a.to(ACC_DTYPE)[:, None, :] * b.to(ACC_DTYPE)[None, :, :]
    if not USE_DOT:
        acc = tl.sum(acc_wide, axis=2)
    tile = tl.arange(0, BLOCK_K)
    out = partial_ptr + ((chunk * n_tiles + tile_i) * n_tiles + tile_j) * (BLOCK_K * BLOCK_K)
    tl.store(out + tile[:, None] * BLOCK_K + tile[None, :], acc)


# The counts only bound loops and index tiles: no variant per model size.
@triton.jit(do_not_specialize=["K", "n_partials", "n_tiles", "rows_per_tile"])
def _reduce_partials_kernel(
    partial_ptr, out_ptr, K, n_partials, n_tiles, rows_per_tile,
    SYMMETRIC: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    element = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_range = element < K * K
    row = element // K
    col = element % K
    if SYMMETRIC:
        first = tl.minimum(row, col)
        second = tl.maximum(row, col)
    else:
        first = row
        second = col
    tile_size = BLOCK_K * BLOCK_K
    # Output row r is row r % rows_per_tile of tile r // rows_per_tile.
    offsets = (((first // rows_per_tile) * n_tiles + second // rows_per_tile) * tile_size
               + (first % rows_per_tile) * BLOCK_K + second % rows_per_tile)
    # One partial is a whole [n_tiles, n_tiles] grid of tiles (64-bit strides: a long run of
    # partials overflows int32). Each step loads BLOCK_P partials at once, so that many loads are
    # in flight; the sum over them comes once, at the end, in a fixed order.
    partial_size = (n_tiles * n_tiles * tile_size).to(tl.int64)
    parts = tl.arange(0, BLOCK_P)
    at = partial_ptr + parts.to(tl.int64)[:, None] * partial_size + offsets[None, :]
    acc = tl.zeros((BLOCK_P, BLOCK), dtype=ACC_DTYPE)
    for first_part in range(0, n_partials, BLOCK_P):
        acc += tl.load(at, mask=((first_part + parts) < n_partials)[:, None] & in_range[None, :], other=0.0)
        at += BLOCK_P * partial_size
    tl.store(out_ptr + element, tl.sum(acc, axis=0), mask=in_range)


# On a GPU a program's span covers at least this many columns, so that writing and reducing its
# [BLOCK_K, BLOCK_K] fp32 partial costs little next to reading the columns (for K = 64: 16 KiB of
# partial per 512 KiB read). The interpreter, which runs programs one after another, splits freely:
# that exercises the reduction.
MIN_SPAN = 2048


def tiling(K: int, dtype: torch.dtype, device: torch.device):
    """(BLOCK_K, BLOCK_D, USE_DOT, num_warps). tl.dot needs tiles of at least 16 rows and does not
    take float64 everywhere; smaller K and float64 use a broadcast product reduced by tl.sum, whose
    [BLOCK_K, BLOCK_K, BLOCK_D] temporary bounds BLOCK_D. On a GPU the sizes keep sm_90 free of
    register spills (ptxas -v): an fp32 "ieee" tl.dot runs on FMA units and holds both operand
    tiles in registers, so each row contributes 64 bytes per step for 32 and 64 rows, 128 for 16."""
    use_dot = dtype != torch.float64 and K > 8
    if interpreted(device):
        if use_dot:
            return min(max(triton.next_power_of_2(K), 16), 64), 8192, True, 4
        block_k = min(triton.next_power_of_2(K), 64)
        return block_k, min(max((1 << 20) // (block_k * block_k), 64), 8192), False, 4
    if use_dot:
        block_k = min(max(triton.next_power_of_2(K), 16), 64)
        row_bytes = 128 if block_k == 16 else 64
        return block_k, row_bytes // dtype.itemsize, True, (8 if block_k == 64 else 4)
    block_k = min(triton.next_power_of_2(K), 16 if dtype == torch.float64 else 8)
    # At most 512 columns: at 1024 (BLOCK_K = 2, fp16) triton 3.6 put 4 bytes on the stack.
    return block_k, min(max(8192 // (block_k * block_k), 32), 512), False, 4


def span_plans(segments, block_d: int, tile_programs: int, device: torch.device):
    """(views, cols, BLOCK_D, span, chunks) per segment: its columns split into spans. The programs
    that fill the device (over `tile_programs` tiles per span) are shared among the segments in
    proportion to their columns, so the partials workspace is bounded by that count plus one per
    segment, not by the number of segments times it. In the interpreter a narrow segment gets
    narrower tiles (it pays per element of a tile); a GPU keeps one BLOCK_D, so that odd widths do
    not each compile a variant (a masked tile costs a narrow segment little)."""
    min_span = 1 if interpreted(device) else MIN_SPAN
    budget = max(1, programs_to_fill(device) // tile_programs)
    total = max(1, sum(views[0].shape[1] for views in segments))
    plans = []
    for views in segments:
        cols = views[0].shape[1]
        segment_block_d = min(block_d, max(16, triton.next_power_of_2(cols))) if interpreted(device) else block_d
        share = max(1, budget * cols // total)
        chunks = max(1, min(share, triton.cdiv(cols, max(min_span, segment_block_d))))
        span = triton.cdiv(triton.cdiv(cols, chunks), segment_block_d) * segment_block_d
        plans.append((views, cols, segment_block_d, span, triton.cdiv(cols, span)))
    return plans


class SpanLaunch(NamedTuple):
    """One launch over the chunks of a span table: their tile width, the int64 table on the device
    (one row per chunk: A's address and row stride, B's, the block's columns, the chunk's first
    column and span; read by span_row), whether every row is 16-byte aligned, and where the
    launch's partials start in the workspace."""

    block_d: int
    table: torch.Tensor
    chunks: int
    aligned: bool
    first_partial: int


def span_launches(plans, a_item: int, b_item: int, device: torch.device) -> List[SpanLaunch]:
    """The launches that cover span_plans' chunks: one in all on a GPU (every segment has one
    BLOCK_D), one per tile width in the interpreter. Chunk c of the whole plan writes partial c, so
    every kernel that walks the same launches fills the same workspace slots. `a_item` and
    `b_item` are the element sizes of the first and the last view of each segment."""
    rows_by_width = {}
    for views, cols, block_d, span, chunks in plans:
        a_view, b_view = views[0], views[-1]
        rows_by_width.setdefault(block_d, []).extend(
            (a_view.data_ptr(), a_view.stride(0), b_view.data_ptr(), b_view.stride(0), cols, c * span, span)
            for c in range(chunks))
    launches, first_partial = [], 0
    for block_d, rows in rows_by_width.items():
        aligned = not interpreted(device) and all(
            r[0] % 16 == 0 and r[2] % 16 == 0 and (r[1] * a_item) % 16 == 0 and (r[3] * b_item) % 16 == 0
            and (r[5] * a_item) % 16 == 0 and (r[5] * b_item) % 16 == 0 for r in rows)
        table = cached_table(("spans", tuple(rows)), lambda: torch.tensor(rows, dtype=torch.int64), device)
        launches.append(SpanLaunch(block_d, table, len(rows), aligned, first_partial))
        first_partial += len(rows)
    return launches


# Partials each program of the reduction loads per step (a [REDUCE_PARTIALS_AT_ONCE, BLOCK] tile).
REDUCE_PARTIALS_AT_ONCE = 8


def reduce_partials(partials: torch.Tensor, K: int, symmetric: bool, rows_per_tile: Optional[int] = None) -> torch.Tensor:
    """The [K, K] sum, in a fixed order, of a [n_partials, n_tiles, n_tiles, BLOCK_K, BLOCK_K]
    workspace of tile products (for `symmetric`, only the tiles i <= j are read, and of a diagonal
    tile only its upper triangle, so the result is exactly symmetric). Output row r is row
    r % rows_per_tile of tile r // rows_per_tile: BLOCK_K rows per tile by default; the joint Gram
    of [y; g] puts y's K rows in tile 0 and g's in tile 1."""
    n_partials, n_tiles, _, block_k, _ = partials.shape
    acc_tl = tl.float64 if partials.dtype == torch.float64 else tl.float32
    out = torch.empty((K, K), dtype=partials.dtype, device=partials.device)
    block = min(triton.next_power_of_2(K * K), (1 << 16) if interpreted(partials.device) else 256)
    _reduce_partials_kernel[(triton.cdiv(K * K, block),)](
        partials, out, K, n_partials, n_tiles, block_k if rows_per_tile is None else rows_per_tile,
        SYMMETRIC=symmetric, ACC_DTYPE=acc_tl, BLOCK_K=block_k, BLOCK=block, BLOCK_P=REDUCE_PARTIALS_AT_ONCE,
    )
    return out


def _products(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], symmetric: bool) -> torch.Tensor:
    K = a[0].shape[0]
    device = a[0].device
    acc_dtype = accum_dtype(a[0].dtype)
    acc_tl = tl.float64 if acc_dtype == torch.float64 else tl.float32
    block_k, block_d, use_dot, num_warps = tiling(K, a[0].dtype, device)
    n_tiles = triton.cdiv(K, block_k)
    tile_programs = n_tiles * (n_tiles + 1) // 2 if symmetric else n_tiles * n_tiles
    segments = merged_segments(a) if symmetric else merged_segments(a, b)
    plans = span_plans(segments, block_d, tile_programs, device)
    n_partials = sum(plan[-1] for plan in plans)
    partials = torch.empty((n_partials, n_tiles, n_tiles, block_k, block_k), dtype=acc_dtype, device=device)
    item = a[0].element_size()
    for launch in span_launches(plans, item, item, device):
        _partial_products_kernel[(n_tiles, n_tiles, launch.chunks)](
            launch.table, partials[launch.first_partial:], K,
            SYMMETRIC=symmetric, ONE_TILE=symmetric and n_tiles == 1, USE_DOT=use_dot,
            DOT_UPCAST=use_dot and interpreted(device) and a[0].dtype == torch.bfloat16, ALIGNED=launch.aligned,
            DTYPE=TL_DTYPES[a[0].dtype], VECTOR=16 // item, ACC_DTYPE=acc_tl,
            BLOCK_K=block_k, BLOCK_D=launch.block_d, num_warps=num_warps,
        )
    return reduce_partials(partials, K, symmetric)


def gram(g: List[torch.Tensor]) -> torch.Tensor:
    """Σ_blocks B Bᵀ, [K, K], exactly symmetric; float32 (float64 for float64 blocks)."""
    return _products(g, g, symmetric=True)


def cross_gram(a: List[torch.Tensor], b: List[torch.Tensor]) -> torch.Tensor:
    """Σ_blocks A Bᵀ over paired blocks, [K, K]; float32 (float64 for float64 blocks)."""
    return _products(a, b, symmetric=False)
