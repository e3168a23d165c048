"""Robustness of the core ops (issue 14), on every backend: results that were wrong without an error,
and arguments the kernels cannot read.

- gram, cross_gram and MoCo's Gram passes for K above one 64-row Triton tile, where the output is a
  grid of tiles, each summed from several partials (item 1);
- project_simplex at magnitudes from 1e-30 to 1.7e308, where τ lost its "− 1" above 2⁵³ and a row
  whose sum overflows came back NaN, and through it MoCo's and MoDo's weights (item 2);
- min_norm on float64 Grams with entries near the largest double (item 4);
- sparse and nested tensors as arguments, and flat_buffer's K and shapes (item 14).
"""

import math

import numpy as np
import pytest
import torch

import molkernels
import tolerances as tol
from molkernels import _ops, reference
from stacks import (
    BLOCK_SHAPES,
    LARGE_KS,
    as_list,
    backend_params,
    cases,
    check_min_norm_kkt,
    check_projection,
    make_stack,
    poison_allocator,
    randint,
    randn,
    simplex_tolerance,
)

# --------------------------------------------------------------------------------------------------
# Item 1: K > 64


def _large_k_stack(layout: str, K: int, d: int, dtype, device):
    """Small integers (every sum exact in float32, so a misread partial shows as an exact mismatch):
    one [K, d] tensor, a list of two separate blocks, or the mixed list (flat views, transposed and
    strided blocks). Each run of adjacent blocks is one more partial, also under the interpreter."""
    if layout == "tensor":
        return randint(K, d, dtype=dtype, device=device)
    if layout == "two-blocks":
        return [randint(K, d, dtype=dtype, device=device), randint(K, 3, 5, dtype=dtype, device=device)]
    return make_stack("mixed", K, dtype, device, fill=randint)


def _large_k_cases(spec):
    """(K, layout, d, dtype). float32 takes tl.dot in Triton, float64 the broadcast product with
    its own (on a GPU smaller) tiles. On a GPU d = 5000 splits a tensor's columns into several
    spans; the interpreter takes one span per tile whatever d, so d stays small there."""
    d = 5000 if spec.device == "cuda" else 129
    layouts = ("tensor", "two-blocks") if spec.interpreted else ("tensor", "two-blocks", "mixed")
    return [(K, layout, d, dtype) for K in LARGE_KS for layout in layouts for dtype in (torch.float32, torch.float64)]


def _cpu(stack):
    return [b.cpu() for b in as_list(stack)]


@pytest.mark.parametrize("be,K,layout,d,dtype", cases(_large_k_cases), indirect=["be"])
def test_gram_above_one_tile(be, K, layout, d, dtype):
    """gram equals the float64 reference exactly (small integers) and is exactly symmetric."""
    g = _large_k_stack(layout, K, d, dtype, be.device)
    poison_allocator(4 * K * K, device=be.device)
    G = molkernels.gram(g, backend=be.backend)
    expected = reference.gram(_cpu(g)).to(tol.accum_dtype(dtype))
    assert torch.isfinite(G).all(), f"{int((~torch.isfinite(G)).sum())} non-finite entries"
    assert torch.equal(G.cpu(), expected), f"{int((G.cpu() != expected).sum())} of {K * K} entries differ"
    assert torch.equal(G, G.T)


@pytest.mark.parametrize("be,K,layout,d,dtype", cases(_large_k_cases), indirect=["be"])
def test_cross_gram_above_one_tile(be, K, layout, d, dtype):
    a = _large_k_stack(layout, K, d, dtype, be.device)
    b = _large_k_stack(layout, K, d, dtype, be.device)
    poison_allocator(4 * K * K, device=be.device)
    C = molkernels.cross_gram(a, b, backend=be.backend)
    expected = reference.cross_gram(_cpu(a), _cpu(b)).to(tol.accum_dtype(dtype))
    assert torch.equal(C.cpu(), expected), f"{int((C.cpu() != expected).sum())} of {K * K} entries differ"


