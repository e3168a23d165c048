"""NVTX ranges: with molkernels.profiling.enable_nvtx() (or MOLKERNELS_NVTX=1) each op opens the
range `molkernels.<op>` around its kernel, and closes it even when the kernel raises.

torch.cuda.nvtx.range_push/range_pop are replaced by recorders and profiling._nvtx_available by a
stub, so this runs without a GPU or an NVTX library."""

import importlib

import pytest
import torch

import molkernels
from molkernels import _ops, profiling
from stacks import backend_params, make_stack, randn


@pytest.fixture
def ranges(monkeypatch):
    """The list of NVTX calls made: ("push", name) and ("pop",)."""
    calls = []
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(("push", name)) or 0)
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop",)) or 0)
    monkeypatch.setattr(profiling, "_nvtx_available", lambda: True)
    was_enabled = profiling.nvtx_enabled()
    yield calls
    (profiling.enable_nvtx if was_enabled else profiling.disable_nvtx)()


def _calls(device="cpu"):
    K = 3
    g = make_stack("mixed", K, torch.float32, device)
    A = randn(K, 4, dtype=torch.float64)
    return {
        "gram": lambda backend: molkernels.gram(g, backend=backend),
        "cross_gram": lambda backend: molkernels.cross_gram(g, g, backend=backend),
        "combine": lambda backend: molkernels.combine(g, torch.ones(K, device=device), backend=backend),
        "project_simplex": lambda backend: molkernels.project_simplex(randn(5, K, device=device), backend=backend),
        "min_norm": lambda backend: molkernels.min_norm((A @ A.T).to(device), backend=backend),
    }


OPS = ["gram", "cross_gram", "combine", "project_simplex", "min_norm"]


@pytest.mark.parametrize("be", backend_params(exclude=("reference",)), indirect=True)
@pytest.mark.parametrize("op", OPS)
def test_each_op_opens_its_range(ranges, be, op):
    profiling.enable_nvtx()
    _calls(be.device)[op](be.backend)
    assert ranges == [("push", f"molkernels.{op}"), ("pop",)]


# (not min_norm: the reference's costs seconds, and its range is the same code as the others')
@pytest.mark.parametrize("op", [op for op in OPS if op != "min_norm"])
def test_reference_backend_too(ranges, op):
    profiling.enable_nvtx()
    _calls()[op]("reference")
    assert ranges == [("push", f"molkernels.{op}"), ("pop",)]


@pytest.mark.parametrize("op", OPS)
def test_disabled_means_no_ranges(ranges, op):
    profiling.disable_nvtx()
    _calls()[op]("auto")
    assert ranges == []


def test_no_nvtx_runtime_means_no_ranges(ranges, monkeypatch):
    monkeypatch.setattr(profiling, "_nvtx_available", lambda: False)
    profiling.enable_nvtx()
    for call in _calls().values():
        call("auto")
    assert ranges == []


def test_range_closes_when_the_kernel_raises(ranges, monkeypatch):
    def failing(name, backend):
        def kernel(*args):
            raise RuntimeError("kernel failed")

        return kernel

    monkeypatch.setattr(_ops, "op", failing)
    profiling.enable_nvtx()
    with pytest.raises(RuntimeError, match="kernel failed"):
        molkernels.gram(randn(3, 4))
    assert ranges == [("push", "molkernels.gram"), ("pop",)]


def test_bad_argument_opens_no_range(ranges):
    profiling.enable_nvtx()
    with pytest.raises(ValueError):
        molkernels.gram([])
    assert ranges == []


def test_sequence_of_ops_nests_nothing(ranges):
    """An MGDA step opens three ranges one after the other, each closed before the next opens."""
    profiling.enable_nvtx()
    g = randn(3, 50)
    G = molkernels.gram(g)
    molkernels.combine(g, molkernels.min_norm(G))
    assert ranges == [
        ("push", "molkernels.gram"), ("pop",),
        ("push", "molkernels.min_norm"), ("pop",),
        ("push", "molkernels.combine"), ("pop",),
    ]


@pytest.mark.parametrize("value,enabled", [("1", True), ("0", False), ("", False)])
def test_environment_variable(monkeypatch, value, enabled):
    """MOLKERNELS_NVTX=1 enables the ranges when molkernels.profiling is imported."""
    monkeypatch.setenv("MOLKERNELS_NVTX", value)
    try:
        importlib.reload(profiling)
        assert profiling.nvtx_enabled() is enabled
        calls = []
        monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(name) or 0)
        monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: 0)
        monkeypatch.setattr(profiling, "_nvtx_available", lambda: True)
        molkernels.project_simplex(randn(2, 3))
        assert calls == (["molkernels.project_simplex"] if enabled else [])
    finally:
        monkeypatch.delenv("MOLKERNELS_NVTX")
        importlib.reload(profiling)
