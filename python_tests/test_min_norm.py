"""molkernels.min_norm: λ = argmin over the simplex of λᵀGλ, on every backend.

Optimality is checked two ways: against the float64 reference (FISTA, an algorithm independent of
the kernels' Wolfe active set), and by the KKT conditions, which certify a minimum of the convex
problem on their own: λ on the simplex, (Gλ)_i ≥ λᵀGλ for every i, with equality where λ_i > 0.
"""

import functools

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
from stacks import backend_params, cases, check_min_norm_kkt, poison_allocator

MIN_NORM_KS = (1, 2, 3, 7, 16, 33, 64)
LOW_PRECISION = (torch.float16, torch.bfloat16)
# The reference backend is the oracle itself, FISTA with 20000 iterations (seconds per call): it is
# tested once, in test_reference_backend, and the reference solutions are checked in
# test_reference_solutions_are_optimal.
SLOW = ("reference",)
# Under Triton's interpreter the Wolfe loop costs ~2.5 s per K = 33 matrix and ~4 s per K = 64 one:
# the degenerate-case tests stop at K = 16 there, and test_matches_reference runs K = 33 and 64 in
# float32 only, on two of the matrices.
INTERPRETED_MAX_K = 16


def _min_norm_cases(Ks, dtypes=tol.DTYPES):
    def axes(spec):
        return [
            (K, dtype)
            for K in Ks
            for dtype in dtypes
            if not spec.interpreted or K <= INTERPRETED_MAX_K
        ]

    return cases(axes, exclude=SLOW)


def _gram(A: torch.Tensor) -> torch.Tensor:
    return A @ A.transpose(-1, -2)


def _integer_gradients(K, m, low, high, generator):
    return torch.randint(low, high, (K, m), generator=generator).to(torch.float64)


