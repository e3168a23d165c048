"""Each aggregator's published formula on small cases worked by hand (2-D gradients, exact
answers written out in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

import molkernels as mk
import molkernels.mol as mol
from mol_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def T(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def close(a, b, tol=1e-9):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=tol, rtol=0), f"\n got {a}\n expected {b}"


ORTHO = T([1.0, 0.0], [0.0, 2.0])      # orthogonal, norms 1 and 2
CONFLICT = T([1.0, 0.0], [-1.0, 1.0])  # ⟨g1, g2⟩ = −1


def test_mean_and_linear():
    close(mol.Mean().aggregate(ORTHO), [0.5, 1.0])
    close(mol.Mean().weights(ORTHO @ ORTHO.T), [0.5, 0.5])
    close(mol.Linear([2.0, -1.0]).aggregate(CONFLICT), [3.0, -1.0])   # 2·(1,0) − (−1,1)


def test_mgda():
    # min_w ‖(w, 2(1−w))‖² = w² + 4(1−w)²  →  w = 4/5, d = (0.8, 0.4); ⟨g1,d⟩ = ⟨g2,d⟩ = ‖d‖² = 0.8
    close(mol.MGDA().aggregate(ORTHO), [0.8, 0.4])
    close(mol.MGDA().weights(ORTHO @ ORTHO.T), [0.8, 0.2])
    # g2 = 2 g1: the hull is the segment [g1, 2g1], its min-norm point g1
    close(mol.MGDA().aggregate(T([1.0, 1.0], [2.0, 2.0])), [1.0, 1.0])
    # opposite gradients: 0 is in the hull
    close(mol.MGDA().aggregate(T([1.0, 2.0], [-1.0, -2.0])), [0.0, 0.0])


def test_upgrad():
    # Dual cone of (1,0), (−1,1): C = {x1 ≥ 0, x2 ≥ x1}.
    # π_C(g1): g1 violates x2 ≥ x1; projecting on that half-plane, g1 − (⟨g1,g2⟩/‖g2‖²) g2 = (½, ½) ∈ C.
    # π_C(g2): g2 violates x1 ≥ 0; projecting on it, (0, 1) ∈ C.  d = ½[(½,½) + (0,1)] = (¼, ¾).
    # Weights: (½,½) = 1·g1 + ½·g2 and (0,1) = g1 + g2, so w = ½(1, ½) + ½(1, 1) = (1, ¾).
    agg = mol.UPGrad(reg_eps=1e-12)
    close(agg.aggregate(CONFLICT), [0.25, 0.75], 1e-8)
    close(agg.weights(CONFLICT @ CONFLICT.T), [1.0, 0.75], 1e-8)
    # Non-conflicting gradients are their own projections: UPGrad = mean.
    close(mol.UPGrad(reg_eps=1e-12).aggregate(ORTHO), [0.5, 1.0], 1e-8)
    # A preference vector weights the projections: p = (1, 0) → π_C(g1) = (½, ½).
    close(mol.UPGrad([1.0, 0.0], reg_eps=1e-12).aggregate(CONFLICT), [0.5, 0.5], 1e-8)
    # torchjd's regularisation (reg_eps = 1e-4 of the normalised Gram) moves it by O(1e-4) only.
    close(mol.UPGrad().aggregate(CONFLICT), [0.25, 0.75], 1e-3)


def test_dualproj():
    # mean of (1,0), (−1,1) is (0, ½): ⟨g1, ·⟩ = 0, ⟨g2, ·⟩ = ½, already in the cone.
    close(mol.DualProj(reg_eps=1e-12).aggregate(CONFLICT), [0.0, 0.5], 1e-8)
    # (1,0), (−2,1): mean (−½, ½) violates x1 ≥ 0; its projection (0, ½) satisfies x2 ≥ 2x1.
    close(mol.DualProj(reg_eps=1e-12).aggregate(T([1.0, 0.0], [-2.0, 1.0])), [0.0, 0.5], 1e-8)


def test_pcgrad_two_tasks():
    # g1^PC = g1 − (−1/2) g2 = (½, ½);  g2^PC = g2 − (−1/1) g1 = (0, 1);  d = (½, 3/2)
    close(mol.PCGrad(seed=3).aggregate(CONFLICT), [0.5, 1.5])
    # no conflict: the sum
    close(mol.PCGrad(seed=3).aggregate(ORTHO), [1.0, 2.0])


def _pcgrad_vectors(J, perms):
    """Algorithm 1 of Yu et al. on the vectors themselves, with the given orders."""
    out = torch.zeros(J.shape[1], dtype=J.dtype)
    for i in range(J.shape[0]):
        g = J[i].clone()
        for j in perms[i].tolist():
            if j != i and g @ J[j] < 0:
                g = g - (g @ J[j]) / (J[j] @ J[j]) * J[j]
        out += g
    return out


@pytest.mark.parametrize("K", (3, 4))
def test_pcgrad_order_matters_and_follows_the_seeded_permutations(K):
    J = torch.randn(K, 5, dtype=torch.float64)
    J[1] = -0.5 * J[0] + 0.3 * J[1]        # some conflict
    agg = mol.PCGrad(seed=11)
    twin = mol.PCGrad(seed=11)
    for _ in range(3):
        perms = twin.permutations(K)
        close(agg.aggregate(J), _pcgrad_vectors(J, perms), 1e-12)


def test_cagrad():
    # Orthogonal unit gradients: by symmetry w = (½, ½), g_w = g0 = (½, ½), ‖g0‖ = 1/√2,
    # d = g0 + c‖g0‖ g0/‖g0‖ = (1 + c) g0 = (0.7, 0.7) for c = 0.4.
    close(mol.CAGrad(0.4).aggregate(T([1.0, 0.0], [0.0, 1.0])), [0.7, 0.7], 1e-8)
    close(mol.CAGrad(0.4).weights(torch.eye(2, dtype=torch.float64)), [0.7, 0.7], 1e-8)
    # rescale=True divides by 1 + c² (the official code's default)
    close(mol.CAGrad(0.4, rescale=True).aggregate(T([1.0, 0.0], [0.0, 1.0])), [0.7 / 1.16, 0.7 / 1.16], 1e-8)
    # identical gradients g: d = (1 + c) g
    close(mol.CAGrad(0.5).aggregate(T([3.0, 4.0], [3.0, 4.0])), [4.5, 6.0], 1e-8)
    # c = 0: the mean
    close(mol.CAGrad(0.0).aggregate(ORTHO), [0.5, 1.0])
    # opposite gradients: g0 = 0, d = g0 = 0
    close(mol.CAGrad(0.4).aggregate(T([1.0, 2.0], [-1.0, -2.0])), [0.0, 0.0])


def test_cagrad_two_tasks_against_a_scalar_search():
    # K = 2: w = (t, 1−t); minimise F(t) = ⟨g_w, g0⟩ + c‖g0‖‖g_w‖ by dense search + golden section.
    J = T([1.0, 0.0], [-0.5, 2.0])
    c = 0.6
    g0 = J.mean(0)

    def F(t):
        gw = t * J[0] + (1 - t) * J[1]
        return gw @ g0 + c * g0.norm() * gw.norm()

    grid = torch.linspace(0, 1, 10001, dtype=torch.float64)
    t0 = grid[torch.argmin(torch.stack([F(t) for t in grid]))].item()
    lo, hi = max(t0 - 1e-4, 0.0), min(t0 + 1e-4, 1.0)
    for _ in range(100):
        a, b = lo + (hi - lo) * 0.382, lo + (hi - lo) * 0.618
        if F(a) < F(b):
            hi = b
        else:
            lo = a
    t = 0.5 * (lo + hi)
    gw = t * J[0] + (1 - t) * J[1]
    expected = g0 + c * g0.norm() / gw.norm() * gw
    close(mol.CAGrad(c).aggregate(J), expected, 1e-7)


def test_imtlg():
    # G = diag(1, 4), n = (1, 2): v = G⁻¹n = (1, ½), w = (⅔, ⅓), d = (⅔, ⅔):
    # equal projections ⟨d, e1⟩ = ⟨d, e2⟩ = ⅔ onto the unit gradients.
    close(mol.IMTLG().weights(ORTHO @ ORTHO.T), [2 / 3, 1 / 3])
    close(mol.IMTLG().aggregate(ORTHO), [2 / 3, 2 / 3])
    # CONFLICT: G = [[1, −1], [−1, 2]], n = (1, √2), G⁻¹ = [[2, 1], [1, 1]], v = (2 + √2, 1 + √2)
    v = torch.tensor([2 + math.sqrt(2), 1 + math.sqrt(2)], dtype=torch.float64)
    close(mol.IMTLG().weights(CONFLICT @ CONFLICT.T), v / v.sum())
    # duplicated gradients: G⁺ of [[1,1],[1,1]] is [[¼,¼],[¼,¼]], v = (½, ½): the mean
    close(mol.IMTLG().aggregate(T([0.6, 0.8], [0.6, 0.8])), [0.6, 0.8])


def test_aligned_mtl():
    # G = diag(1, 4): eigenvalues 4, 1, σ_min = 1, B = √1 · diag(1/√1, 1/√4) = diag(1, ½),
    # w = B (½, ½) = (½, ¼), d = (½, ½). Aligned rows B J = I: orthogonal, norm √σ_min = 1.
    close(mol.AlignedMTL().weights(ORTHO @ ORTHO.T), [0.5, 0.25])
    close(mol.AlignedMTL().aggregate(ORTHO), [0.5, 0.5])
    # scale "rmse" uses the mean eigenvalue 5/2: w = √(5/2) (½, ¼)
    close(mol.AlignedMTL(scale_mode="rmse").weights(ORTHO @ ORTHO.T), [math.sqrt(2.5) / 2, math.sqrt(2.5) / 4])
    # "median" of (4, 1) is torch's lower median, 1
    close(mol.AlignedMTL(scale_mode="median").weights(ORTHO @ ORTHO.T), [0.5, 0.25])


def test_nash_mtl():
    # Orthogonal gradients: Gα = 1/α gives α_k = 1/‖g_k‖ = (1, ½), d = (1, 1), ‖d‖ = √K = √2.
    close(mol.NashMTL(max_norm=0.0, reg_eps=1e-14).weights(ORTHO @ ORTHO.T), [1.0, 0.5])
    close(mol.NashMTL(max_norm=0.0, reg_eps=1e-14).aggregate(ORTHO), [1.0, 1.0])
    # max_norm = 1 scales d to unit norm
    close(mol.NashMTL(max_norm=1.0, reg_eps=1e-14).aggregate(ORTHO), [1 / math.sqrt(2), 1 / math.sqrt(2)])
    # unit gradients at cosine ρ: by symmetry α = (a, a), a²(1 + ρ) = 1
    rho = 0.3
    J = T([1.0, 0.0], [rho, math.sqrt(1 - rho ** 2)])
    a = 1 / math.sqrt(1 + rho)
    close(mol.NashMTL(max_norm=0.0, reg_eps=1e-14).weights(J @ J.T), [a, a])
    # the defining property on a random K = 4 problem: ⟨g_k, d⟩ = 1/α_k
    J = torch.randn(4, 9, dtype=torch.float64)
    alpha = mol.NashMTL(max_norm=0.0, reg_eps=1e-14).weights(J @ J.T)
    close(J @ (alpha @ J), 1 / alpha, 1e-9)


def test_modo_one_step_by_hand():
    # λ₀ = (½, ½); M = [[2, 0], [0, 0]], γ = 0.1, ρ = 0: λ − γMλ = (½ − 0.1, ½) = (0.4, 0.5);
    # projection onto the simplex: subtract τ = −0.05 → (0.45, 0.55).
    agg = mol.MoDo(gamma=0.1)
    close(agg.weights(T([2.0, 0.0], [0.0, 0.0])), [0.45, 0.55])
    # d = G₃ᵀλ with the next λ
    J1 = T([1.0, 0.0], [0.0, 1.0])
    agg = mol.MoDo(gamma=0.5, rho=0.1)
    # M = I: λ − 0.5 (1 + 0.1) λ = 0.45 λ = (0.225, 0.225) → projected (½, ½)
    J3 = T([2.0, 0.0], [0.0, 4.0])
    close(agg.aggregate(J1, J1, J3), [1.0, 2.0])


def test_moco_three_steps_by_hand():
    """MoCo's recursion in float64 by hand, against the aggregator (which runs moco_step)."""
    K, beta, gamma, rho = 3, 0.6, 0.3, 0.05
    agg = mol.MoCo(beta=beta, gamma=gamma, rho=rho, beta_decay=0.5, gamma_decay=0.25)
    Y = torch.zeros(K, 7, dtype=torch.float64)
    lam = torch.full((K,), 1 / K, dtype=torch.float64)
    for t in range(3):
        G = torch.randn(K, 7, dtype=torch.float64)
        beta_t, gamma_t = beta / (t + 1) ** 0.5, gamma / (t + 1) ** 0.25
        Y = Y - beta_t * (Y - G)
        lam = mk.reference.project_simplex(lam - gamma_t * (Y @ Y.T @ lam + rho * lam))
        close(agg.aggregate(G), Y.T @ lam, 1e-12)
        close(agg.lam, lam, 1e-12)


