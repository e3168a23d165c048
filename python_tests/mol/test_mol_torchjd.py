"""molkernels.mol against torchjd (a test-only dependency) and independent scipy solves, on random
matrices: K in (2, 3, 5), odd d, generic and degenerate (duplicated, opposite, badly scaled rows).

torchjd's aggregators take the matrix J [K, d] and return the direction [d]; ours are given the
same J as a gradient stack. Where torchjd needs solvers that are not installed (quadprog for the
dual-cone projection, cvxpy for CAGrad and NashMTL), see mol_oracles.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchjd", reason="torchjd (a test-only oracle) is not installed")
pytest.importorskip("scipy", reason="scipy (the oracles' solvers) is not installed")
import torchjd.aggregation as tja  # noqa: E402

import molkernels.mol as mol  # noqa: E402
from mol_helpers import one_thread, random_matrix, rel_err  # noqa: F401
from mol_oracles import cagrad_oracle, nash_oracle, torchjd_dualproj, torchjd_upgrad  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

KS = (2, 3, 5)
DS = (7, 33)
KINDS = ("random", "duplicate", "opposite", "scaled")

# Agreement of the directions, ‖d − d_torchjd‖ / ‖d_torchjd‖, in float64. Measured worst cases over
# these matrices: UPGrad 1e-13, DualProj 3e-14, IMTL-G 6e-13, Aligned-MTL 1e-14, PCGrad 7e-16.
TOL64 = 1e-9
# Rows whose norms span 4 orders of magnitude: a Gram with condition number ~1e8 or worse, where
# the pseudo-inverse and eigendecomposition themselves are only good to ~cond·ε (both libraries).
TOL64_SCALED = 1e-6
# float32 inputs: torchjd computes in float32, ours in float64 from the float32 Gram.
TOL32 = 2e-4


def _scale(J):
    return 1e-6 * J.double().norm().item()


def _cases():
    return [(K, d, kind) for K in KS for d in DS for kind in KINDS if not (kind == "opposite" and K == 2 and d == 33)]


@pytest.mark.parametrize("K,d,kind", _cases())
def test_upgrad_dualproj_match_torchjd(K, d, kind):
    J = random_matrix(K, d, kind=kind)
    assert rel_err(mol.UPGrad().aggregate(J), torchjd_upgrad(J), _scale(J)) < TOL64
    assert rel_err(mol.DualProj().aggregate(J), torchjd_dualproj(J), _scale(J)) < TOL64
    pref = torch.rand(K, dtype=torch.float64) + 0.1
    assert rel_err(mol.UPGrad(pref).aggregate(J), torchjd_upgrad(J, pref), _scale(J)) < TOL64
    assert rel_err(mol.DualProj(pref).aggregate(J), torchjd_dualproj(J, pref), _scale(J)) < TOL64


@pytest.mark.parametrize("K,d,kind", _cases())
def test_imtlg_aligned_mean_linear_match_torchjd(K, d, kind):
    J = random_matrix(K, d, kind=kind)
    tol = TOL64_SCALED if kind == "scaled" else TOL64
    assert rel_err(mol.IMTLG().aggregate(J), tja.IMTLG()(J), _scale(J)) < tol
    for mode in ("min", "median", "rmse"):
        assert rel_err(mol.AlignedMTL(scale_mode=mode).aggregate(J), tja.AlignedMTL(scale_mode=mode)(J),
                       _scale(J)) < tol, mode
    pref = torch.rand(K, dtype=torch.float64)
    assert rel_err(mol.AlignedMTL(pref).aggregate(J), tja.AlignedMTL(pref)(J), _scale(J)) < tol
    assert rel_err(mol.Mean().aggregate(J), tja.Mean()(J), _scale(J)) < 1e-14
    w = torch.randn(K, dtype=torch.float64)
    assert rel_err(mol.Linear(w).aggregate(J), tja.Constant(w)(J), _scale(J)) < 1e-14


@pytest.mark.parametrize("K,d,kind", _cases())
def test_pcgrad_matches_torchjd_with_the_same_seed(K, d, kind):
    """torchjd draws torch.randperm from the global generator; PCGrad(seed=s) from its own, seeded
    the same way: the same permutations, so the same direction, step after step."""
    J = random_matrix(K, d, kind=kind)
    seed = 1234 + K * 10 + d
    ours = mol.PCGrad(seed=seed)
    torch.manual_seed(seed)
    reference = tja.PCGrad()
    for _ in range(3):
        expected = reference(J)
        assert rel_err(ours.aggregate(J), expected, _scale(J)) < 1e-12


@pytest.mark.parametrize("K,d,kind", _cases())
def test_mgda_is_exact_where_torchjd_frank_wolfe_approximates(K, d, kind):
    """torchjd's MGDA runs Frank-Wolfe (approximate); ours is exact. So ‖d‖² ≤ ‖d_tjd‖², and since
    ‖x‖² − ‖x*‖² ≥ ‖x − x*‖² on the hull for the min-norm point x*, ‖d − d_tjd‖² ≤ ‖d_tjd‖² − ‖d‖²."""
    J = random_matrix(K, d, kind=kind)
    d_ours = mol.MGDA().aggregate(J)
    d_tjd = tja.MGDA(epsilon=1e-12, max_iters=5000)(J)
    gap = d_tjd.norm() ** 2 - d_ours.norm() ** 2
    slack = 1e-12 * J.norm() ** 2
    assert gap >= -slack
    assert (d_ours - d_tjd).norm() ** 2 <= gap + slack
    assert rel_err(d_ours, d_tjd, _scale(J)) < 0.05 or d_tjd.norm() < 0.05 * J.norm()


@pytest.mark.parametrize("K", KS)
def test_float32_inputs_match_torchjd(K):
    J = random_matrix(K, 33, dtype=torch.float32)
    for ours, theirs in ((mol.UPGrad(), lambda m: torchjd_upgrad(m)), (mol.DualProj(), lambda m: torchjd_dualproj(m)),
                         (mol.IMTLG(), tja.IMTLG()), (mol.AlignedMTL(), tja.AlignedMTL())):
        d = ours.aggregate(J)
        assert d.dtype == torch.float32
        assert rel_err(d, theirs(J), _scale(J)) < TOL32, type(ours).__name__


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("d", DS)
def test_modo_weights_match_torchjd(K, d):
    """MoDo's λ update from G₁G₂ᵀ, step after step, against torchjd's MoDoWeighting."""
    ours = mol.MoDo(gamma=0.3, rho=0.05)
    theirs = tja.MoDoWeighting(gamma=0.3, rho=0.05)
    for _ in range(4):
        J1, J2 = random_matrix(K, d), random_matrix(K, d)
        M = J1 @ J2.T
        assert rel_err(ours.weights(M), theirs(M), 1e-12) < 1e-12


def _cagrad_inner(weights: torch.Tensor, K: int) -> torch.Tensor:
    """w ∈ Δ from CAGrad's weights 1/K + s·w (s = c‖g₀‖/‖g_w‖ > 0)."""
    excess = weights.double() - 1.0 / K
    return excess / excess.sum()


