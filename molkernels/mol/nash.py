"""Nash-MTL: multi-task learning as a bargaining game."""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_integer, check_number, check_state_keys, check_state_vector
from .base import GramWeighting, check_gram, nan_unless, normalized_gram


class NashMTL(GramWeighting):
    """Nash-MTL (Navon et al., 2022, "Multi-Task Learning as a Bargaining Game"): the Nash
    bargaining solution, d = Σ_k α_k g_k with α > 0 solving

        G α = 1/α   (elementwise; i.e. ⟨g_k, d⟩ = 1/α_k for every k),

    then scaled down to ‖d‖ = max_norm when it is longer (‖d‖² = αᵀGα = K at the solution;
    max_norm = 1 is the official code's and torchjd's default; 0 disables it). The weights are
    recomputed every `update_weights_every` steps and reused in between.

    Solver: the solution is equivariant to the gradient norms (g_k → s_k g_k maps α_k → α_k/s_k),
    so it is computed for the unit gradients: β = D^{1/2} α solves C β = 1/β with
    C = D^{-1/2} G D^{-1/2} + reg_eps·I (D = diag G, unit diagonal whatever the norms), i.e. β
    minimises the strictly convex φ(β) = ½ βᵀCβ − Σ log β_k. On the device in float64: Newton
    steps (Cholesky of C + diag(1/β²), cholesky_ex, no host synchronisation), a full step once the
    Newton decrement λ < 1/4 (quadratic convergence), else the best of the steps 4, 2, 1, …, 2^-12
    (capped to keep β > 0) by φ, evaluated together. Starts from the previous solution (warm
    start, the state), or from β = 1 (α_k ∝ 1/‖g_k‖), rescaled along the ray to minimise φ (exact
    for K = 2 and for orthogonal gradients). At most `max_iters` iterations; on the CPU it stops
    once λ < tol (a host check there costs nothing; tol = 0 turns it off), on CUDA it runs all of
    them. Measured (K ≤ 64, cold start): with linearly independent gradients, ≤ 5 iterations reach
    the solution to 1e-10; the official code instead runs up to 20 convex-concave iterations of
    cvxpy from the previous α and stops early, so it approximates this solution.

    The bargaining solution needs linearly independent gradients (the paper's assumption); with
    dependent ones (K > d, duplicated or opposite gradients) reg_eps makes it exist. The α_k along
    the dependent directions are then large (order 1/√reg_eps) and ill-determined, but the
    direction d = Σ α_k g_k reaches its float64 floor (~1e-8 relative for K = 64 gradients in
    R^7, 1e-13 for K = 10) within the default 20 iterations.

    Any finite Gram is solved as G/s (s its largest |entry|, so nothing overflows) and mapped back,
    α = α̂/√s. A non-finite Gram gives NaN weights and a NaN α in the state, so the later weights
    are NaN too (warm-started from NaN) until reset().
    """

    def __init__(self, *, max_norm: float = 1.0, update_weights_every: int = 1, max_iters: int = 20,
                 tol: float = 1e-7, reg_eps: float = 1e-8):
        check_number("max_norm", max_norm, 0.0)
        check_number("tol", tol, 0.0)
        check_number("reg_eps", reg_eps, 0.0, low_open=True)
        check_integer("update_weights_every", update_weights_every, 1)
        check_integer("max_iters", max_iters, 1)
        self.max_norm = float(max_norm)
        self.update_weights_every = update_weights_every
        self.max_iters = max_iters
        self.tol = float(tol)
        self.reg_eps = float(reg_eps)
        self.alpha: Optional[torch.Tensor] = None  # the last solution (before max_norm), float64
        self.step = 0

    def solve(self, G: torch.Tensor, start: Optional[torch.Tensor] = None) -> torch.Tensor:
        """α > 0 with G α = 1/α (up to reg_eps) for the float64 Gram G."""
        K = G.shape[0]
        dev, dt = G.device, G.dtype
        # Rescaling g_k → g_k/‖g_k‖ maps the solution to α_k‖g_k‖: solve on the unit-diagonal
        # C = D^{-1/2} G D^{-1/2} (well scaled whatever the gradient norms), then map back.
        diag = torch.diagonal(G)
        norms = torch.where(diag > 0, diag, torch.ones_like(diag)).sqrt()
        C = G / (norms[:, None] * norms[None, :]) + self.reg_eps * torch.eye(K, dtype=dt, device=dev)
        b = torch.ones(K, dtype=dt, device=dev) if start is None else start.to(device=dev, dtype=dt) * norms
        b = b * (K / (b @ C @ b)).sqrt()
        steps = 2.0 ** torch.arange(2, -13, -1, dtype=dt, device=dev)  # 4, 2, 1, …, 2^-12
        on_cpu = dev.type == "cpu"
        for _ in range(self.max_iters):
            grad = C @ b - 1.0 / b
            L, _ = torch.linalg.cholesky_ex(C + torch.diag(1.0 / (b * b)))
            delta = -torch.cholesky_solve(grad.unsqueeze(-1), L).squeeze(-1)
            decrement = (-(grad @ delta)).clamp(min=0).sqrt()
            ratio = torch.where(delta < 0, -b / torch.where(delta < 0, delta, -torch.ones_like(delta)),
                                torch.full_like(b, float("inf"))).min()
            full = b + torch.clamp(0.9 * ratio, max=1.0) * delta
            candidates = b + torch.minimum(steps, 0.9 * ratio).unsqueeze(-1) * delta
            values = 0.5 * ((candidates @ C) * candidates).sum(-1) - torch.log(candidates).sum(-1)
            values = torch.where(torch.isfinite(values), values, torch.full_like(values, float("inf")))
            searched = candidates.index_select(0, torch.argmin(values).reshape(1)).squeeze(0)
            b = torch.where(decrement < 0.25, full, searched)
            if on_cpu and self.tol > 0 and bool(decrement < self.tol):
                break
        return b / norms

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        K = check_gram(gram)
        # G = scale·Ĝ: Ĝα̂ = 1/α̂ gives Gα = 1/α for α = α̂/√scale, and αᵀGα = α̂ᵀĜα̂.
        G, scale, finite = normalized_gram(gram)
        root = scale.sqrt()
        if self.alpha is not None and self.alpha.shape != (K,):
            raise ValueError(f"gram: has K = {K} objectives, the state has {self.alpha.shape[0]}; call reset() first")
        if self.alpha is None or self.step % self.update_weights_every == 0:
            start = None if self.alpha is None else self.alpha.to(G.device) * root
            self.alpha = nan_unless(finite, self.solve(G, start) / root)
        self.step += 1
        alpha = self.alpha.to(G.device)
        if self.max_norm > 0:
            unit = alpha * root
            norm = (unit @ G @ unit).clamp(min=0).sqrt()
            alpha = alpha * torch.clamp(self.max_norm / norm, max=1.0)
        return alpha.to(gram.dtype)

    def check_num_objectives(self, K: int, name: str) -> None:
        if self.alpha is not None and self.alpha.shape != (K,):
            raise ValueError(f"{name}: has K = {K} objectives, the NashMTL state has {self.alpha.shape[0]}")

    def state_dict(self) -> dict:
        return {"alpha": None if self.alpha is None else self.alpha.clone(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned: α None or a positive float64 [K] vector (the K of
        the current α, if there is one: reset() first to load another K), the step an int >= 0;
        checked before anything changes."""
        check_state_keys(state, "state", ("alpha", "step"))
        alpha = state["alpha"]
        if alpha is not None:
            check_state_vector(alpha, "state['alpha']", torch.float64, None if self.alpha is None else self.alpha.numel())
            if not bool((alpha > 0).all()):
                raise ValueError(f"state['alpha']: the bargaining weights are > 0, got {alpha.tolist()}")
        step = check_integer("state['step']", state["step"])
        self.alpha = None if alpha is None else alpha.clone()
        self.step = step

    def reset(self) -> None:
        self.alpha = None
        self.step = 0

    def __repr__(self) -> str:
        return (f"NashMTL(max_norm={self.max_norm}, update_weights_every={self.update_weights_every}, "
                f"max_iters={self.max_iters})")