def _moco_cases(spec):
    Ks = (65, 129) if spec.interpreted else (65, 200)  # 129: a 3 x 3 grid of 64-row tiles
    return [(K, dtype) for K in Ks for dtype in (torch.float32, torch.float64)]


@pytest.mark.parametrize("be,K,dtype", cases(_moco_cases), indirect=["be"])
def test_moco_gram_passes_above_one_tile(be, K, dtype):
    """MoCo's fused passes (tracking + Gram of y, and the [2K, 2K] joint Gram of [y; g]) take the
    tiled Gram above K = 64; separate blocks give several partials."""
    shapes = ((7,), (3, 5)) if be.interpreted else BLOCK_SHAPES
    y = [randint(K, *shape, dtype=dtype, device=be.device) for shape in shapes]
    g = [randint(K, *shape, dtype=dtype, device=be.device) for shape in shapes]
    y_expected = [b.cpu().clone() for b in y]
    accum = tol.accum_dtype(dtype)
    # β = 1/2: y − β (y − g) = (y + g) / 2, halves of small integers, so every sum stays exact
    G = _ops.op("moco_track_gram", be.backend)(y, g, torch.tensor(0.5, device=be.device))
    G_expected = reference.track_gram(y_expected, _cpu(g), 0.5).to(accum)
    for j, (got, want) in enumerate(zip(y, y_expected)):
        assert torch.equal(got.cpu(), want), f"y[{j}] tracked wrongly"
    assert torch.equal(G.cpu(), G_expected), f"track_gram: {int((G.cpu() != G_expected).sum())} entries differ"
    J = _ops.op("joint_gram", be.backend)(y, g)
    J_expected = reference.joint_gram(y_expected, _cpu(g)).to(accum)
    assert torch.equal(J.cpu(), J_expected), f"joint_gram: {int((J.cpu() != J_expected).sum())} entries differ"


# --------------------------------------------------------------------------------------------------
# Item 2: project_simplex at any magnitude


_TWO_60 = 2.0**60  # ulp 256: distinct entries differ by far more than the simplex's width

# (v, its projection, the dtypes that represent v as written)
EXACT_PROJECTIONS = [
    ([-1e17, -2e17], [1.0, 0.0], (torch.float64, torch.float32, torch.bfloat16)),
    ([3e38, 3e38, -3e38], [0.5, 0.5, 0.0], (torch.float64, torch.float32, torch.bfloat16)),
    ([1e308, -1e308], [1.0, 0.0], (torch.float64,)),
    ([1.7e308] * 4, [0.25] * 4, (torch.float64,)),  # the row sum overflows
    ([_TWO_60, _TWO_60, _TWO_60 - 512], [0.5, 0.5, 0.0], (torch.float64,)),
    ([-_TWO_60, -_TWO_60 - 512, -_TWO_60, -_TWO_60], [1 / 3, 0.0, 1 / 3, 1 / 3], (torch.float64,)),
    ([1e300, 1e-30, -1e300, 1.0], [1.0, 0.0, 0.0, 0.0], (torch.float64,)),
    ([1e-30, -2e-30, 3e-30], [1 / 3, 1 / 3, 1 / 3], (torch.float64, torch.float32)),
    ([1e3, 1e3 + 0.5, 1e3 - 8], [0.25, 0.75, 0.0], (torch.float64, torch.float32, torch.float16)),
]


def _exact_cases(spec):
    return [(i, dtype) for i, (_, _, dtypes) in enumerate(EXACT_PROJECTIONS) for dtype in dtypes]


# Under the interpreter (NumPy) v − max(v) warns when it rounds to −inf, which it may: such an entry
# gets no mass.
OVERFLOW_TO_MINUS_INF = pytest.mark.filterwarnings("ignore:overflow encountered in subtract:RuntimeWarning")


