"""The two-objective toy of CAGrad (Liu et al., 2021) and MoCo (Fernando et al., 2023), in closed form.

Source: the reference code of CAGrad, `toy.py` in github.com/Cranial-XIX/CAGrad (class Toy), the
problem of Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021
(Fig. 1); Fernando et al., "Mitigating Gradient Bias in Multi-objective Learning: A Provably
Convergent Approach" (MoCo), ICLR 2023, run their toy experiment on this same problem with noisy
gradients. With x = (x1, x2) ∈ R², ε = 5·10⁻⁶ (the code's LOWER):

    u1 = 0.5 (−x1 − 7) − tanh(−x2)             u2 = 0.5 (−x1 + 3) + tanh(−x2) + 2
    h_i = log(max(|u_i|, ε)) + 6                (the "log" valleys, active for x2 > 0)
    q1 = ((−x1 + 7)² + 0.1 (−x2 − 8)²) / 10 − 20
    q2 = ((−x1 − 7)² + 0.1 (−x2 − 8)²) / 10 − 20    (the quadratic bowls, active for x2 < 0)
    c1 = max(tanh(x2 / 2), 0)                   c2 = max(tanh(−x2 / 2), 0)
    f_i(x) = c1 h_i + c2 q_i,   F = (f1, f2)

The gradients are written out by hand in `gradients` (and checked against autograd in
python_tests/test_toy.py):

    ∂h1/∂x1 = −0.5/u1,  ∂h1/∂x2 = sech²(x2)/u1,   ∂h2/∂x1 = −0.5/u2,  ∂h2/∂x2 = −sech²(x2)/u2
        (both 0 where |u_i| < ε, as the clamp does)
    ∂q1/∂x1 = (x1 − 7)/5,  ∂q2/∂x1 = (x1 + 7)/5,  ∂q_i/∂x2 = 0.02 (x2 + 8)
    ∂c1/∂x2 = 0.5 sech²(x2/2) where tanh(x2/2) ≥ 0,  ∂c2/∂x2 = −0.5 sech²(x2/2) where tanh(−x2/2) ≥ 0
    ∂f_i/∂x1 = c1 ∂h_i/∂x1 + c2 ∂q_i/∂x1
    ∂f_i/∂x2 = c1' h_i + c1 ∂h_i/∂x2 + c2' q_i + c2 ∂q_i/∂x2

The Pareto-stationary points are x1 = 7 (2λ − 1), x2 = argmin_{x2<0} c2(x2)(λ q1 + (1 − λ) q2), λ ∈ [0, 1]
(x2 ≈ −8.36, the segment CAGrad's figures draw). The starting points are CAGrad's: (−8.5, 7.5),
(−8.5, −5) and (9, 9).

Everything here is plain torch in float64 and batched over leading dimensions.
"""

from __future__ import annotations

from typing import Tuple

import torch

LOWER = 5e-6
STARTS = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))
K = 2


def _parts(x: torch.Tensor):
    x1, x2 = x[..., 0], x[..., 1]
    u1 = 0.5 * (-x1 - 7) - torch.tanh(-x2)
    u2 = 0.5 * (-x1 + 3) + torch.tanh(-x2) + 2
    h1 = torch.clamp(u1.abs(), LOWER).log() + 6
    h2 = torch.clamp(u2.abs(), LOWER).log() + 6
    q1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    q2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    t1, t2 = torch.tanh(x2 * 0.5), torch.tanh(-x2 * 0.5)
    c1, c2 = torch.clamp(t1, 0), torch.clamp(t2, 0)
    return x1, x2, u1, u2, h1, h2, q1, q2, t1, t2, c1, c2


def objectives(x: torch.Tensor) -> torch.Tensor:
    """F(x): [..., 2] -> [..., 2] (f1, f2), exactly as CAGrad's Toy.batch_forward."""
    _, _, _, _, h1, h2, q1, q2, _, _, c1, c2 = _parts(x)
    return torch.stack([c1 * h1 + c2 * q1, c1 * h2 + c2 * q2], dim=-1)


def gradients(x: torch.Tensor) -> torch.Tensor:
    """The Jacobian in closed form: [..., 2] -> [..., K=2, 2], row k = ∇f_k(x)."""
    x1, x2, u1, u2, h1, h2, q1, q2, t1, t2, c1, c2 = _parts(x)
    sech2 = 1 - torch.tanh(x2) ** 2
    active1 = (u1.abs() >= LOWER).to(x.dtype)  # clamp passes the gradient where |u| >= LOWER
    active2 = (u2.abs() >= LOWER).to(x.dtype)
    inv1 = active1 / torch.where(active1 > 0, u1, torch.ones_like(u1))
    inv2 = active2 / torch.where(active2 > 0, u2, torch.ones_like(u2))
    dh1 = (-0.5 * inv1, sech2 * inv1)
    dh2 = (-0.5 * inv2, -sech2 * inv2)
    dq1 = ((x1 - 7) / 5, 0.02 * (x2 + 8))
    dq2 = ((x1 + 7) / 5, 0.02 * (x2 + 8))
    dc1 = 0.5 * (1 - t1 ** 2) * (t1 >= 0).to(x.dtype)
    dc2 = -0.5 * (1 - t2 ** 2) * (t2 >= 0).to(x.dtype)
    rows = []
    for h, dh, q, dq in ((h1, dh1, q1, dq1), (h2, dh2, q2, dq2)):
        g_x1 = c1 * dh[0] + c2 * dq[0]
        g_x2 = dc1 * h + c1 * dh[1] + dc2 * q + c2 * dq[1]
        rows.append(torch.stack([g_x1, g_x2], dim=-1))
    return torch.stack(rows, dim=-2)


def min_norm_weights(gram: torch.Tensor) -> torch.Tensor:
    """Exact min-norm weights for K = 2: λ1 = clip((g22 − g12) / (g11 + g22 − 2 g12), 0, 1),
    batched over leading dims of a [..., 2, 2] Gram. (Independent of molkernels.min_norm, which
    the tests compare it with.)"""
    g11, g12, g22 = gram[..., 0, 0], gram[..., 0, 1], gram[..., 1, 1]
    denom = g11 + g22 - 2 * g12
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    lam1 = torch.where(denom > 0, (g22 - g12) / safe, torch.full_like(denom, 0.5)).clamp(0, 1)
    return torch.stack([lam1, 1 - lam1], dim=-1)


def mgda_direction(grads: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(d*, λ*) for a [..., 2, d] gradient stack: λ* = the min-norm weights, d* = Σ_k λ*_k g_k."""
    gram = grads @ grads.transpose(-1, -2)
    lam = min_norm_weights(gram)
    return (lam.unsqueeze(-1) * grads).sum(-2), lam


def pareto_set(n: int = 101) -> torch.Tensor:
    """[n, 2] Pareto-stationary points, λ from 0 to 1: x1 = 7(2λ − 1) and x2 minimising
    c2(x2)(λ q1 + (1 − λ) q2) over x2 ∈ [−14, −4] on a grid of step 10⁻³."""
    lam = torch.linspace(0, 1, n, dtype=torch.float64)
    x1 = 7 * (2 * lam - 1)
    grid = torch.linspace(-14, -4, 10_001, dtype=torch.float64)
    pts = torch.stack(torch.broadcast_tensors(x1[:, None], grid[None, :]), dim=-1)  # [n, m, 2]
    F = objectives(pts)
    weighted = lam[:, None] * F[..., 0] + (1 - lam[:, None]) * F[..., 1]
    x2 = grid[weighted.argmin(dim=1)]
    return torch.stack([x1, x2], dim=-1)