@functools.lru_cache(maxsize=None)
def problems(K: int):
    """{dtype: (G [B, K, K] in dtype, λ* [B, K] float64 from the reference on those very values)}.

    Scenarios: random gradients (full rank), gradients sharing a common component (f* > 0, the
    optimum inside a face), and integer gradients of rank 1, 2, about K/2 and full rank (exact in
    every dtype, so exactly singular Grams stay exactly PSD); each at three power-of-two scales.
    The reference runs once per K for all dtypes together (it costs seconds per call)."""
    generator = torch.Generator().manual_seed(1000 + K)
    scenarios = {
        "random": lambda: torch.randn(K, 2 * K + 4, generator=generator, dtype=torch.float64),
        "common": lambda: torch.randn(K, K + 2, generator=generator, dtype=torch.float64)
        + 3.0 * torch.randn(1, K + 2, generator=generator, dtype=torch.float64),
        "rank1": lambda: _integer_gradients(K, 1, -3, 4, generator),
        "rank2": lambda: _integer_gradients(K, 2, -3, 4, generator),
        "half_rank": lambda: _integer_gradients(K, K // 2 + 1, -1, 2, generator),
        "full_rank_int": lambda: _integer_gradients(K, K + 3, -1, 2, generator),
    }
    inputs = {}
    for dtype in tol.DTYPES:
        low = dtype in LOW_PRECISION
        scales = (2.0**-4, 1.0, 2.0**4) if low else (2.0**-10, 1.0, 2.0**10)
        grams = []
        for name, draw in scenarios.items():
            if low and name == "common":
                continue  # ill-conditioned: rounding G to 16 bits can make it indefinite
            for scale in scales:
                grams.append(_gram(draw()) * scale)
        inputs[dtype] = torch.stack(grams).to(dtype)
    if K == 1:
        return {dtype: (G, torch.ones(G.shape[:-1], dtype=torch.float64)) for dtype, G in inputs.items()}
    together = torch.cat([G.to(torch.float64) for G in inputs.values()])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the oracle's tiny batched matmuls run ~5x faster on one thread
    try:
        lam = molkernels.reference.min_norm(together)
    finally:
        torch.set_num_threads(threads)
    out, start = {}, 0
    for dtype, G in inputs.items():
        out[dtype] = (G, lam[start:start + G.shape[0]])
        start += G.shape[0]
    return out


@pytest.mark.parametrize(
    "be,K,dtype",
    cases(
        lambda spec: [
            (K, dtype)
            for K in MIN_NORM_KS
            for dtype in tol.DTYPES
            if not spec.interpreted or K <= INTERPRETED_MAX_K or dtype == torch.float32
        ],
        exclude=SLOW,
    ),
    indirect=["be"],
)
def test_matches_reference(be, K, dtype):
    G, lam_ref = problems(K)[dtype]
    if be.interpreted and K > INTERPRETED_MAX_K:
        # scale 1 of the scenarios "common" and "half_rank" (three scales per scenario, in order)
        G, lam_ref = G[[4, 13]], lam_ref[[4, 13]]
    poison_allocator(G.shape[0] * K, device=be.device)
    lam = molkernels.min_norm(G.to(be.device), backend=be.backend)
    check_min_norm_kkt(lam, G.to(be.device), reference_lambda=lam_ref)


def _closed_form_k2(G: torch.Tensor) -> torch.Tensor:
    G = G.to(torch.float64)
    g00, g11 = G[..., 0, 0], G[..., 1, 1]
    g01 = 0.5 * (G[..., 0, 1] + G[..., 1, 0])
    curvature = g00 - 2 * g01 + g11
    t = ((g11 - g01) / curvature).clamp(0.0, 1.0)
    return torch.stack([t, 1 - t], dim=-1)


@pytest.mark.parametrize("be", backend_params(exclude=SLOW), indirect=True)
@pytest.mark.parametrize("dtype", tol.DTYPES, ids=str)
def test_k2_closed_form(be, dtype):
    """K = 2: λ_0 = clip((G11 − G01) / (G00 − 2 G01 + G11), 0, 1), up to rounding to dtype."""
    crafted = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 4.0]],  # orthogonal: (0.8, 0.2)
            [[4.0, 2.0], [2.0, 1.0]],  # g1 = g0 / 2: all weight on g1
            [[1.0, 2.0], [2.0, 4.0]],  # g1 = 2 g0: all weight on g0
            [[1.0, -1.0], [-1.0, 1.0]],  # opposite: (0.5, 0.5), f = 0
            [[1.0, -0.5], [-0.5, 0.25]],  # g1 = −g0 / 2: (1/3, 2/3), f = 0
            [[2.0, 1.0], [1.0, 3.0]],
        ],
        dtype=torch.float64,
    )
    random = _gram(torch.randn(20, 2, 5, dtype=torch.float64))
    G = torch.cat([crafted, random]).to(dtype)
    lam = molkernels.min_norm(G.to(be.device), backend=be.backend)
    expected = _closed_form_k2(G)
    error = (lam.cpu().double() - expected).abs()
    assert (error <= 2 * tol.u_out(dtype) + 1e-14).all(), f"max error {error.max().item():.3g}\n{lam}\n{expected}"
    check_min_norm_kkt(lam, G.to(be.device))
    # representable answers come out exactly (0.8 and 0.2 above are only checked up to rounding)
    exact = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]], dtype=dtype)
    assert torch.equal(lam[1:4].cpu(), exact), f"{lam[1:4]}"


@pytest.mark.parametrize("be,K,dtype", _min_norm_cases([2, 3, 7, 16, 33, 64]), indirect=["be"])
def test_zero_gram_gives_uniform(be, K, dtype):
    lam = molkernels.min_norm(torch.zeros(K, K, dtype=dtype, device=be.device), backend=be.backend)
    expected = torch.full((K,), 1.0 / K, dtype=torch.float64)
    assert ((lam.cpu().double() - expected).abs() <= 2 * tol.u_out(dtype) / K).all(), f"{lam}"


@pytest.mark.parametrize("be,K,dtype", _min_norm_cases([2, 3, 7, 33, 64]), indirect=["be"])
def test_one_zero_gradient_takes_all_weight(be, K, dtype):
    A = torch.randn(K, K + 4, dtype=torch.float64)
    zero = K // 2
    A[zero] = 0.0
    G = _gram(A).to(dtype).to(be.device)
    lam = molkernels.min_norm(G, backend=be.backend).cpu().double()
    expected = torch.zeros(K, dtype=torch.float64)
    expected[zero] = 1.0
    assert ((lam - expected).abs() <= tol.MIN_NORM[dtype].simplex_sum).all(), f"{lam}"


