"""Op registration and backend choice.

The compiled ops `torch.ops.molkernels.*` (CPU and CUDA kernels, schemas in csrc/ops.cpp) get
their fake implementations here, so torch.compile traces through them. The Triton kernels are
registered as custom ops `molkernels::triton_*` with the same fake implementations.
"""

from __future__ import annotations

import functools
import os
from typing import List

import torch

from . import reference

BACKENDS = ("reference", "cpu", "triton", "cuda")

try:
    from . import _C  # noqa: F401  (registers torch.ops.molkernels.*)

    _C_ERROR = None
except ImportError as error:  # a source tree that was never built
    _C = None
    _C_ERROR = error


def _fake_products(a: List[torch.Tensor], *rest) -> torch.Tensor:
    K = a[0].shape[0]
    dtype = torch.float64 if a[0].dtype == torch.float64 else torch.float32
    return a[0].new_empty((K, K), dtype=dtype)


def _fake_combine(g: List[torch.Tensor], weights: torch.Tensor) -> List[torch.Tensor]:
    return [b.new_empty(b.shape[1:]) for b in g]


def _fake_project_simplex(v: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(v, memory_format=torch.contiguous_format)


def _fake_min_norm(gram: torch.Tensor) -> torch.Tensor:
    return gram.new_empty(gram.shape[:-1])


def _fake_joint_gram(y: List[torch.Tensor], g: List[torch.Tensor]) -> torch.Tensor:
    K = g[0].shape[0]
    dtype = torch.float64 if g[0].dtype == torch.float64 else torch.float32
    return g[0].new_empty((2 * K, 2 * K), dtype=dtype)


def _fake_track_gram(y: List[torch.Tensor], g: List[torch.Tensor], beta: float) -> torch.Tensor:
    return _fake_products(g)


def _fake_in_place(*args) -> None:
    return None


def _fake_fl_weighted_mean(x: torch.Tensor, weights: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[1:])


_FAKES = {
    "gram": _fake_products,
    "cross_gram": _fake_products,
    "combine": _fake_combine,
    "project_simplex": _fake_project_simplex,
    "min_norm": _fake_min_norm,
    "combine_into": _fake_in_place,
    "moco_track_gram": _fake_track_gram,
    "joint_gram": _fake_joint_gram,
    "moco_track_combine": _fake_in_place,
    "fl_adam_step": _fake_in_place,
    "fl_sgd_step": _fake_in_place,
    "fl_weighted_mean": _fake_fl_weighted_mean,
}

if _C is not None:
    for _name, _fake in _FAKES.items():
        torch.library.register_fake(f"molkernels::{_name}")(_fake)


@functools.lru_cache(maxsize=None)
def _triton_status():
    """(module, None) when the Triton kernels can run here, else (None, reason)."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return None, f"triton is not installed ({error})"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return None, "no CUDA device, and TRITON_INTERPRET=1 (Triton's CPU interpreter) is not set"
    from . import triton as triton_kernels

    return triton_kernels, None


def unavailable_reason(backend: str) -> str | None:
    """None when `backend` can run here, else why not."""
    if backend == "reference":
        return None
    if backend == "cpu":
        return None if _C is not None else f"the extension molkernels._C is not built ({_C_ERROR})"
    if backend == "cuda":
        if _C is None:
            return f"the extension molkernels._C is not built ({_C_ERROR})"
        if not _C.build_info()["cuda_compiled"]:
            return "the extension was built without CUDA kernels (no nvcc or a CPU-only torch at build time)"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        return None
    if backend == "triton":
        return _triton_status()[1]
    return f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)} or 'auto'"


def backends() -> List[str]:
    """The backends that can run here."""
    return [b for b in BACKENDS if unavailable_reason(b) is None]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend an op runs on: `auto` (or MOLKERNELS_BACKEND) picks cuda for CUDA tensors
    (Triton when the CUDA kernels are missing) and cpu for CPU tensors."""
    if backend == "auto":
        backend = os.environ.get("MOLKERNELS_BACKEND", "auto")
    if backend == "auto":
        if device.type == "cuda":
            for candidate in ("cuda", "triton"):
                if unavailable_reason(candidate) is None:
                    return candidate
            return "reference"
        return "cpu" if unavailable_reason("cpu") is None else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown {backend!r}; expected one of {', '.join(BACKENDS)} or 'auto'")
    reason = unavailable_reason(backend)
    if reason is not None:
        raise RuntimeError(f"backend={backend!r} is not available: {reason}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' runs on CPU tensors; the inputs are on {device}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' runs on CUDA tensors; the inputs are on {device}")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); the inputs are on {device}")
    return backend


