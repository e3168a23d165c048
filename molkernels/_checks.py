"""The checks every public entry point runs before it touches anything (one home for all of them).

* Arguments: numbers, integers, devices, flags, dense tensors; each error names the argument.
* Aliasing: outputs that share memory with each other or with inputs, and the version counters of
  tensors the kernels write through raw pointers.
* Checkpoints: a ``load_state_dict`` checks the whole state with these first and only then writes
  anything, so a bad state leaves the object unchanged. ``path`` names the entry as the caller wrote
  it, e.g. ``state['population']['active']`` (see :func:`state_path`).
"""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence, Tuple

import torch

Labelled = List[Tuple[str, torch.Tensor]]


# --------------------------------------------------------------------------------------------------
# Arguments


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    if low == -math.inf and high == math.inf:
        return ""
    if high == math.inf:
        return f" {'>' if low_open else '>='} {float(low)!r}"
    opening = "(" if low_open or low == -math.inf else "["
    closing = ")" if high_open else "]"
    return f" in {opening}{float(low)!r}, {float(high)!r}{closing}"


def check_number(name: str, value, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
                 high_open: bool = False) -> float:
    """`value` as a float: a real number (not a bool, a string or None), finite, in the interval
    from `low` to `high` (open at an end with low_open / high_open); ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < low or value > high or (low_open and value == low) or (high_open and value == high):
        raise ValueError(f"{name}: expected a finite number{_interval(low, high, low_open, high_open)}, got {value!r}")
    return float(value)


def check_integer(name: str, value, low: int = 0) -> int:
    """`value` as an int: an integer (not a bool, not a float such as 3.0) >= `low`; ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    return int(value)


def check_flag(name: str, value) -> bool:
    """`value` is a bool (not 0/1, not None); TypeError naming `name`."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return value


def check_device(name: str, device) -> torch.device:
    """`device` as a torch.device that exists here; ValueError naming `name`."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}: not a torch device: {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: {str(device)!r}, but no CUDA device is visible")
    return device