@pytest.mark.parametrize("be", backend_params(exclude=SLOW), indirect=True)
@pytest.mark.parametrize("dtype", tol.DTYPES, ids=str)
def test_collinear(be, dtype):
    g = torch.randn(1, 9, dtype=torch.float64)
    # same direction, lengths 1, 1/2, 2: all weight on the shortest
    same = _gram(torch.cat([g, 0.5 * g, 2.0 * g])).to(dtype)
    lam = molkernels.min_norm(same.to(be.device), backend=be.backend)
    check_min_norm_kkt(lam, same.to(be.device))
    assert (lam.cpu().double() - torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)).abs().max() <= 8 * tol.u_out(dtype)
    # opposite directions: zero is in the hull, f* = 0, and many λ are optimal
    opposite = _gram(torch.cat([g, -g, 2.0 * g, -0.5 * g])).to(dtype)
    lam = molkernels.min_norm(opposite.to(be.device), backend=be.backend)
    check_min_norm_kkt(lam, opposite.to(be.device))


@pytest.mark.parametrize("be,K,dtype", _min_norm_cases([3, 7, 16, 33, 64]), indirect=["be"])
def test_duplicated_gradients(be, K, dtype):
    A = torch.randn(K, K + 4, dtype=torch.float64)
    A[1] = A[0]
    A[-1] = A[0]
    G = _gram(A).to(dtype).to(be.device)
    lam = molkernels.min_norm(G, backend=be.backend)
    check_min_norm_kkt(lam, G)


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("be,K,dtype", _min_norm_cases([3, 7, 16, 33, 64]), indirect=["be"])
def test_rank_deficient(be, rank, K, dtype):
    A = torch.randn(K, rank, dtype=torch.float64) + torch.randn(1, rank, dtype=torch.float64)
    G = _gram(A).to(dtype).to(be.device)
    lam = molkernels.min_norm(G, backend=be.backend)
    check_min_norm_kkt(lam, G)


@pytest.mark.parametrize("be", backend_params(exclude=SLOW), indirect=True)
@pytest.mark.parametrize("dtype", tol.DTYPES, ids=str)
def test_batched(be, dtype):
    """gram [B1, B2, K, K] gives λ [B1, B2, K], each the solution of its own matrix."""
    K = 5
    G = _gram(torch.randn(2, 3, K, K + 1, dtype=torch.float64))
    G[0, 1] = 0.0  # a zero Gram inside a batch
    G[1, 2] = _gram(torch.randn(K, 1, dtype=torch.float64))  # rank 1
    G = G.to(dtype).to(be.device)
    lam = molkernels.min_norm(G, backend=be.backend)
    assert lam.shape == (2, 3, K)
    check_min_norm_kkt(lam, G)
    for i in range(2):
        for j in range(3):
            single = molkernels.min_norm(G[i, j], backend=be.backend)
            torch.testing.assert_close(lam[i, j], single, rtol=0, atol=4 * tol.u_out(dtype) + 1e-12)