def _cagrad_objective(w: torch.Tensor, G: torch.Tensor, c: float) -> torch.Tensor:
    mean = torch.full_like(w, 1.0 / w.numel())
    return w @ G @ mean + c * (mean @ G @ mean).sqrt() * (w @ G @ w).sqrt()


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("kind", ("random", "scaled"))
@pytest.mark.parametrize("c", (0.4, 0.9))
def test_cagrad_is_optimal_and_matches_scipy(K, d, kind, c):
    """CAGrad's dual problem F(w) = wᵀG1̄ + c‖g₀‖√(wᵀGw) over the simplex: our w satisfies the KKT
    conditions (∇F_i ≥ wᵀ∇F, with equality on the support: a certificate of the minimum of this
    convex problem), is at least as good as SLSQP (the official code's solver, tight tolerances,
    several starts), and on well-scaled gradients gives SLSQP's direction. (On rows whose norms
    span 4 orders of magnitude SLSQP itself stops short; F is lower at ours.) Generic K ≤ d
    gradients: 0 is not in their hull."""
    J = random_matrix(K, d, kind=kind)
    G = J @ J.T
    Gn = G / G.trace()
    weights = mol.CAGrad(c).weights(G)
    w = _cagrad_inner(weights, K)
    assert (w >= -1e-12).all()
    mean = torch.full((K,), 1.0 / K, dtype=torch.float64)
    grad = Gn @ mean + c * (mean @ Gn @ mean).sqrt() * (Gn @ w) / (w @ Gn @ w).sqrt()
    mu = w @ grad
    scale = grad.abs().max()
    assert (grad - mu >= -1e-7 * scale).all(), (grad - mu) / scale
    support = w > 1e-6
    assert ((grad - mu)[support].abs() <= 1e-7 * scale).all(), (grad - mu) / scale
    expected_weights = torch.as_tensor(cagrad_oracle(G.numpy(), c))
    f_ours = _cagrad_objective(w, Gn, c)
    f_scipy = _cagrad_objective(_cagrad_inner(expected_weights, K), Gn, c)
    assert f_ours <= f_scipy + 1e-12
    if kind == "random":
        assert rel_err(mol.CAGrad(c).aggregate(J), expected_weights @ J, _scale(J)) < 1e-6
        rescaled = mol.CAGrad(c, rescale=True).aggregate(J)
        assert rel_err(rescaled, expected_weights @ J / (1 + c ** 2), _scale(J)) < 1e-6


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("kind", ("random", "scaled"))
def test_nash_matches_scipy_solution(K, d, kind):
    """Gα = 1/α solved independently (BFGS in log coordinates + Newton polish)."""
    J = random_matrix(K, d, kind=kind)
    G = J @ J.T
    alpha = torch.as_tensor(nash_oracle(G.numpy()))
    ours = mol.NashMTL(max_norm=0.0, reg_eps=1e-13)
    assert rel_err(ours.weights(G), alpha, 1e-300) < 1e-8
    clipped = mol.NashMTL(max_norm=1.0, reg_eps=1e-13).aggregate(J)
    expected = alpha @ J
    assert rel_err(clipped, expected / expected.norm(), 1e-12) < 1e-8


@pytest.mark.parametrize("K", (2, 3, 5, 16))
def test_dual_cone_solver_matches_nnls_on_hard_grams(K):
    """The QP min vᵀGv s.t. v ≥ u through min_norm, on ill-conditioned and rank-deficient Grams
    (regularised), against NNLS: weights (not only directions) agree."""
    from mol_oracles import nnls_project
    from molkernels.mol.dualcone import project_weights, regularized

    for d in (3, K, 4 * K + 1):
        J = random_matrix(K, d, kind="scaled")
        G = regularized(J @ J.T, 1e-6)
        U = torch.randn(4, K, dtype=torch.float64).abs()
        V = project_weights(G, U)
        for u, v in zip(U, V):
            expected = torch.as_tensor(nnls_project(G.numpy(), u.numpy()))
            assert (v >= u - 1e-12).all()
            assert rel_err(v, expected, 1e-12) < 1e-7
