"""NVTX ranges around every op, so that an nsys timeline names each molkernels kernel.

Enabled by MOLKERNELS_NVTX=1 in the environment or by enable_nvtx(); off by default, when a
range costs one boolean test. Example:

    MOLKERNELS_NVTX=1 nsys profile -t cuda,nvtx -o mk python train.py
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

_enabled = os.environ.get("MOLKERNELS_NVTX", "0") not in ("", "0")


def enable_nvtx() -> None:
    global _enabled
    _enabled = True


def disable_nvtx() -> None:
    global _enabled
    _enabled = False


def nvtx_enabled() -> bool:
    return _enabled


@functools.lru_cache(maxsize=None)
def _nvtx_available() -> bool:
    """NVTX works in any CUDA build of torch, with or without a GPU (nsys traces CPU runs too)."""
    try:
        torch.cuda.nvtx.range_push("molkernels.probe")
        torch.cuda.nvtx.range_pop()
        return True
    except (RuntimeError, AttributeError):
        return False


@contextlib.contextmanager
def nvtx_range(op: str):
    """The range `molkernels.<op>` when NVTX is enabled (and torch has NVTX)."""
    if not _enabled or not _nvtx_available() or torch.compiler.is_compiling():
        yield
        return
    torch.cuda.nvtx.range_push(f"molkernels.{op}")
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
