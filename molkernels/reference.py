"""Plain-torch implementations of every op: the oracle of the test suite and the `reference` backend.

Each function computes in float64 and returns float64, whatever the input dtype, so that tests
compare every backend against the most exact result torch can give. The algorithms are chosen to
be independent of the kernels': the simplex projection sorts (the kernels use Michelot's fixed
point) and the min-norm weights come from accelerated projected gradient descent (the kernels use
Wolfe's active-set algorithm).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ._stack import Stack


def _rows64(block: torch.Tensor) -> torch.Tensor:
    return block.reshape(block.shape[0], -1).to(torch.float64)


def gram(g: Stack) -> torch.Tensor:
    """Σ_blocks B Bᵀ with B = block.reshape(K, -1), in float64: shape [K, K]."""
    blocks = [g] if isinstance(g, torch.Tensor) else list(g)
    products = sum(_rows64(b) @ _rows64(b).T for b in blocks)
    # A BLAS product may sum (i, j) and (j, i) in different orders; mirror the upper triangle.
    return torch.triu(products) + torch.triu(products, 1).T


def cross_gram(a: Stack, b: Stack) -> torch.Tensor:
    """Σ_blocks A Bᵀ over paired blocks, in float64: shape [K, K]."""
    a_blocks = [a] if isinstance(a, torch.Tensor) else list(a)
    b_blocks = [b] if isinstance(b, torch.Tensor) else list(b)
    return sum(_rows64(x) @ _rows64(y).T for x, y in zip(a_blocks, b_blocks))


def combine(g: Stack, weights: torch.Tensor):
    """Σ_k w_k g_k in float64: a tensor shaped like g[0] for a tensor stack, else one per block."""
    w = weights.to(torch.float64)
    if isinstance(g, torch.Tensor):
        return torch.tensordot(w, g.to(torch.float64), dims=1)
    return [torch.tensordot(w, b.to(torch.float64), dims=1) for b in g]


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of [..., K] onto the probability simplex, by sorting.

    The projection is invariant to adding a constant, so each row is first shifted by its maximum
    and clamped below at −1: w = max(v − max_i v_i, −1). The threshold lies in [−1, 0) then, so
    the clamp moves no entry that gets mass, and the running sums stay within K in magnitude (no
    lost "− 1" at |v| ≳ 2⁵³, no overflow of a large finite row). x = max(w − τ, 0) with
    τ = (Σ_{i≤ρ} u_i − 1)/ρ, u = w sorted descending and ρ the largest index with
    u_ρ > (Σ_{i≤ρ} u_i − 1)/ρ. Rows with a non-finite entry come back all NaN.
    """
    v64 = v.to(torch.float64)
    K = v64.shape[-1]
    w = (v64 - v64.amax(-1, keepdim=True)).clamp(min=-1.0)
    u, _ = torch.sort(w, dim=-1, descending=True)
    cumulative = torch.cumsum(u, dim=-1) - 1.0
    index = torch.arange(1, K + 1, dtype=torch.float64, device=v.device)
    rho = (u > cumulative / index).to(torch.int64).cumsum(-1).amax(-1, keepdim=True).clamp(min=1)
    tau = torch.gather(cumulative, -1, rho - 1) / rho.to(torch.float64)
    x = (w - tau).clamp(min=0.0)
    finite = torch.isfinite(v64).all(dim=-1, keepdim=True)
    return torch.where(finite, x, torch.full_like(x, float("nan")))


