"""MGDA: the minimum-norm point of the convex hull of the gradients."""

from __future__ import annotations

import torch

from ..ops import min_norm
from .base import GramWeighting, check_gram, nan_unless, normalized_gram


class MGDA(GramWeighting):
    """MGDA (Désidéri, 2012, "Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization"; Sener & Koltun, 2018, "Multi-Task Learning as Multi-Objective Optimization"):

        w = argmin_{w ∈ Δ} wᵀ G w,      d = Σ_k w_k g_k,

    the minimum-norm element of the convex hull of the gradients, a common descent direction
    (⟨g_k, d⟩ ≥ ‖d‖² for every k) unless it is 0 (a Pareto-stationary point).

    Solved exactly by molkernels.min_norm (Wolfe's active-set algorithm in float64 on the device),
    where torchjd and LibMTL run a fixed number of Frank-Wolfe iterations.
    """

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        check_gram(gram)
        G, _, finite = normalized_gram(gram)     # the min-norm weights do not depend on the scale
        return nan_unless(finite, min_norm(G)).to(gram.dtype)
