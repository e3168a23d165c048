"""Triton MoCo passes against molkernels.reference: K = 1, 3, 17, 33, 64 (one row tile, and several:
one diagonal program per tile writing y, GPU-NOTES 1.1.3), the joint Gram's fused and per-product
paths, every dtype of g (y, the tracking state, in its accumulation dtype), and layouts that make
one launch walk many table rows: separate blocks, views at an odd offset of one flat buffer, many
tiny blocks, empty blocks.

They run under the interpreter twice: with its own tiles (one tile of all K rows) and with the tiles
a GPU gets (`interpreted` patched to False in the launchers only, and an H200's programs; the
kernels still run interpreted), which are the ones that split K into tiles of 8 or 16 rows and wide
blocks into several chunks.

Every tensor the launchers allocate with torch.empty (the partials workspace, the outputs) starts as
NaN here: a slot the reduction reads but no program wrote, or an output element never written,
fails the comparison.
"""

import importlib

import pytest
import torch
from conftest import INTERPRETED

import tolerances as tol
from molkernels import _ops, reference
from stacks import check_products

pytestmark = pytest.mark.triton

KS = [1, 3, 17, 33, 64]
# Odd widths, an empty block, and one wide enough for several column steps of a GPU tile.
BLOCK_SHAPES = [(3,), (5, 7), (0,), (130,)]
# Many tiny blocks (every seventh empty): one table row each.
TINY_SHAPES = [(j % 4,) if j % 7 else (0,) for j in range(1, 30)]
LAYOUTS = ["blocks", "flat", "tiny"]
H200_MULTIPROCESSORS = 132


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
        monkeypatch.setattr(gram, "programs_to_fill", lambda device: 4 * H200_MULTIPROCESSORS)
    return moco


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    empty = torch.empty

    def nan_filled(*args, **kwargs):
        tensor = empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", nan_filled)


def _stack(K, dtype, layout, offset=0):
    """Blocks [K, *shape] of `layout`; "flat": views of one [K, offset + D] buffer, from column `offset`."""
    shapes = TINY_SHAPES if layout == "tiny" else BLOCK_SHAPES
    if layout != "flat":
        return [torch.randn((K,) + shape, dtype=torch.float64).to(dtype) for shape in shapes]
    widths = [torch.Size(shape).numel() for shape in shapes]
    buffer = torch.randn(K, offset + sum(widths), dtype=torch.float64).to(dtype)
    views, start = [], offset
    for shape, width in zip(shapes, widths):
        views.append(buffer[:, start:start + width].view((K,) + shape))
        start += width
    return views


def _pair(K, dtype, layout):
    """(y, g): the tracking state in g's accumulation dtype (views of one flat buffer from column 0,
    as MoCoState holds it, for the flat layout) and g (from the odd column 3)."""
    return _stack(K, tol.accum_dtype(dtype), layout), _stack(K, dtype, layout, offset=3)


def _rows(blocks):
    return [b.reshape(b.shape[0], -1) for b in blocks]


def _check_y(got, expected, dtype):
    """y − β (y − g) computed in the accumulation dtype and stored: a few roundings of it."""
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=4 * tol.u_acc(dtype), atol=4 * tol.u_acc(dtype))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", tol.DTYPES, ids=str)
@pytest.mark.parametrize("K", KS)
def test_track_gram(moco, K, dtype, layout):
    y, g = _pair(K, dtype, layout)
    y_expected = [b.clone() for b in y]
    G = moco.moco_track_gram(y, g, torch.tensor(0.3))
    reference.track_gram(y_expected, g, 0.3)
    _check_y(y, y_expected, dtype)
    check_products(G, _rows(y_expected), None, tol.GRAM)
    assert torch.equal(G, G.T), "the Gram is not exactly symmetric"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", tol.DTYPES, ids=str)
