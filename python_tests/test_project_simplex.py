"""molkernels.project_simplex: the Euclidean projection of each row onto the probability simplex,
against the sorting reference (the kernels use Michelot's fixed point), on every backend."""

import pytest
import torch

try:  # numpy only feeds hypothesis's array strategies
    import numpy as np
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
except ImportError:  # e.g. the GPU machine's image: the property tests skip, the others run
    given = None

import molkernels
import tolerances as tol
from stacks import backend_params, cases, check_simplex, poison_allocator, randn

SIMPLEX_KS = (1, 2, 3, 7, 16, 33, 64)
LEADING = ((), (5,), (2, 3))


@pytest.mark.parametrize(
    "be,K,leading,dtype",
    cases(lambda spec: [(K, lead, dtype) for K in SIMPLEX_KS for lead in LEADING for dtype in tol.DTYPES]),
    indirect=["be"],
)
def test_random_rows(be, K, leading, dtype):
    v = randn(*leading, K, dtype=dtype, device=be.device, scale=3.0)
    poison_allocator(v.numel(), device=be.device)
    x = molkernels.project_simplex(v, backend=be.backend)
    check_simplex(x, v)


@pytest.mark.parametrize("be", backend_params(), indirect=True)
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("dtype", tol.DTYPES, ids=str)
def test_scales(be, scale, dtype):
    v = randn(64, 9, dtype=dtype, device=be.device, scale=scale)
    x = molkernels.project_simplex(v, backend=be.backend)
    check_simplex(x, v)


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_many_rows_and_wide_rows(be):
    """Enough rows to be split across threads/programs, and a K wider than one tile."""
    n = 600 if be.interpreted else 5000
    for shape in ((n, 7), (3, 3000)):
        v = randn(*shape, device=be.device)
        x = molkernels.project_simplex(v, backend=be.backend)
        check_simplex(x, v)


_VALUE = None if given is None else st.one_of(
    st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32),
    st.sampled_from([0.0, 1.0, -1.0, 0.5, 2.0, 1.0 / 3.0, 1e-7]),  # ties, vertices, near-zero
)


def _property_test(be, max_examples):
    if given is None:
        pytest.skip("hypothesis is not installed")
    @settings(max_examples=max_examples, deadline=None)
    @given(
        v=st.tuples(st.integers(1, 4), st.integers(1, 40)).flatmap(
            lambda shape: hnp.arrays(np.float64, shape, elements=_VALUE)
        ),
        dtype=st.sampled_from(tol.DTYPES),
        shift=st.sampled_from([0.0, 100.0, -100.0]),
    )
    def run(v, dtype, shift):
        tensor = (torch.from_numpy(v) + shift).to(dtype).to(be.device)
        x = molkernels.project_simplex(tensor, backend=be.backend)
        check_simplex(x, tensor)

    run()


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_property_against_sorting_reference(be):
    """Hypothesis: random rows with ties, vertices and shifts; x ≥ 0, Σx = 1, x matches the sorting
    reference, the order of v is kept and equal entries get equal x (check_simplex)."""
    _property_test(be, 15 if be.interpreted else 150)


@pytest.mark.parametrize("be", backend_params(), indirect=True)
@pytest.mark.parametrize("dtype", tol.DTYPES, ids=str)
def test_vertices_are_exact(be, dtype):
    K = 5
    eye = torch.eye(K, dtype=dtype, device=be.device)
    assert torch.equal(molkernels.project_simplex(eye, backend=be.backend), eye)
    far = 10.0 * eye  # τ = 9: x = e_i exactly
    assert torch.equal(molkernels.project_simplex(far, backend=be.backend), eye)
    below = eye - 3.0  # a shift does not move the projection
    assert torch.equal(molkernels.project_simplex(below, backend=be.backend), eye)


@pytest.mark.parametrize("be", backend_params(), indirect=True)
@pytest.mark.parametrize("dtype", tol.DTYPES, ids=str)
def test_ties(be, dtype):
    K = 6
    for c in (0.0, 1.0, -7.5, 100.0):
        v = torch.full((K,), c, dtype=dtype, device=be.device)
        x = molkernels.project_simplex(v, backend=be.backend)
        check_simplex(x, v)
        assert torch.equal(x, x[0].expand(K)), f"equal inputs gave {x}"
        t = tol.PROJECT_SIMPLEX[dtype]
        assert abs(x[0].double().item() - 1.0 / K) <= t.out + K * t.acc * (1 + abs(c))
    v = torch.tensor([5.0, 0.0, 5.0, -1.0, 0.0, 4.0], dtype=dtype, device=be.device)
    x = molkernels.project_simplex(v, backend=be.backend)
    assert torch.equal(x.cpu(), torch.tensor([0.5, 0.0, 0.5, 0.0, 0.0, 0.0], dtype=dtype))


@pytest.mark.parametrize("be", backend_params(), indirect=True)
@pytest.mark.parametrize("dtype", tol.DTYPES, ids=str)
def test_points_on_the_simplex_stay(be, dtype):
    K = 7
    on = molkernels.reference.project_simplex(torch.randn(20, K, dtype=torch.float64) * 2)
    v = on.to(dtype).to(be.device)  # on the simplex up to rounding to dtype
    x = molkernels.project_simplex(v, backend=be.backend)
    check_simplex(x, v)
    t = tol.PROJECT_SIMPLEX[dtype]
    assert ((x.cpu().double() - v.cpu().double()).abs() <= t.out + 2 * K * t.acc).all()


@pytest.mark.parametrize("be", backend_params(), indirect=True)
@pytest.mark.parametrize("dtype", tol.DTYPES, ids=str)
def test_k1_is_one(be, dtype):
    v = randn(10, 1, dtype=dtype, device=be.device, scale=50.0)
    x = molkernels.project_simplex(v, backend=be.backend)
    check_simplex(x, v)
    assert ((x.cpu().double() - 1.0).abs() <= 2 * tol.u_out(dtype) + 64 * tol.u_acc(dtype) * 51).all()
    ints = torch.arange(-5, 5, dtype=dtype, device=be.device).reshape(10, 1)
    assert torch.equal(molkernels.project_simplex(ints, backend=be.backend), torch.ones_like(ints))


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_batched_and_non_contiguous(be):
    v = randn(2, 3, 4, 5, device=be.device)
    x = molkernels.project_simplex(v, backend=be.backend)
    assert x.shape == v.shape
    check_simplex(x, v)
    vt = randn(5, 8, device=be.device).T  # [8, 5] with column-major strides
    assert not vt.is_contiguous()
    x = molkernels.project_simplex(vt, backend=be.backend)
    check_simplex(x, vt)
    torch.testing.assert_close(x, molkernels.project_simplex(vt.contiguous(), backend=be.backend), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("be", backend_params(), indirect=True)
@pytest.mark.parametrize("dtype", tol.DTYPES, ids=str)
def test_non_finite_row_is_all_nan(be, dtype, bad):
    """A row with a NaN or ±Inf has no projection: it comes back all NaN; other rows are untouched."""
    v = randn(4, 6, dtype=dtype, device=be.device)
    v[2, 3] = bad
    x = molkernels.project_simplex(v, backend=be.backend)
    assert torch.isnan(x[2]).all(), f"row with {bad}: {x[2]}"
    rows = [0, 1, 3]
    check_simplex(x[rows], v[rows])
    single = molkernels.project_simplex(v[2], backend=be.backend)
    assert torch.isnan(single).all()