def test_famo_weights_and_update_by_hand():
    famo = mol.FAMO(2, w_lr=0.025, gamma=0.0)
    # z = softmax(0) = (½, ½), D = ℓ = (1, 2): c = ½/1 + ½/2 = ¾, w = z/(cD) = (⅔, ⅓)
    close(famo.loss_weights(torch.tensor([1.0, 2.0])), [2 / 3, 1 / 3], 1e-6)
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = famo.weighted_loss([x[0] * 1.0, x[1] * 1.0])   # ℓ = x, so ∂L/∂x = w
    (g,) = torch.autograd.grad(loss, x)
    close(g, [2 / 3, 1 / 3], 1e-6)
    # New losses (½, 2): δ = (log 2, 0), zᵀδ = ½ log 2, ∂(zᵀδ)/∂ξ = z(δ − zᵀδ) = (¼ log 2, −¼ log 2).
    # Adam's first step moves each logit by −lr·sign(grad): ξ = (−0.025, 0.025), so the task whose
    # loss dropped more gets less weight.
    famo.update(torch.tensor([0.5, 2.0]))
    close(famo.logits.detach(), [-0.025, 0.025], 1e-6)
    close(famo.z, torch.softmax(torch.tensor([-0.025, 0.025]), 0), 1e-6)


def test_famo_logit_gradient_equals_autograd_of_softmax():
    """The closed-form ∂(zᵀδ)/∂ξ against autograd (the official code's torch.autograd.grad)."""
    famo = mol.FAMO(4, gamma=0.0, w_lr=0.1)
    with torch.no_grad():
        famo.logits.copy_(torch.randn(4))
    losses = torch.rand(4) + 0.5
    new = losses * (torch.rand(4) + 0.5)
    famo.weighted_loss(list(losses.requires_grad_()))
    xi = famo.logits.detach().clone().requires_grad_()
    delta = torch.log(losses.detach() + 1e-8) - torch.log(new + 1e-8)
    (expected,) = torch.autograd.grad(torch.softmax(xi, -1), xi, grad_outputs=delta)
    opt = torch.optim.Adam([xi], lr=0.1, weight_decay=0.0)
    xi.grad = expected
    opt.step()
    famo.update(new)
    close(famo.logits.detach(), xi.detach(), 1e-6)