@OVERFLOW_TO_MINUS_INF
@pytest.mark.parametrize("be,case,dtype", cases(_exact_cases), indirect=["be"])
def test_project_simplex_large_magnitudes_exact(be, case, dtype):
    """Known projections of rows far above 2⁵³, near the largest double, and of mixed magnitudes."""
    values, projection, _ = EXACT_PROJECTIONS[case]
    v = torch.tensor(values, dtype=torch.float64).to(dtype).to(be.device)
    assert torch.isfinite(v).all()
    x = molkernels.project_simplex(v, backend=be.backend)
    expected = torch.tensor(projection, dtype=torch.float64)
    error = (x.cpu().to(torch.float64) - expected).abs().max().item()
    assert error <= simplex_tolerance(dtype, len(values)), f"{values} -> {x.tolist()}, expected {projection}"


def _magnitude_cases(spec):
    exponents = {
        torch.float64: (-30, 0, 16, 17, 20, 50, 100, 200, 300, 308),
        torch.float32: (-30, 0, 17, 20, 30, 38),
        torch.bfloat16: (-30, 0, 17, 38),
        torch.float16: (-4, 0, 4),
    }
    return [(dtype, e) for dtype, es in exponents.items() for e in es]


@OVERFLOW_TO_MINUS_INF
@pytest.mark.parametrize("be,dtype,exponent", cases(_magnitude_cases), indirect=["be"])
def test_project_simplex_magnitudes(be, dtype, exponent):
    """Rows of random entries around 10^exponent (uniform in [0.5, 1] · 10^e times a random sign,
    so that every entry stays representable), and rows mixing every magnitude from 1e-30 up to
    10^exponent."""
    top = float(torch.finfo(dtype).max)
    scale = min(10.0**exponent, top)
    signs = torch.where(torch.rand(16, 9, dtype=torch.float64) < 0.5, -1.0, 1.0)
    same = signs * (0.5 + 0.5 * torch.rand(16, 9, dtype=torch.float64)) * scale
    exponents = -30 + (math.log10(scale) + 30) * torch.rand(16, 9, dtype=torch.float64)
    mixed = signs.flip(0) * torch.pow(10.0, exponents).clamp(max=top)
    v = torch.cat([same, mixed]).to(dtype)
    v = v.clamp(-top, top).to(be.device)  # rounding to dtype may step past its largest value
    assert torch.isfinite(v).all()
    x = molkernels.project_simplex(v, backend=be.backend)
    check_projection(x, v)


@OVERFLOW_TO_MINUS_INF
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")  # Inf − Inf, by design
@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_project_simplex_non_finite_rows_stay_nan_at_large_magnitudes(be):
    """The shift by the row maximum must not turn ±Inf or NaN into a finite projection."""
    v = torch.tensor(
        [[1e308, float("inf")], [float("-inf"), 1e308], [float("nan"), -1e308], [1e308, 1.7e308]], dtype=torch.float64
    ).to(be.device)
    x = molkernels.project_simplex(v, backend=be.backend).cpu()
    assert torch.isnan(x[:3]).all(), f"rows with a non-finite entry: {x[:3].tolist()}"
    assert torch.equal(x[3], torch.tensor([0.0, 1.0], dtype=torch.float64)), x[3]


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_steps_keep_weights_on_the_simplex_for_large_gradients(be):
    """MoCo's and MoDo's λ step, λ − γ (G λ) with ‖g‖² ~ 1e18, projects onto the simplex: the
    weights sum to 1 and the direction is not zero (λ came back [0, 0] once ‖g‖ ≳ 3e8)."""
    params = [torch.zeros(5, device=be.device)]
    grads = [randn(2, 5, device=be.device, scale=1e9)]
    lam = molkernels.moco_step(params, grads, molkernels.MoCoState(params, 2), backend=be.backend)
    assert abs(lam.sum().item() - 1) <= 1e-6 and (lam >= 0).all(), f"MoCo λ = {lam.tolist()}"
    assert params[0].grad.abs().max() > 0, "MoCo's direction is zero"
    lam = molkernels.modo_step(params, grads, grads, grads, molkernels.MoDoState(params, 2), backend=be.backend)
    assert abs(lam.sum().item() - 1) <= 1e-6 and (lam >= 0).all(), f"MoDo λ = {lam.tolist()}"
    assert params[0].grad.abs().max() > 0, "MoDo's direction is zero"