# The schemas of the Triton custom ops `molkernels::triton_<op>`, the same as the compiled ops'.
_TRITON_SCHEMAS = {
    "gram": "(Tensor[] g) -> Tensor",
    "cross_gram": "(Tensor[] a, Tensor[] b) -> Tensor",
    "combine": "(Tensor[] g, Tensor weights) -> Tensor[]",
    "project_simplex": "(Tensor v) -> Tensor",
    "min_norm": "(Tensor gram) -> Tensor",
    "combine_into": "(Tensor[] g, Tensor weights, Tensor(a!)[] out, float alpha, bool accumulate) -> ()",
    "moco_track_gram": "(Tensor(a!)[] y, Tensor[] g, float beta) -> Tensor",
    "joint_gram": "(Tensor[] y, Tensor[] g) -> Tensor",
    "moco_track_combine": "(Tensor(a!)[] y, Tensor[] g, Tensor scale, float beta, Tensor weights, "
                          "Tensor(b!)[] out, float alpha, bool accumulate) -> ()",
    "fl_adam_step": "(Tensor(a!) params, Tensor grads, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) step, "
                    "Tensor active, float lr, float beta1, float beta2, float eps, float weight_decay) -> ()",
    "fl_sgd_step": "(Tensor(a!) params, Tensor grads, Tensor(b!)? momentum_buffer, Tensor active, float lr, "
                   "float momentum, float weight_decay) -> ()",
    "fl_weighted_mean": "(Tensor x, Tensor weights, Tensor active) -> Tensor",
}


def _triton_kernel(name: str):
    """The implementation of `molkernels::triton_<name>`: imports triton on its first call, so
    that importing molkernels does not, and torch.compile sees only the registered op."""

    def run(*args):
        kernels, reason = _triton_status()
        if kernels is None:
            raise RuntimeError(f"backend='triton' is not available: {reason}")
        return getattr(kernels, name)(*args)

    return run


for _name, _schema in _TRITON_SCHEMAS.items():
    _qualname = f"molkernels::triton_{_name}"
    torch.library.define(_qualname, _schema)
    torch.library.impl(_qualname, ("CPU", "CUDA"))(_triton_kernel(_name))
    torch.library.register_fake(_qualname)(_FAKES[_name])


def _reference_op(name: str):
    """The reference implementations, returning the dtypes the kernels return."""

    def gram(g):
        return reference.gram(g).to(_out_dtype(g[0].dtype))

    def cross_gram(a, b):
        return reference.cross_gram(a, b).to(_out_dtype(a[0].dtype))

    def combine(g, weights):
        return [x.to(b.dtype) for x, b in zip(reference.combine(g, weights), g)]

    def project_simplex(v):
        return reference.project_simplex(v).to(v.dtype)

    def min_norm(gram_matrix):
        return reference.min_norm(gram_matrix).to(gram_matrix.dtype)

    def moco_track_gram(y, g, beta):
        return reference.track_gram(y, g, beta).to(_out_dtype(g[0].dtype))

    def joint_gram(y, g):
        return reference.joint_gram(y, g).to(_out_dtype(g[0].dtype))

    def fl_weighted_mean(x, weights, active):
        return reference.masked_weighted_mean(x, weights, active).to(x.dtype)

    return {**locals(), "combine_into": reference.combine_into, "moco_track_combine": reference.track_combine,
            "fl_adam_step": reference.batched_adam_step, "fl_sgd_step": reference.batched_sgd_step}[name]


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def op(name: str, backend: str):
    """The callable that runs op `name` on a resolved backend."""
    if backend == "reference":
        return _reference_op(name)
    if backend == "triton":
        return getattr(torch.ops.molkernels, f"triton_{name}")
    return getattr(torch.ops.molkernels, name)
