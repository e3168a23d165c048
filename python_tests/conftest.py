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


class _CountedKernel:
    """A Triton kernel that notes its name in `launched` each time it is launched, then launches."""

    def __init__(self, name: str, kernel, launched: list):
        self.name, self.kernel, self.launched = name, kernel, launched

    def __getitem__(self, grid):
        self.launched.append(self.name)
        return self.kernel[grid]


@pytest.fixture
def triton_launches(monkeypatch):
    """The names of the Triton kernels launched during the test, in order (clear the list to count
    anew). Only the `*_kernel`s that the launchers of molkernels.triton launch are counted: the
    @triton.jit helpers that kernels call must stay Triton functions."""
    import importlib

    import triton

    launched = []
    for module_name in ("gram", "moco", "combine", "simplex", "min_norm", "federated"):
        module = importlib.import_module(f"molkernels.triton.{module_name}")
        for name, value in list(vars(module).items()):
            if name.endswith("_kernel") and isinstance(value, triton.runtime.jit.KernelInterface):
                monkeypatch.setattr(module, name, _CountedKernel(name, value, launched))
    return launched