# --------------------------------------------------------------------------------------------------
# Item 4: min_norm near the largest double


def _gram_near(top: float, K: int) -> tuple:
    """(small, big): a random Gram whose largest diagonal entry is `top` / 2^k, and the same times
    2^k, so that big's largest entry is `top` (to rounding). Scaling by a power of two is exact,
    so both have the same solution, bit for bit."""
    exponent = math.floor(math.log2(top))
    A = torch.randn(K, K + 2, dtype=torch.float64)
    small = A @ A.T
    small = small / small.diagonal().max() * (top / 2.0**exponent)
    return small, small * 2.0**exponent


# The reference backend is FISTA with 20000 iterations (seconds per call), tested on its own below.
@pytest.mark.parametrize("be,K", cases(lambda spec: [(K,) for K in (2, 3, 5, 8)], exclude=("reference",)), indirect=["be"])
@pytest.mark.parametrize("top", [1e307, 1e308, 1.7e308])
def test_min_norm_near_the_largest_double(be, K, top):
    """Entries ~1e307 to 1.7e308 (G_ij + G_ji overflows above 9e307): the weights are finite, on
    the simplex, optimal, and bitwise those of the same Gram scaled down by a power of two."""
    small, big = _gram_near(top, K)
    assert torch.isfinite(big).all() and big.max() >= top * (1 - 1e-15)
    lam = molkernels.min_norm(big.to(be.device), backend=be.backend)
    assert torch.isfinite(lam).all(), f"non-finite weights: {lam.tolist()}"
    check_min_norm_kkt(lam.cpu(), big)
    lam_small = molkernels.min_norm(small.to(be.device), backend=be.backend)
    assert torch.equal(lam, lam_small), f"{lam.tolist()} at {top:g}, {lam_small.tolist()} at scale 1"


@pytest.mark.parametrize("be", backend_params(exclude=("reference",)), indirect=True)
def test_min_norm_pair_near_the_largest_double(be):
    """K = 2's closed form: t = (G11 − G01) / (G00 − 2 G01 + G11) = 0.1 / 0.5, where 2 G01 and
    G01 + G10 overflow."""
    big = 1.7e308
    gram = torch.tensor([[big, 0.6 * big], [0.6 * big, 0.7 * big]], dtype=torch.float64).to(be.device)
    lam = molkernels.min_norm(gram, backend=be.backend).cpu()
    expected = torch.tensor([0.2, 0.8], dtype=torch.float64)
    assert (lam - expected).abs().max() <= 1e-12, f"λ = {lam.tolist()}, expected [0.2, 0.8]"


@pytest.mark.parametrize("K", [2, 5])
def test_reference_min_norm_near_the_largest_double(K):
    """The oracle itself: a few hundred FISTA steps suffice to see that the scaled-up Gram gives
    finite weights on the simplex, bitwise those of the Gram at scale 1 (the old symmetrisation
    overflowed to NaN)."""
    small, big = _gram_near(1.7e308, K)
    lam = reference.min_norm(torch.stack([small, big]), iterations=300)
    assert torch.isfinite(lam).all(), f"non-finite weights: {lam.tolist()}"
    assert (lam >= 0).all() and ((lam.sum(-1) - 1).abs() <= 1e-12).all()
    assert torch.equal(lam[0], lam[1]), f"{lam[1].tolist()} at 1.7e308, {lam[0].tolist()} at scale 1"


# --------------------------------------------------------------------------------------------------
# Item 14: arguments the kernels cannot read


def _sparse():
    return torch.randn(3, 4).to_sparse()


def _sparse_csr():
    return torch.randn(3, 4).to_sparse_csr()


