"""CAGrad: conflict-averse gradient descent."""

from __future__ import annotations

import math

import torch

from ..ops import min_norm
from .base import GramWeighting, check_gram, nan_unless, normalized_gram, trace_normalized


class CAGrad(GramWeighting):
    """CAGrad (Liu et al., 2021, "Conflict-Averse Gradient Descent for Multi-task Learning",
    Algorithm 1), with g_0 = (1/K) Σ_k g_k and radius c·‖g_0‖:

        max_d min_k ⟨g_k, d⟩  subject to  ‖d − g_0‖ ≤ c‖g_0‖,
        dual:  w = argmin_{w ∈ Δ} ⟨g_w, g_0⟩ + c‖g_0‖ ‖g_w‖,   g_w = Σ_k w_k g_k,
        d = g_0 + (c‖g_0‖ / ‖g_w‖) g_w,   i.e. weights 1/K + (c‖g_0‖/‖g_w‖) w.

    With rescale=True the direction is divided by 1 + c² (the official code's default rescale=1);
    the paper and torchjd do not rescale. When the optimum is g_w = 0 (0 is in the convex hull of
    the gradients and no other point does better), d is undefined and the weights are 0, as in
    torchjd. (torchjd also returns 0 when ‖g_w‖ < 1e-4·√trace(G), which can cut off a well-defined
    optimum when the gradient norms differ by orders of magnitude; here only x* = 0 does.)

    Solver (exact, on the device, from the Gram only): write x = g_w and φ = c‖g_0‖. At the optimum
    x* ≠ 0, −(g_0 + φ x*/‖x*‖) is in the normal cone of the hull P at x*, which is the optimality
    condition of x(τ) = argmin_{x ∈ P} ‖x + τ g_0‖ for τ = ‖x*‖/φ. So x* = x(τ*) with τ* > 0 a
    root of ψ(τ) = ‖x(τ)‖ − φτ; every root τ > 0 gives a minimiser (the problem is convex), and
    τ = 0 is a root without meaning when 0 ∈ P, so the search brackets the first change from
    ψ > 0 to ψ ≤ 0 on (0, τ_max], τ_max = max_k ‖g_k‖/φ (where ψ ≤ 0, as ‖x‖ ≤ max_k ‖g_k‖).
    Each x(τ) is the min-norm point over g_k + τ g_0 (Gram G + τ(G1̄ 1ᵀ + 1 1̄ᵀG) + τ²‖g_0‖² 11ᵀ,
    1̄ = (1/K)1), solved exactly by min_norm; `rounds` batched min_norm calls on grids of `grid`
    values of τ shrink the bracket by grid − 1 each (31⁶ ≈ 10⁹ by default), and one regula-falsi
    step refines it: rounds + 1 min_norm launches, no host synchronisation. x(τ) is ‖g_0‖-Lipschitz
    in τ; in the tests the KKT conditions of the dual hold to 1e-7 and the directions agree with
    SLSQP to 1e-6 (SLSQP's own accuracy; on badly scaled gradients this solver finds lower values).
    """

    def __init__(self, c: float = 0.4, *, rescale: bool = False, rounds: int = 6, grid: int = 32):
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
            raise ValueError(f"c: expected a finite number >= 0, got {c!r}")
        if not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds: expected an integer >= 1, got {rounds!r}")
        if not isinstance(grid, int) or grid < 3:
            raise ValueError(f"grid: expected an integer >= 3, got {grid!r}")
        self.c = float(c)
        self.rescale = bool(rescale)
        self.rounds = rounds
        self.grid = grid

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        K = check_gram(gram)
        G, _, finite = normalized_gram(gram)
        G = trace_normalized(G)                # the weights are invariant to the scale of G
        dev, dt = G.device, G.dtype
        mean = torch.full((K,), 1.0 / K, dtype=dt, device=dev)
        Gm = G @ mean                          # ⟨g_k, g_0⟩
        g0_sq = (mean * Gm).sum().clamp(min=0)  # ‖g_0‖²
        phi = self.c * g0_sq.sqrt()            # the radius c‖g_0‖
        phi_safe = torch.where(phi > 0, phi, torch.ones_like(phi))
        ones = torch.ones(K, dtype=dt, device=dev)
        cross = Gm[:, None] * ones[None, :] + ones[:, None] * Gm[None, :]
        outer = ones[:, None] * ones[None, :]

        def solve(taus):                       # x(τ) for each τ: (λ [n, K], ‖x(τ)‖ [n])
            shifted = G + taus[:, None, None] * cross + (taus ** 2)[:, None, None] * g0_sq * outer
            lam = min_norm(0.5 * (shifted + shifted.transpose(-1, -2)))
            norms = ((lam @ G) * lam).sum(-1).clamp(min=0).sqrt()
            return lam, norms

        lo = torch.zeros((), dtype=dt, device=dev)
        hi = torch.diagonal(G).max().clamp(min=0).sqrt() / phi_safe
        psi_lo = torch.zeros((), dtype=dt, device=dev)
        psi_hi = torch.zeros((), dtype=dt, device=dev)
        found = torch.zeros((), dtype=torch.bool, device=dev)
        steps = torch.linspace(0, 1, self.grid, dtype=dt, device=dev)
        for _ in range(self.rounds):
            taus = lo + (hi - lo) * steps
            _, norms = solve(taus)
            psi = norms - phi * taus
            psi[-1] = torch.minimum(psi[-1], torch.zeros_like(psi[-1]))  # ψ(hi) ≤ 0 (rounding aside)
            # The first sign change ψ(τ_{j-1}) > 0 ≥ ψ(τ_j); none means ψ ≤ 0 on the grid, so only a
            # root in (τ_0, τ_1) (or x* = 0 at τ = 0) remains: zoom into [τ_0, τ_1].
            change = (psi[1:] <= 0) & (psi[:-1] > 0)
            found = found | change.any()
            j = torch.where(change.any(), torch.argmax(change.to(torch.int32)) + 1, torch.ones_like(change[0], dtype=torch.int64))
            i = j - 1
            pick = torch.stack([i, j])                                      # device indices, no .item()
            (lo, hi), (psi_lo, psi_hi) = taus.index_select(0, pick).unbind(0), psi.index_select(0, pick).unbind(0)
        denom = psi_lo - psi_hi
        frac = torch.where(denom > 0, psi_lo / torch.where(denom > 0, denom, torch.ones_like(denom)),
                           torch.zeros_like(denom))
        tau = lo + (hi - lo) * frac.clamp(0, 1)
        lam, norms = solve(tau.reshape(1))
        w, gw_norm = lam[0], norms[0]
        # No sign change on any grid: ψ ≤ 0 on (0, τ_max], the optimum is x* = 0 (0 is in the hull:
        # the gradients are Pareto-stationary) and the direction g_0 + φ x*/‖x*‖ is undefined.
        stationary = ~found | (gw_norm <= 0)
        scale = torch.where(stationary, torch.zeros_like(phi), phi / torch.where(stationary, torch.ones_like(gw_norm), gw_norm))
        weights = torch.where(stationary, torch.zeros_like(mean), mean + scale * w)
        # c = 0 (or g_0 = 0): d = g_0.
        weights = torch.where(phi > 0, weights, mean)
        if self.rescale:
            weights = weights / (1.0 + self.c ** 2)
        return nan_unless(finite, weights).to(gram.dtype)

    def __repr__(self) -> str:
        return f"CAGrad(c={self.c}, rescale={self.rescale})"
