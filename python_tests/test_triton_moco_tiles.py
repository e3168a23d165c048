"""Triton MoCo passes at K = 17, 33, 64 (GPU-NOTES 1.1.3): several row tiles, one diagonal program
per tile writing y, and the joint Gram's fused and per-product paths, against molkernels.reference.

They run under the interpreter twice: with its own tiles (one tile of all K rows) and with the tiles
a GPU gets (`interpreted` patched to False in the launchers only; the kernels still run
interpreted), which are the ones that split K into tiles of 8 or 16 rows.
"""

import importlib

import pytest
import torch
from conftest import INTERPRETED

from molkernels import _ops, reference

pytestmark = pytest.mark.triton

DTYPES = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}
# Odd widths, an empty block, and one wide enough for several column steps of a GPU tile.
BLOCK_SHAPES = [(3,), (5, 7), (0,), (130,)]


@pytest.fixture(params=["interpreter", "sm_90"])
def moco(request, monkeypatch):
    reason = _ops.unavailable_reason("triton")
    if reason is not None:
        pytest.skip(f"backend 'triton' is unavailable: {reason}")
    if not INTERPRETED:
        pytest.skip("a GPU is present: these cases run the interpreter on CPU tensors")
    # By module path: molkernels.triton exports functions named gram and moco's ops.
    gram = importlib.import_module("molkernels.triton.gram")
    moco = importlib.import_module("molkernels.triton.moco")
    combine = importlib.import_module("molkernels.triton.combine")  # MoCo's second pass
    if request.param == "sm_90":
        for module in (gram, moco, combine):
            monkeypatch.setattr(module, "interpreted", lambda device: False)
    return moco


def _stack(K, dtype):
    return [torch.randn((K,) + shape, dtype=dtype) for shape in BLOCK_SHAPES]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [17, 33, 64])
def test_track_gram(moco, K, dtype):
    y, g = _stack(K, dtype), _stack(K, dtype)
    y_expected = [b.clone() for b in y]
    G = moco.moco_track_gram(y, g, torch.tensor(0.3))
    G_expected = reference.track_gram(y_expected, g, 0.3)
    assert torch.equal(G, G.T), "the Gram is not exactly symmetric"
    torch.testing.assert_close(G.double(), G_expected, **DTYPES[dtype])
    for got, expected in zip(y, y_expected):
        torch.testing.assert_close(got, expected, **DTYPES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [17, 33, 64])
def test_joint_gram(moco, K, dtype):
    y, g = _stack(K, dtype), _stack(K, dtype)
    J = moco.joint_gram(y, g)
    assert J.shape == (2 * K, 2 * K)
    assert torch.equal(J, J.T), "the joint Gram is not exactly symmetric"
    torch.testing.assert_close(J.double(), reference.joint_gram(y, g), **DTYPES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [17, 33, 64])
def test_track_combine(moco, K, dtype):
    y, g = _stack(K, dtype), _stack(K, dtype)
    y_expected = [b.clone() for b in y]
    scale, weights = torch.rand(K, dtype=dtype) + 0.5, torch.rand(K, dtype=dtype)
    out = [torch.zeros(shape, dtype=dtype) for shape in BLOCK_SHAPES]
    out_expected = [o.clone() for o in out]
    importlib.import_module("molkernels.triton.combine").moco_track_combine(y, g, scale, torch.tensor(0.3), weights,
                                                                           out, 0.5, False)
    reference.track_combine(y_expected, g, scale, 0.3, weights, out_expected, 0.5, False)
    for got, expected in zip(y + out, y_expected + out_expected):
        torch.testing.assert_close(got, expected, **DTYPES[dtype])
