"""Shared test setup: Triton's CPU interpreter, the backends under test, and the `gpu` marker.

Every op is tested on every backend that can run here, as (backend, device) pairs:

    CPU tensors:   reference, cpu, and triton when there is no GPU (under TRITON_INTERPRET=1)
    CUDA tensors:  cuda and triton, when a GPU is present (marked `gpu`: `pytest -m gpu` runs them)

A pair that cannot run here is skipped with the reason molkernels._ops.unavailable_reason gives.
"""

import os
import zlib

import torch  # importing torch does not import triton; checked in test_custom_ops.py

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must happen before anything imports triton: @triton.jit reads it when a kernel is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

import pytest  # noqa: E402

from stacks import BackendSpec  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs on CUDA tensors (needs a CUDA device; select with -m gpu)")
    config.addinivalue_line("markers", "triton: exercises the Triton kernels (deselect with -m 'not triton')")


def skip_reason(spec: BackendSpec):
    """Why `spec` cannot run here, or None."""
    from molkernels import _ops

    if spec.device == "cuda" and not HAS_CUDA:
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    if spec.device == "cpu" and spec.backend == "triton" and not INTERPRETED:
        return "a GPU is present, so Triton runs on CUDA tensors, not under TRITON_INTERPRET=1 on CPU tensors"
    reason = _ops.unavailable_reason(spec.backend)
    if reason is not None:
        return f"backend {spec.backend!r} is unavailable: {reason}"
    return None


@pytest.fixture
def be(request):
    """The (backend, device) pair under test, skipped with a reason when it cannot run here.

    Tests parametrize it (indirectly) with stacks.backend_params() or stacks.cases(...)."""
    spec = request.param
    reason = skip_reason(spec)
    if reason is not None:
        pytest.skip(reason)
    return spec


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Each test draws its own random inputs (seeded from its id, so a failure reproduces)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
