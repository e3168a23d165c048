"""Gradient stacks: a [K, *shape] tensor, or a list of per-parameter blocks [K, *shape_j].

Checks here run before any kernel and name the offending argument; they only read shapes,
dtypes and devices, so they cost no synchronisation and trace under torch.compile.
"""

from __future__ import annotations

import operator
from typing import List, Sequence, Union

import torch

from ._checks import check_dense

Stack = Union[torch.Tensor, Sequence[torch.Tensor]]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(t, name: str) -> None:
    """A dense (strided, not nested) tensor of a float dtype; else TypeError naming `name`."""
    check_dense(t, name)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {t.dtype}")


def as_blocks(g: Stack, name: str) -> List[torch.Tensor]:
    """The blocks of a gradient stack, checked: non-empty, one float dtype, one device, one K."""
    if isinstance(g, torch.Tensor):
        blocks = [g]
        labels = [name]
    elif isinstance(g, (list, tuple)):
        if len(g) == 0:
            raise ValueError(f"{name}: expected a tensor or a non-empty list of blocks, got an empty list")
        blocks = list(g)
        labels = [f"{name}[{j}]" for j in range(len(blocks))]
    else:
        raise TypeError(f"{name}: expected a tensor or a list of tensors, got {type(g).__name__}")
    for block, label in zip(blocks, labels):
        check_float_tensor(block, label)
        if block.dim() < 1 or block.shape[0] < 1:
            raise ValueError(f"{label}: expected a leading objective dimension K >= 1, got shape {tuple(block.shape)}")
    first = blocks[0]
    for block, label in zip(blocks[1:], labels[1:]):
        if block.shape[0] != first.shape[0]:
            raise ValueError(f"{label}: K = {block.shape[0]} differs from {labels[0]}'s K = {first.shape[0]}")
        if block.dtype != first.dtype:
            raise TypeError(f"{label}: dtype {block.dtype} differs from {labels[0]}'s {first.dtype}")
        if block.device != first.device:
            raise ValueError(f"{label}: on {block.device}, {labels[0]} on {first.device}")
    return blocks


def check_same_structure(a: List[torch.Tensor], b: List[torch.Tensor], name_a: str, name_b: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_b}: has {len(b)} blocks, {name_a} has {len(a)}")
    for j, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise ValueError(f"{name_b}[{j}]: shape {tuple(y.shape)} differs from {name_a}[{j}]'s {tuple(x.shape)}")
        if x.dtype != y.dtype:
            raise TypeError(f"{name_b}[{j}]: dtype {y.dtype} differs from {name_a}[{j}]'s {x.dtype}")
        if x.device != y.device:
            raise ValueError(f"{name_b}[{j}]: on {y.device}, {name_a}[{j}] on {x.device}")


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype Gram matrices are returned in: float64 for float64 data, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _integer(value, name: str) -> int:
    """`value` as an int when it is one (a Python or NumPy integer, not a bool); else TypeError."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name}: expected an int, got {value!r} ({type(value).__name__})")


def _check_shape(shape, name: str) -> torch.Size:
    """`shape` (a torch.Size, tuple or list of non-negative ints) as a torch.Size."""
    if not isinstance(shape, (tuple, list)):
        raise TypeError(f"{name}: expected a shape (a torch.Size, tuple or list of ints), got {type(shape).__name__}")
    dims = [_integer(size, f"{name}[{i}]") for i, size in enumerate(shape)]
    if any(size < 0 for size in dims):
        raise ValueError(f"{name}: sizes must be >= 0, got {tuple(dims)}")
    return torch.Size(dims)


def flat_buffer(shapes: Sequence[torch.Size], K: int, *, dtype=torch.float32, device=None):
    """One [K, D] buffer and per-parameter views [K, *shape_j] into it, so that one kernel launch
    covers a whole model while each block still reads like its parameter.

    `shapes` is a sequence of shapes (torch.Size, tuples or lists of non-negative ints), `K` an
    int >= 1 and `dtype` a float dtype; anything else raises TypeError/ValueError naming it."""
    K = _integer(K, "K")
    if K < 1:
        raise ValueError(f"K: expected at least one objective, got {K}")
    if not isinstance(shapes, (tuple, list)):
        raise TypeError(f"shapes: expected a list of shapes, got {type(shapes).__name__}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected float16, bfloat16, float32 or float64, got {dtype}")
    checked = [_check_shape(shape, f"shapes[{j}]") for j, shape in enumerate(shapes)]
    sizes = [shape.numel() for shape in checked]
    buffer = torch.empty(K, sum(sizes), dtype=dtype, device=device)
    views, offset = [], 0
    for shape, size in zip(checked, sizes):
        views.append(buffer[:, offset:offset + size].view(K, *shape))
        offset += size
    return buffer, views
