"""The simulator's problems: x*_t against direct float64 solves, batched gradients against autograd
per client, the spectrum's condition number, fresh objectives on join."""

import pytest
import torch

from molkernels.federated.problems import LogRegProblem, QuadraticProblem, make_problem


def _active(C, seed=0, p=0.6):
    g = torch.Generator().manual_seed(seed)
    active = torch.rand(C, generator=g) < p
    active[0] = True
    return active


@pytest.mark.parametrize("basis", ["random", "identity"])
@pytest.mark.parametrize("kappa", [1.0, 30.0, 1e4])
def test_quadratic_optimum_matches_a_direct_solve(basis, kappa):
    C, D = 12, 7
    prob = QuadraticProblem(C, D, kappa=kappa, basis=basis, dtype=torch.float64)
    prob.reset(torch.Generator().manual_seed(1))
    active = _active(C)
    w = prob.sizes()
    A, b = prob.matrices(), prob.centres()
    wa = torch.where(active, w, 0.0).double()
    H = (wa[:, None, None] * A).sum(0)
    r = (wa[:, None] * torch.einsum("cij,cj->ci", A, b)).sum(0)
    direct = torch.linalg.solve(H, r)
    x = prob.optimum(active, w)
    assert x.dtype == torch.float64
    assert torch.allclose(x, direct, rtol=1e-9, atol=1e-10 * max(1.0, float(direct.abs().max())))
    # and the gradient of the population objective vanishes there
    grad = (wa[:, None] * torch.einsum("cij,cj->ci", A, x - b)).sum(0)
    assert float(grad.abs().max()) < 1e-9


def test_quadratic_spectrum_has_the_condition_number():
    prob = QuadraticProblem(20, 9, kappa=50.0, curvature_spread=1.0, dtype=torch.float64)
    prob.reset(torch.Generator().manual_seed(2))
    eig = torch.linalg.eigvalsh(prob.matrices())
    assert torch.allclose(eig.amax(1), torch.ones(20, dtype=torch.float64), rtol=1e-9)
    assert torch.allclose(eig.amin(1), torch.full((20,), 1 / 50.0, dtype=torch.float64), rtol=1e-9)
    assert not torch.allclose(prob.lam[0], prob.lam[1])  # curvatures differ between clients


@pytest.mark.parametrize("problem", ["quadratic", "logreg"])
def test_batched_gradient_equals_autograd_per_client(problem):
    C = 6
    prob = make_problem(problem, C, dim=5, kappa=20.0, sigma=0.0, dtype=torch.float64)
    prob.reset(torch.Generator().manual_seed(3))
    X = torch.randn(C, prob.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    G = prob.grad(X.clone(), torch.Generator())
    for c in range(C):
        x = X[c].clone().requires_grad_(True)
        if problem == "quadratic":
            A, b = prob.matrices()[c], prob.centres()[c]
            f = 0.5 * (x - b) @ A @ (x - b)
        else:
            n = int(prob.n[c])
            a, y = prob.X[c, :n].double(), prob.y[c, :n].double()
            z = a @ x
            f = (torch.nn.functional.softplus(z) - y * z).mean() + 0.5 * prob.mu * (x @ x)
        (g,) = torch.autograd.grad(f, x)
        assert torch.allclose(G[c], g, rtol=1e-10, atol=1e-12)


def test_gradient_noise_has_variance_sigma_squared():
    C, D, sigma = 2000, 10, 3.0
    prob = QuadraticProblem(C, D, sigma=sigma, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    prob.reset(g)
    X = torch.zeros(C, D, dtype=torch.float64)
    noise = prob.grad(X, g) - QuadraticProblem.grad(_noiseless(prob), X, g)
    assert float((noise ** 2).sum(1).mean()) == pytest.approx(sigma ** 2, rel=0.05)


def _noiseless(prob):
    clone = QuadraticProblem.__new__(QuadraticProblem)
    clone.__dict__.update(prob.__dict__)
    clone.sigma = 0.0
    return clone


@pytest.mark.parametrize("dataset", ["breast_cancer", "digits"])
def test_logreg_optimum_is_stationary(dataset):
    C = 15
    prob = LogRegProblem(C, dataset=dataset, kappa=100.0, dtype=torch.float64)
    prob.reset(torch.Generator().manual_seed(6))
    active = _active(C, seed=7)
    w = prob.sizes()
    x = prob.optimum(active, w)
    # the gradient of F_t = Σ w_c f_c / Σ w_c, from the clients' own (batched, noiseless) gradients
    prob.sigma = 0.0
    G = prob.grad(x.expand(C, -1).clone(), torch.Generator())
    wa = torch.where(active, w, 0.0)
    grad = (wa[:, None] * G).sum(0) / wa.sum()
    assert float(torch.linalg.vector_norm(grad)) < 1e-10
    # and it is the minimum: any small step increases F_t
    f = prob.objective(x, active, w)
    for _ in range(5):
        assert prob.objective(x + 1e-3 * torch.randn_like(x), active, w) > f


def test_logreg_scaling_and_label_skew():
    prob = LogRegProblem(40, kappa=11.0, label_skew=0.1)
    A = prob.A_all
    L = 0.25 * float(torch.linalg.eigvalsh(A.T @ A / A.shape[0]).max())
    assert L == pytest.approx(1.0, rel=1e-9) and prob.mu == pytest.approx(0.1)
    prob.reset(torch.Generator().manual_seed(8))
    n = prob.n.long()
    assert bool((n >= prob.min_size).all() and (n <= prob.max_size).all())
    assert torch.equal(prob.mask.sum(1).long(), n)
    # α = 0.1: most clients hold (almost) one class only
    frac = (prob.y * prob.mask).sum(1) / prob.n
    assert float(((frac < 0.1) | (frac > 0.9)).float().mean()) > 0.6


@pytest.mark.parametrize("problem", ["quadratic", "logreg"])
def test_renew_changes_only_joined_slots(problem):
    C = 8
    prob = make_problem(problem, C, dim=4)
    g = torch.Generator().manual_seed(9)
    prob.reset(g)
    before = {k: v.clone() for k, v in prob.state_dict().items()}
    joined = torch.tensor([True, False, False, True, False, False, False, True])
    prob.renew(joined, g)
    after = prob.state_dict()
    for name in ("bq", "lam", "n") if problem == "quadratic" else ("X", "idx", "n"):
        assert torch.equal(after[name][~joined], before[name][~joined]), name
        assert not torch.equal(after[name][joined], before[name][joined]), name


@pytest.mark.parametrize("kwargs, name", [
    (dict(kappa=0.5), "kappa"), (dict(kappa=float("inf")), "kappa"), (dict(sigma=-1.0), "sigma"),
    (dict(dim=0), "dim"), (dict(curvature_spread=2.0), "curvature_spread"), (dict(basis="fourier"), "basis"),
])
def test_quadratic_bad_arguments(kwargs, name):
    args = dict(clients=4, dim=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        QuadraticProblem(**args)


def test_logreg_bad_arguments_and_unknown_problem():
    with pytest.raises(ValueError, match="kappa"):
        LogRegProblem(4, kappa=1.0)
    with pytest.raises(ValueError, match="mnist"):
        LogRegProblem(4, dataset="mnist")
    with pytest.raises(ValueError, match="lasso"):
        make_problem("lasso", 4)
    with pytest.raises(ValueError, match="clients"):
        make_problem("quadratic", 0)