@pytest.mark.parametrize("K", KS)
def test_joint_gram(moco, K, dtype, layout):
    y, g = _pair(K, dtype, layout)
    J = moco.joint_gram(y, g)
    stacked = [torch.cat([yb, gb.to(yb.dtype)]) for yb, gb in zip(_rows(y), _rows(g))]
    check_products(J, stacked, None, tol.GRAM)
    assert torch.equal(J, J.T), "the joint Gram is not exactly symmetric"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("K", [3, 17])
def test_wide_blocks_split_into_chunks(moco, K, dtype):
    """A block wider than a program's span takes several table rows (chunks), each from its own
    first column; the interpreter's own tiles hold it in one."""
    shapes = [(3,), (2100,), (2, 7)]
    y = [torch.randn((K,) + shape, dtype=tol.accum_dtype(dtype)) for shape in shapes]
    g = [torch.randn((K,) + shape, dtype=torch.float64).to(dtype) for shape in shapes]
    y_expected, y_joint = [b.clone() for b in y], [b.clone() for b in y]
    G = moco.moco_track_gram(y, g, torch.tensor(0.3))
    if not moco.interpreted(g[0].device):
        spans = [table for key, (table, _) in importlib.import_module("molkernels.triton._launch")._TABLES.items()
                 if key[0][0] == "spans"]
        assert spans[-1].shape[0] > len(shapes), "the wide block was not split: the test checks nothing"
    reference.track_gram(y_expected, g, 0.3)
    _check_y(y, y_expected, dtype)
    check_products(G, _rows(y_expected), None, tol.GRAM)
    J = moco.joint_gram(y_joint, g)
    check_products(J, [torch.cat([yb, gb.to(yb.dtype)]) for yb, gb in zip(_rows(y_joint), _rows(g))], None, tol.GRAM)


@pytest.mark.parametrize("layout", ["blocks", "tiny"])
@pytest.mark.parametrize("K", [3, 17])
def test_nan_reaches_exactly_its_objective(moco, K, layout):
    """A NaN in g_1 makes y_1, and so row and column 1 of the Gram, NaN, and nothing else: in the
    joint Gram row and column K + 1 (g_1's)."""
    y, g = _pair(K, torch.float64, layout)
    g[1][(1,) + tuple(s - 1 for s in g[1].shape[1:])] = float("nan")
    y_joint = [b.clone() for b in y]
    G = moco.moco_track_gram(y, g, torch.tensor(0.3))
    J = moco.joint_gram(y_joint, g)
    for matrix, k in ((G, 1), (J, K + 1)):
        nan = torch.zeros_like(matrix, dtype=torch.bool)
        nan[k, :] = nan[:, k] = True
        assert torch.equal(torch.isnan(matrix), nan), f"NaN entries:\n{torch.isnan(matrix).int()}"


@pytest.mark.parametrize("layout", ["blocks", "tiny"])
@pytest.mark.parametrize("dtype", tol.DTYPES, ids=str)
@pytest.mark.parametrize("K", [1, 17, 64])
def test_track_combine(moco, K, dtype, layout):
    y, g = _pair(K, dtype, layout)
    y_expected = [b.clone() for b in y]
    acc = tol.accum_dtype(dtype)
    scale, weights = torch.rand(K, dtype=acc) + 0.5, torch.rand(K, dtype=acc)
    out = [torch.zeros(b.shape[1:], dtype=dtype) for b in g]
    out_expected = [o.clone() for o in out]
    importlib.import_module("molkernels.triton.combine").moco_track_combine(y, g, scale, torch.tensor(0.3), weights,
                                                                           out, 0.5, False)
    reference.track_combine(y_expected, g, scale, 0.3, weights, out_expected, 0.5, False)
    _check_y(y, y_expected, dtype)
    for got, expected in zip(out, out_expected):
        # The output is rounded to g's dtype.
        torch.testing.assert_close(got, expected, rtol=2 * tol.u_out(dtype), atol=8 * K * tol.u_acc(dtype))
