"""Projection onto the dual cone of the gradients, from the Gram matrix alone (UPGrad, DualProj).

The dual cone of g_1..g_K is C = {x : ⟨g_k, x⟩ ≥ 0 for all k}. For x = Σ_k u_k g_k, its projection
onto C is Σ_k v_k g_k with (Proposition 1 of Quinton & Rey, 2024, "Jacobian Descent for
Multi-Objective Optimization"):

    v = argmin_v vᵀ G v   subject to   v ≥ u.                                          (QP)

Exact solution through molkernels.min_norm. Write v = u + μ with μ ≥ 0. If the optimum satisfies
Σ_k μ_k < S, the QP equals the same problem with the extra constraint Σ μ ≤ S (convexity: the
constraint is inactive at the optimum), and that problem is a minimum-norm point over a simplex:
with λ ∈ Δ^{K+1} and the K+1 points  p_0 = J^T u,  p_k = J^T (u + S e_k),

    Σ_j λ_j p_j = J^T (u + S λ_{1:K}),  so  μ = S λ_{1:K}, λ = min_norm(Mᵀ G M),  M = [u, u + S e_1, …].

A valid S follows from G being positive definite (the regularised Gram is): for the optimum,
‖u + μ‖_G ≤ ‖u‖_G (μ = 0 is feasible), and Cauchy–Schwarz in the G inner product gives

    Σ_k (u + μ)_k = ⟨G⁻¹1, u + μ⟩_G ≤ √(1ᵀG⁻¹1) ‖u‖_G,   so   Σ μ ≤ √(1ᵀG⁻¹1 · uᵀGu) − Σ u;

S is twice that bound. Wolfe's algorithm (min_norm's kernel) is exact up to rounding in float64, so
the QP is solved exactly, batched over the rows of U, on the device: one Cholesky (cholesky_ex,
no host synchronisation) and one batched min_norm call. Against an independent NNLS solve
(scipy.optimize.nnls) the directions agree to ~1e-12 (python_tests/mol/test_mol_dualcone.py).
"""

from __future__ import annotations

import math

import torch

from ..ops import min_norm
from .base import GramWeighting, as_pref_vector, check_gram, normalized_gram, preference, trace_normalized


def check_reg_eps(reg_eps) -> float:
    if isinstance(reg_eps, bool) or not isinstance(reg_eps, (int, float)) or not math.isfinite(reg_eps) or reg_eps <= 0:
        raise ValueError(f"reg_eps: expected a finite number > 0 (the QP needs a positive definite Gram), got {reg_eps!r}")
    return float(reg_eps)


def regularized(G64: torch.Tensor, reg_eps: float) -> torch.Tensor:
    """G / trace(G) + reg_eps·I, as torchjd's projector prepares the Gram (torchjd also treats a
    trace below 1e-4 as 0; here only a zero trace is, so the weights do not depend on the scale of
    the gradients)."""
    K = G64.shape[-1]
    return trace_normalized(G64) + reg_eps * torch.eye(K, dtype=G64.dtype, device=G64.device)


def project_weights(G: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """For each row u of U [B, K]: v = argmin vᵀGv subject to v ≥ u, for a positive definite
    float64 G [K, K]. Returns V [B, K] (float64)."""
    K = G.shape[-1]
    B = U.shape[0]
    L, _ = torch.linalg.cholesky_ex(G)
    ones = torch.ones(K, 1, dtype=G.dtype, device=G.device)
    one_ginv_one = (ones * torch.cholesky_solve(ones, L)).sum()
    uGu = ((U @ G) * U).sum(-1)
    bound = (one_ginv_one * uGu).clamp(min=0).sqrt() - U.sum(-1)
    S = 2.0 * bound.clamp(min=0)                                               # [B]
    eye = torch.eye(K, dtype=G.dtype, device=G.device)
    M = torch.cat([U.unsqueeze(-1), U.unsqueeze(-1) + S.view(B, 1, 1) * eye], dim=-1)  # [B, K, K+1]
    Gp = M.transpose(-1, -2) @ G @ M
    Gp = 0.5 * (Gp + Gp.transpose(-1, -2))
    lam = min_norm(Gp)                                                         # [B, K+1]
    return U + S.unsqueeze(-1) * lam[:, 1:]


class DualConeWeighting(GramWeighting):
    """The shared part of UPGrad and DualProj: a preference vector p (1/K each by default), the
    regularised Gram Ĝ = G/trace(G) + reg_eps·I, and projections of combinations of the gradients
    onto their dual cone (project_weights)."""

    def __init__(self, pref_vector=None, *, reg_eps: float = 1e-4):
        self.pref_vector = as_pref_vector(pref_vector)
        self._pref_cache = {}
        self.reg_eps = check_reg_eps(reg_eps)

    def _regularized_and_preference(self, gram: torch.Tensor):
        """(Ĝ in float64, p, finite) for a [K, K] Gram; finite: whether the Gram is (see
        molkernels.mol.base.normalized_gram; Ĝ is then regularised from the identity)."""
        K = check_gram(gram)
        G, _, finite = normalized_gram(gram)
        G = regularized(G, self.reg_eps)
        return G, preference(self.pref_vector, K, G, cache=self._pref_cache), finite