def min_norm(gram_matrix: torch.Tensor, iterations: int = 20000) -> torch.Tensor:
    """argmin over the simplex of λᵀ G λ for each [K, K] matrix of [..., K, K], in float64.

    FISTA (accelerated projected gradient) with step 1/L, L = 2·trace(G) ≥ 2·λ_max(G), and
    adaptive restart; after `iterations` steps the objective is within 2·L·‖λ₀ − λ*‖²/t² of its
    minimum. Slow but simple: an oracle, not a kernel. The minimiser does not change when G is
    scaled, so G is first divided by its largest diagonal entry, each entry before the two halves
    of the symmetrisation are added: G_ij + G_ji overflows for entries near the largest double.
    """
    G = gram_matrix.to(torch.float64)
    K = G.shape[-1]
    finite = torch.isfinite(G).flatten(-2).all(-1, keepdim=True)
    G = torch.where(finite.unsqueeze(-1), G, torch.zeros_like(G))
    scale = torch.diagonal(G, dim1=-2, dim2=-1).amax(-1, keepdim=True).unsqueeze(-1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    G = 0.5 * (G / scale) + 0.5 * (G.transpose(-1, -2) / scale)
    lipschitz = 2.0 * torch.diagonal(G, dim1=-2, dim2=-1).sum(-1, keepdim=True).clamp(min=1e-300)
    lam = torch.full(G.shape[:-1], 1.0 / K, dtype=torch.float64, device=G.device)
    momentum_point = lam.clone()
    t = torch.ones_like(lipschitz)

    def objective(x):
        return (x.unsqueeze(-2) @ G @ x.unsqueeze(-1)).squeeze(-1)

    f_prev = objective(lam)
    for _ in range(iterations):
        grad = 2.0 * (G @ momentum_point.unsqueeze(-1)).squeeze(-1)
        new_lam = project_simplex(momentum_point - grad / lipschitz)
        f_new = objective(new_lam)
        restart = f_new > f_prev
        t_new = 0.5 * (1.0 + torch.sqrt(1.0 + 4.0 * t * t))
        step = torch.where(restart, torch.zeros_like(t), (t - 1.0) / t_new)
        momentum_point = new_lam + step * (new_lam - lam)
        t = torch.where(restart, torch.ones_like(t), t_new)
        lam, f_prev = new_lam, f_new
    if K == 1:
        lam = torch.ones_like(lam)
    return torch.where(finite, lam, torch.full_like(lam, float("nan")))


def min_norm_objective(gram_matrix: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """λᵀ G λ in float64, batched."""
    G = gram_matrix.to(torch.float64)
    x = lam.to(torch.float64)
    return (x.unsqueeze(-2) @ G @ x.unsqueeze(-1)).squeeze(-1).squeeze(-1)


def _rate64(beta) -> torch.Tensor:
    """A rate given as a number or a one-element tensor (the steps' device-side β_t), in float64."""
    return torch.as_tensor(beta).to(torch.float64).reshape(())


def track_gram(y: Sequence[torch.Tensor], g: Sequence[torch.Tensor], beta) -> torch.Tensor:
    """MoCo's first pass: y ← y − β (y − g) in place (computed in float64, stored in y's dtype);
    returns the Gram of the updated y in float64. β: a number or a one-element tensor."""
    beta = _rate64(beta)
    for yb, gb in zip(y, g):
        yb.copy_(yb.to(torch.float64) - beta * (yb.to(torch.float64) - gb.to(torch.float64)))
    return gram(y)


def joint_gram(y: Sequence[torch.Tensor], g: Sequence[torch.Tensor]) -> torch.Tensor:
    """The [2K, 2K] Gram of the rows [y; g], in float64."""
    return gram([torch.cat([_rows64(yb), _rows64(gb)], dim=0) for yb, gb in zip(y, g)])


def combine_into(g: Sequence[torch.Tensor], weights: torch.Tensor, out: Sequence[torch.Tensor], alpha: float,
                 accumulate: bool) -> None:
    """out_j = α Σ_k w_k g_j[k] (or out_j += that with `accumulate`), computed in float64."""
    for o, d in zip(out, combine(list(g), weights)):
        value = alpha * d + (o.to(torch.float64) if accumulate else 0.0)
        o.copy_(value)


def track_combine(y: Sequence[torch.Tensor], g: Sequence[torch.Tensor], scale: torch.Tensor, beta,
                  weights: torch.Tensor, out: Sequence[torch.Tensor], alpha: float, accumulate: bool) -> None:
    """MoCo's normalised second pass: y ← y + β (s_k g_k − y) in place, then out (+)= α yᵀ w."""
    beta = _rate64(beta)
    s = scale.to(torch.float64)
    for yb, gb in zip(y, g):
        shape = (-1,) + (1,) * (gb.dim() - 1)
        y64 = yb.to(torch.float64)
        yb.copy_(y64 + beta * (s.view(shape) * gb.to(torch.float64) - y64))
    combine_into(y, weights, out, alpha, accumulate)


def stack_blocks(g: Sequence[torch.Tensor]) -> torch.Tensor:
    """The blocks of a list stack side by side as one float64 [K, D] matrix (tests only)."""
    return torch.cat([_rows64(b) for b in g], dim=1)


# --------------------------------------------------------------------------------------------------
# Federated: client-stacked optimiser steps [C, D]. Unlike the ops above these follow
# torch.optim's own sequence of torch operations in the state's dtype (float32, float64 for float64
# parameters), so that each active row equals, bit for bit, what torch.optim does for that client
# alone; inactive rows are selected back unchanged with torch.where.


def _compute_dtype(params: torch.Tensor) -> torch.dtype:
    return torch.float64 if params.dtype == torch.float64 else torch.float32


def _row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-client values [C] as a [C, 1, ...] column that broadcasts over a row of `like`."""
    return values.reshape((-1,) + (1,) * (like.dim() - 1))


def batched_adam_step(params: torch.Tensor, grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                      step: torch.Tensor, active: torch.Tensor, lr: float, beta1: float, beta2: float, eps: float,
                      weight_decay: float) -> None:
    """In place, for each active row c: step_c += 1, then torch.optim.Adam's update of row c with
    its own bias corrections 1 − β^step_c (computed in float64 as torch does from a Python float,
    then rounded to the state's dtype)."""
    dtype = _compute_dtype(params)
    new_step = step + active.to(step.dtype)
    k = new_step.to(torch.float64)
    bias_correction1 = 1.0 - torch.pow(beta1, k)
    bias_correction2_sqrt = (1.0 - torch.pow(beta2, k)).sqrt()
    neg_step_size = _row((-(lr / bias_correction1)).to(dtype), params)
    bias_correction2_sqrt = _row(bias_correction2_sqrt.to(dtype), params)

    p = params.to(dtype)
    g = grads.to(dtype)
    if weight_decay != 0:
        g = g.add(p, alpha=weight_decay)
    m = exp_avg.lerp(g, 1 - beta1)
    v = exp_avg_sq.mul(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
    p = p + (neg_step_size * m) / denom  # addcdiv's order: self + (value * t1) / t2

    mask = _row(active, params)
    params.copy_(torch.where(mask, p.to(params.dtype), params))
    exp_avg.copy_(torch.where(mask, m, exp_avg))
    exp_avg_sq.copy_(torch.where(mask, v, exp_avg_sq))
    step.copy_(new_step)


def batched_sgd_step(params: torch.Tensor, grads: torch.Tensor, momentum_buffer, active: torch.Tensor, lr: float,
                     momentum: float, weight_decay: float) -> None:
    """In place, for each active row: torch.optim.SGD's update (dampening 0, no Nesterov); a zero
    momentum buffer row gives buf = grad, as torch's first step does."""
    dtype = _compute_dtype(params)
    p = params.to(dtype)
    d = grads.to(dtype)
    if weight_decay != 0:
        d = d.add(p, alpha=weight_decay)
    mask = _row(active, params)
    if momentum != 0:
        d = momentum_buffer.mul(momentum).add_(d)
        momentum_buffer.copy_(torch.where(mask, d, momentum_buffer))
    p = p.add(d, alpha=-lr)
    params.copy_(torch.where(mask, p.to(params.dtype), params))


def masked_weighted_mean(x: torch.Tensor, weights: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Σ_{active c} w_c x_c / Σ_{active c} w_c over the rows of x [C, D], in float64: shape [D];
    all NaN when the active weights sum to zero (or no client is active). Inactive rows are never
    read into the sum, so NaN or garbage there does not leak."""
    w = torch.where(active, weights.to(torch.float64), 0.0)
    rows = torch.where(_row(active, x), x.to(torch.float64), 0.0)
    total = w.sum()
    mean = torch.tensordot(w, rows, dims=1) / total
    return torch.where(total != 0, mean, float("nan"))
