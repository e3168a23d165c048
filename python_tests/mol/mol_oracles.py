"""Test-only oracles for molkernels.mol: torchjd's aggregators (a test-only dependency) and
independent scipy solves of the published problems torchjd cannot run here.

torchjd's default dual-cone projector needs quadprog/qpsolvers, and its CAGrad and NashMTL need
cvxpy; none is installed. UPGrad and DualProj are therefore run as torchjd's own classes with a
DualConeProjector that solves the very same QP (torchjd's normalize + regularize of the Gram, then
min vᵀGv s.t. v ≥ u) exactly by non-negative least squares (scipy.optimize.nnls, Lawson–Hanson):
with G = LLᵀ and v = u + x, vᵀGv = ‖Lᵀx + Lᵀu‖², x ≥ 0. CAGrad and Nash-MTL are solved from
their published formulations with scipy (SLSQP from several starts; a root solve of Gα = 1/α).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize, nnls

import torchjd.aggregation as tja
from torchjd._linalg import DualConeProjector, normalize, regularize


class NNLSProjector(DualConeProjector):
    """torchjd's QuadprogProjector (same normalize/regularize, same QP), solved by scipy's NNLS."""

    def __init__(self, norm_eps: float = 1e-4, reg_eps: float = 1e-4):
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps

    def __call__(self, U: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
        G = regularize(normalize(G, self.norm_eps), self.reg_eps)
        G_ = G.detach().cpu().double().numpy()
        U_ = U.detach().cpu().double().numpy()
        W = np.apply_along_axis(lambda u: nnls_project(G_, u), -1, U_)
        return torch.as_tensor(W, dtype=G.dtype, device=G.device)


def nnls_project(G: np.ndarray, u: np.ndarray) -> np.ndarray:
    """argmin vᵀGv subject to v ≥ u, G positive definite, by NNLS."""
    L = np.linalg.cholesky(0.5 * (G + G.T))
    x, _ = nnls(L.T, -L.T @ u, maxiter=100 * len(u))
    return u + x


def torchjd_upgrad(J, pref_vector=None):
    return tja.UPGrad(pref_vector=pref_vector, projector=NNLSProjector())(J)


def torchjd_dualproj(J, pref_vector=None):
    return tja.DualProj(pref_vector=pref_vector, projector=NNLSProjector())(J)


def cagrad_oracle(G: np.ndarray, c: float) -> np.ndarray:
    """The CAGrad weights 1/K + c‖g₀‖/‖g_w‖ · w, with w = argmin_{w∈Δ} wᵀG1̄ + c‖g₀‖√(wᵀGw) solved
    by SLSQP (as the official code) with tight tolerances, from the centre and every near-vertex."""
    K = G.shape[0]
    b = np.full(K, 1.0 / K)
    phi = c * np.sqrt(b @ G @ b)
    best = None
    for start in [b] + [0.9 * np.eye(K)[k] + 0.1 / K for k in range(K)]:
        res = minimize(lambda x: x @ G @ b + phi * np.sqrt(max(x @ G @ x, 0.0) + 1e-30), start,
                       bounds=[(0.0, 1.0)] * K, constraints=({"type": "eq", "fun": lambda x: 1.0 - x.sum()},),
                       method="SLSQP", options=dict(ftol=1e-15, maxiter=2000))
        if best is None or res.fun < best.fun:
            best = res
    w = best.x
    return b + phi / np.sqrt(w @ G @ w) * w


def nash_oracle(G: np.ndarray) -> np.ndarray:
    """α > 0 with Gα = 1/α, from scipy's minimisation of ½αᵀGα − Σ log α (in log coordinates, so
    α > 0 holds by construction), polished by Newton on the optimality condition."""

    def f(beta):
        a = np.exp(beta)
        return 0.5 * a @ G @ a - beta.sum(), a * (G @ a) - 1.0

    beta0 = -0.5 * np.log(np.diag(G))
    res = minimize(f, beta0, jac=True, method="BFGS", options=dict(gtol=1e-13, maxiter=10000))
    a = np.exp(res.x)
    for _ in range(20):  # Newton on F(a) = Ga − 1/a
        F = G @ a - 1.0 / a
        a = a - np.linalg.solve(G + np.diag(1.0 / a ** 2), F)
    return a
