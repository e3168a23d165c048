"""What the Triton launchers share: each block of a gradient stack seen as a [K, cols] matrix of
contiguous rows, adjacent views of one buffer merged so that one launch covers them, the tables
through which one launch covers many blocks, and the number of programs that fills the device.

Block sizes differ between a GPU and Triton's CPU interpreter (TRITON_INTERPRET=1): on a GPU a tile
must fit in registers, while the interpreter pays per operation and per program, so it gets few
programs with large tiles.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from typing import Callable, Hashable, List, Sequence, Tuple

import torch
import triton.language as tl

from .._stack import accum_dtype


#: the Triton type of each storage dtype, for the constexprs of kernels that read typed pointers
#: from a table
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}


def scalar_argument(value: float, like: torch.Tensor) -> torch.Tensor:
    """A hyperparameter as a one-element tensor in `like`'s accumulation dtype: Triton would pass a
    Python float as float32, which rounds it for float64 data."""
    return torch.full((1,), value, dtype=accum_dtype(like.dtype), device=like.device)


def interpreted(device: torch.device) -> bool:
    """Whether kernels on `device` run in Triton's CPU interpreter rather than compiled on a GPU."""
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def programs_to_fill(device: torch.device) -> int:
    """How many programs keep every multiprocessor busy; a handful in the interpreter, where each
    program runs after the other."""
    if interpreted(device):
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 4 * _multiprocessors(index)


def _trailing_contiguous(block: torch.Tensor) -> bool:
    expected = 1
    for dim in range(block.dim() - 1, 0, -1):
        if block.shape[dim] != 1 and block.stride(dim) != expected:
            return False
        expected *= block.shape[dim]
    return True


def row_view(block: torch.Tensor) -> torch.Tensor:
    """The block [K, *shape] as a [K, cols] view whose rows are contiguous, with the block's row
    stride: a view of a flat [K, D] buffer stays in place; only a block whose trailing dimensions
    are not contiguous (e.g. a transposed parameter) is copied."""
    K = block.shape[0]
    if not _trailing_contiguous(block):
        block = block.contiguous()
    return block.as_strided((K, block.numel() // K), (block.stride(0), 1))


def _follows(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Whether `second` starts where the rows of `first` end, in the same buffer and with the same
    row stride, so that the two read as one [K, cols_1 + cols_2] matrix."""
    K, cols = first.shape
    return (
        first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
        and first.stride(0) == second.stride(0)
        and second.storage_offset() == first.storage_offset() + cols
        and (K == 1 or cols + second.shape[1] <= first.stride(0))
    )


def merged_segments(*stacks: Sequence[torch.Tensor]) -> List[Tuple[torch.Tensor, ...]]:
    """Row views of paired stacks (one tuple per run of blocks), each run as long as the blocks of
    every stack are adjacent views of one buffer: a model whose gradients live in one flat [K, D]
    buffer is a single segment, hence a single launch. Empty blocks are left out."""
    segments: List[Tuple[torch.Tensor, ...]] = []
    for views in zip(*([row_view(b) for b in stack] for stack in stacks)):
        if views[0].shape[1] == 0:
            continue
        if segments and all(_follows(last, view) for last, view in zip(segments[-1], views)):
            segments[-1] = tuple(
                last.as_strided((last.shape[0], last.shape[1] + view.shape[1]), (last.stride(0), 1))
                for last, view in zip(segments[-1], views)
            )
        else:
            segments.append(views)
    return segments



# Tables of block addresses, strides and widths (int64 on the device) through which one launch
# covers many blocks, by a key naming everything they hold, so equal keys give equal tables. A
# training loop reuses its gradient, tracking and output buffers, so its steps find their tables
# here, and copy nothing to the device after the first step (nor during a CUDA-graph capture after
# a warm-up step).
_TABLES: "OrderedDict[Hashable, tuple]" = OrderedDict()
_TABLES_KEPT = 32
# Tables used while a CUDA graph was being captured: every replay reads them (and re-reads the
# pinned host copy of one first copied during the capture), so they are never evicted.
_CAPTURED_TABLES: dict = {}


def cached_table(key: Hashable, build: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
    """The int64 table build() makes on the host, on `device`: built and copied on the first call
    with `key` (asynchronously, from pinned memory), then reused."""
    key = (key, device)
    entry = _TABLES.get(key)
    if entry is None:
        host = build()
        if device.type == "cuda":
            host = host.pin_memory()
            entry = (host.to(device, non_blocking=True), host)
        else:
            entry = (host, host)
        _TABLES[key] = entry
        if len(_TABLES) > _TABLES_KEPT:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        _CAPTURED_TABLES[key] = entry
    return entry[0]