def _nested():
    return torch.nested.nested_tensor([torch.randn(3, 4), torch.randn(3, 2)])


UNREADABLE_ARGUMENTS = {
    "gram-sparse": (lambda be: molkernels.gram(_sparse(), backend=be), "g"),
    "gram-block-csr": (lambda be: molkernels.gram([torch.randn(3, 4), _sparse_csr()], backend=be), r"g\[1\]"),
    "gram-nested": (lambda be: molkernels.gram(_nested(), backend=be), "g"),
    "gram-block-nested": (lambda be: molkernels.gram([torch.randn(2, 4), _nested()], backend=be), r"g\[1\]"),
    "cross_gram-sparse-b": (lambda be: molkernels.cross_gram(torch.randn(3, 4), _sparse(), backend=be), "b"),
    "combine-sparse-weights": (
        lambda be: molkernels.combine(torch.randn(3, 4), torch.ones(3).to_sparse(), backend=be), "weights"),
    "combine-nested-g": (lambda be: molkernels.combine(_nested(), torch.ones(2), backend=be), "g"),
    "project_simplex-sparse": (lambda be: molkernels.project_simplex(_sparse(), backend=be), "v"),
    "project_simplex-nested": (lambda be: molkernels.project_simplex(_nested(), backend=be), "v"),
    "min_norm-sparse": (lambda be: molkernels.min_norm(torch.eye(3).to_sparse(), backend=be), "gram"),
    "min_norm-csr": (lambda be: molkernels.min_norm(torch.eye(3).to_sparse_csr(), backend=be), "gram"),
}


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning")
@pytest.mark.parametrize("case", sorted(UNREADABLE_ARGUMENTS))
@pytest.mark.parametrize("be", [p for p in backend_params() if p.values[0].device == "cpu"], indirect=True)
def test_sparse_and_nested_tensors_are_rejected(be, case):
    """A TypeError naming the argument (CPU tensors), raised before any backend sees it."""
    call, name = UNREADABLE_ARGUMENTS[case]
    with pytest.raises(TypeError, match=rf"^{name}: expected a dense"):
        call(be.backend)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(shapes=[(3,)], K=2.0), TypeError, r"^K: expected an int, got 2\.0"),
        (dict(shapes=[(3,)], K=True), TypeError, r"^K: expected an int, got True"),
        (dict(shapes=[(3,)], K=-1), ValueError, r"^K: expected at least one objective, got -1"),
        (dict(shapes=[(3,)], K=0), ValueError, r"^K: expected at least one objective, got 0"),
        (dict(shapes=[(3, 2.5)], K=2), TypeError, r"^shapes\[0\]\[1\]: expected an int, got 2\.5"),
        (dict(shapes=[(2,), (3, -1)], K=2), ValueError, r"^shapes\[1\]: sizes must be >= 0"),
        (dict(shapes=[5], K=2), TypeError, r"^shapes\[0\]: expected a shape"),
        (dict(shapes=[torch.zeros(3)], K=2), TypeError, r"^shapes\[0\]: expected a shape"),
        (dict(shapes="ab", K=2), TypeError, r"^shapes: expected a list of shapes"),
        (dict(shapes=[(3,)], K=2, dtype=torch.int32), TypeError, r"^dtype: expected float16"),
    ],
    ids=["K-float", "K-bool", "K-negative", "K-zero", "size-float", "size-negative", "shape-int", "shape-tensor",
         "shapes-str", "dtype-int"],
)
def test_flat_buffer_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        molkernels.flat_buffer(**kwargs)


def test_flat_buffer_accepts_integer_likes():
    """NumPy integers and torch.Size are fine: only what is not an integer is rejected."""
    buffer, views = molkernels.flat_buffer([torch.Size([2, 3]), [4], ()], np.int64(3), dtype=torch.float64)
    assert buffer.shape == (3, 11) and buffer.dtype == torch.float64
    assert [tuple(v.shape) for v in views] == [(3, 2, 3), (3, 4), (3,)]