def check_dense(value, name: str) -> torch.Tensor:
    """`value` is a dense (strided, not nested, not sparse) tensor; TypeError naming `name`. The
    kernels read strided memory: a sparse or nested tensor would fail inside them (or in
    is_contiguous) with a message that names no argument."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if value.is_nested or value.layout != torch.strided:
        kind = "nested" if value.is_nested else value.layout
        raise TypeError(f"{name}: expected a dense (strided) tensor, got a {kind} one")
    return value


# --------------------------------------------------------------------------------------------------
# Aliasing


def labelled(tensors: Sequence[torch.Tensor], name: str) -> Labelled:
    """[(name[j], tensors[j])]: the labels check_disjoint names."""
    return [(f"{name}[{j}]", t) for j, t in enumerate(tensors)]


def check_disjoint(written: Labelled, read: Labelled = ()) -> None:
    """ValueError "B: overlaps A" when a tensor in `written` shares memory with another written one
    or with one in `read` (A comes first in written + read; reading one tensor twice is fine).

    Each tensor counts as the address range from its first to its last element on its device:
    exact for contiguous tensors (everything a kernel writes is contiguous), conservative for a
    strided one (two interleaved views count as overlapping). Sorting the ranges by address makes
    this O(n log n) in the number of tensors; it reads pointers and strides only, no data (about
    2 µs per tensor). Meta tensors hold no memory, and under torch.compile tracing there are no
    addresses (fake tensors): they are not checked."""
    if torch.compiler.is_compiling():
        return
    ranges = []
    for position, (label, t, is_written) in enumerate([(label, t, True) for label, t in written]
                                                      + [(label, t, False) for label, t in read]):
        if t.numel() == 0 or t.is_meta:
            continue
        start = t.data_ptr()
        if t.is_contiguous():
            nbytes = t.nbytes
        else:
            nbytes = (sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1) * t.itemsize
        # get_device(): -1 on the CPU, the index on an accelerator (cheaper than t.device)
        ranges.append((t.get_device(), start, position, start + nbytes, label, is_written))
    ranges.sort()
    # per (device, written?): the range seen so far that reaches furthest, as (end, position, label);
    # a later range overlaps an earlier one exactly when it starts before that one's end
    furthest = {}
    for device, start, position, end, label, is_written in ranges:
        for other_written in ((True, False) if is_written else (True,)):
            other = furthest.get((device, other_written))
            if other is not None and other[0] > start:
                (_, first), (_, second) = sorted([(position, label), (other[1], other[2])])
                raise ValueError(f"{second}: overlaps {first}")
        best = furthest.get((device, is_written))
        if best is None or end > best[0]:
            furthest[(device, is_written)] = (end, position, label)


def mark_written(tensors: Sequence[torch.Tensor]) -> None:
    """Bump the version counters of tensors the kernels wrote through raw pointers, which torch
    does not see (the compiled and Triton ops have no in-place autograd kernel): an autograd graph
    that saved one of them then raises "modified by an inplace operation" on backward. (A compiled
    graph writes its mutated inputs back with copy_, which bumps them itself.)"""
    if not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(list(tensors))


# --------------------------------------------------------------------------------------------------
# Checkpoints


def state_path(path: str, key) -> str:
    return f"{path}[{key!r}]"


def check_state_keys(state, path: str, keys: Sequence[str]) -> None:
    """`state` is a dict with exactly `keys` (a dict of another class misses some): TypeError or
    ValueError naming the missing or unknown key."""
    if not isinstance(state, dict):
        raise TypeError(f"{path}: expected a dict, got {type(state).__name__}")
    expected = f"expected {', '.join(map(repr, keys))}" if keys else "expected no keys"
    for key in keys:
        if key not in state:
            raise ValueError(f"{state_path(path, key)}: missing ({expected})")
    for key in state:
        if key not in keys:
            raise ValueError(f"{state_path(path, key)}: unknown key ({expected})")


def check_state_tensor(value, path: str, like: torch.Tensor) -> torch.Tensor:
    """`value` is a dense tensor of `like`'s shape and dtype (on any device: loading copies it).
    Nothing is broadcast or cast: a different shape or dtype is an error."""
    check_dense(value, path)
    if value.shape != like.shape:
        raise ValueError(f"{path}: shape {tuple(value.shape)}, expected {tuple(like.shape)}")
    if value.dtype != like.dtype:
        raise TypeError(f"{path}: dtype {value.dtype}, expected {like.dtype}")
    return value


def check_state_vector(value, path: str, dtype: torch.dtype, size: Optional[int] = None) -> torch.Tensor:
    """`value` is a finite dense 1-D tensor of `dtype` (of length `size` when given, else >= 1)."""
    check_dense(value, path)
    if value.dtype != dtype:
        raise TypeError(f"{path}: dtype {value.dtype}, expected {dtype}")
    if value.dim() != 1 or value.numel() < 1 or (size is not None and value.numel() != size):
        expected = f"({size},)" if size is not None else "(K,) with K >= 1"
        raise ValueError(f"{path}: shape {tuple(value.shape)}, expected {expected}")
    check_state_values(value, path, finite=True)
    return value


def check_state_values(value: torch.Tensor, path: str, *, low: Optional[float] = None, high: Optional[float] = None,
                       finite: bool = False) -> None:
    """Every entry of `value` is finite (finite=True) and within [low, high] (NaN never is)."""
    if value.numel() == 0:
        return
    if finite and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{path}: has non-finite entries")
    if low is not None and not bool((value >= low).all()):
        raise ValueError(f"{path}: has entries below {low:g} (or NaN)")
    if high is not None and not bool((value <= high).all()):
        raise ValueError(f"{path}: has entries above {high:g} (or NaN)")


def check_on_simplex(lam: torch.Tensor, path: str) -> None:
    """`lam` is on the probability simplex: finite entries >= 0 whose sum (in float64) is 1 within
    256·K·eps of lam's dtype."""
    lam64 = lam.to(torch.float64)
    if not bool(torch.isfinite(lam64).all()) or bool((lam64 < 0).any()):
        raise ValueError(f"{path}: λ must be finite and >= 0 (on the simplex), got {lam.tolist()}")
    tolerance = 256 * lam.numel() * torch.finfo(lam.dtype).eps
    if abs(float(lam64.sum()) - 1) > tolerance:
        raise ValueError(f"{path}: λ must sum to 1 (on the simplex), got a sum of {float(lam64.sum())!r}")


def check_state_generator(value, path: str, generator: torch.Generator) -> None:
    """`value` is a state that `generator` accepts: tried on a scratch generator of its device, so a
    bad state raises here and the real generator is untouched."""
    if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
        raise TypeError(f"{path}: expected a torch.uint8 generator state (Generator.get_state()), got "
                        f"{value.dtype if isinstance(value, torch.Tensor) else type(value).__name__}")
    expected = generator.get_state().shape
    if value.shape != expected:
        raise ValueError(f"{path}: shape {tuple(value.shape)}, expected {tuple(expected)} (the state of a "
                         f"{generator.device.type} generator)")
    try:
        torch.Generator(device=generator.device).set_state(value)
    except RuntimeError as error:
        raise ValueError(f"{path}: not a valid generator state ({error})") from None