@pytest.mark.parametrize("be", backend_params(exclude=SLOW), indirect=True)
def test_non_contiguous_gram(be):
    """A batch of Grams that are strided views into a larger buffer."""
    K = 6
    big = torch.randn(4, K + 2, K + 2, dtype=torch.float64)
    big = big + big.transpose(-1, -2)
    G = _gram(torch.randn(4, K, K + 3, dtype=torch.float64))
    big[:, 1 : K + 1, 1 : K + 1] = G
    view = big.to(be.device)[:, 1 : K + 1, 1 : K + 1]
    assert not view.is_contiguous()
    lam = molkernels.min_norm(view, backend=be.backend)
    check_min_norm_kkt(lam, view)
    torch.testing.assert_close(lam, molkernels.min_norm(view.contiguous(), backend=be.backend), rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("K", [1, 2, 3, 7])
@pytest.mark.parametrize("be", backend_params(exclude=SLOW), indirect=True)
@pytest.mark.parametrize("dtype", tol.DTYPES, ids=str)
def test_non_finite_gram_gives_nan(be, dtype, K, bad):
    """A non-finite entry anywhere in one Gram of a batch makes that λ all NaN (also on the closed
    forms for K = 1 and 2); the other Grams of the batch are solved normally."""
    G = _gram(torch.randn(3, K, K + 2, dtype=torch.float64)).to(dtype)
    G[1, 0, K - 1] = bad
    G = G.to(be.device)
    lam = molkernels.min_norm(G, backend=be.backend)
    assert torch.isnan(lam[1]).all(), f"{lam[1]}"
    check_min_norm_kkt(lam[[0, 2]], G[[0, 2]])


def _property_test(be, max_examples):
    if given is None:
        pytest.skip("hypothesis is not installed")
    @settings(max_examples=max_examples, deadline=None)
    @given(
        A=st.tuples(st.integers(1, 10), st.integers(1, 10)).flatmap(
            lambda shape: hnp.arrays(
                np.float64,
                shape,
                elements=st.one_of(
                    st.floats(-10, 10, allow_nan=False, allow_infinity=False),
                    st.sampled_from([0.0, 1.0, -1.0, 2.0]),  # duplicates, zero rows, collinear rows
                ),
            )
        ),
        duplicate=st.booleans(),
        scale=st.sampled_from([2.0**-20, 1.0, 2.0**20]),
        dtype=st.sampled_from([torch.float32, torch.float64]),
    )
    def run(A, duplicate, scale, dtype):
        A = torch.from_numpy(A)
        if duplicate and A.shape[0] > 1:
            A[-1] = A[0]
        G = (_gram(A) * scale).to(dtype).to(be.device)
        lam = molkernels.min_norm(G, backend=be.backend)
        check_min_norm_kkt(lam, G)

    run()


@pytest.mark.parametrize("be", backend_params(exclude=SLOW), indirect=True)
def test_property_kkt(be):
    """Hypothesis: Grams of random (often degenerate) gradients; the result satisfies the KKT
    conditions, which certify the minimum."""
    _property_test(be, 15 if be.interpreted else 200)


@pytest.mark.parametrize("K", MIN_NORM_KS)
def test_reference_solutions_are_optimal(K):
    """The oracle itself: its float64 solutions satisfy the KKT conditions."""
    G, lam_ref = problems(K)[torch.float64]
    check_min_norm_kkt(lam_ref, G)


@pytest.mark.parametrize("be", [p for p in backend_params() if p.values[0].backend == "reference"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_reference_backend(be, dtype):
    """The reference backend returns λ in gram's dtype, NaN for a non-finite Gram, 1 for K = 1,
    uniform weights for a zero Gram, and an optimal λ otherwise (one batched call: it is slow)."""
    K = 4
    G = _gram(torch.randn(4, K, K + 1, dtype=torch.float64))
    G[1] = 0.0
    G[2, 1, 2] = float("nan")
    G = G.to(dtype).to(be.device)
    lam = molkernels.min_norm(G, backend=be.backend)
    assert lam.shape == (4, K) and lam.dtype == dtype
    assert torch.isnan(lam[2]).all()
    assert torch.equal(lam[1].cpu(), torch.full((K,), 0.25, dtype=dtype))
    check_min_norm_kkt(lam[[0, 1, 3]], G[[0, 1, 3]])
    one = molkernels.min_norm(torch.full((2, 1, 1), 3.0, dtype=dtype, device=be.device), backend=be.backend)
    assert torch.equal(one.cpu(), torch.ones(2, 1, dtype=dtype))


@pytest.mark.triton
@pytest.mark.parametrize("sum_axis", [0, 1])
@pytest.mark.parametrize("K", [33, 64])
def test_triton_large_tile_either_layout(sum_axis, K, monkeypatch):
    """Above 32 rows the Triton kernel sums its vectors down columns or along rows, whichever the
    installed Triton keeps in registers on sm_90 (LARGE_TILE_SUM_AXIS): both layouts must solve
    the problem, since the GPU machine's Triton takes the one this machine's may not."""
    from conftest import INTERPRETED  # here: benchmarks/gpu_check loads this file as a plain module

    if not INTERPRETED:
        pytest.skip("runs the Triton kernel on CPU tensors under TRITON_INTERPRET=1")
    import importlib

    triton_min_norm = importlib.import_module("molkernels.triton.min_norm")  # the module, not the function
    monkeypatch.setattr(triton_min_norm, "LARGE_TILE_SUM_AXIS", sum_axis)
    G, lam_ref = problems(K)[torch.float32]
    G, lam_ref = G[[4, 13]], lam_ref[[4, 13]]
    check_min_norm_kkt(triton_min_norm.min_norm(G), G, reference_lambda=lam_ref)
