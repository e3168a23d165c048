"""UPGrad: the mean of the gradients each projected onto the dual cone of all of them."""

from __future__ import annotations

import torch

from .base import nan_unless
from .dualcone import DualConeWeighting, project_weights


class UPGrad(DualConeWeighting):
    """UPGrad (Quinton & Rey, 2024, "Jacobian Descent for Multi-Objective Optimization"):

        d = Σ_i p_i π_C(g_i),    C = {x : ⟨g_k, x⟩ ≥ 0 ∀k}  (the dual cone of the gradients),

    p the preference vector (1/K each by default). In weights: π_C(p_i g_i) = Σ_k v^(i)_k g_k with
    v^(i) = argmin_{v ≥ p_i e_i} vᵀ Ĝ v, and w = Σ_i v^(i). Ĝ = G/trace(G) + reg_eps·I as in torchjd
    (reg_eps = 1e-4 is torchjd's default; it keeps the QP strictly convex; the exact projection is
    the limit reg_eps → 0, and any reg_eps above the Gram's rounding error, ~1e-6 for float32
    gradients, is solved exactly). The K QPs are solved exactly and together by one batched
    min_norm call (see molkernels.mol.dualcone).
    """

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        G, p, finite = self._regularized_and_preference(gram)
        V = project_weights(G, torch.diag(p))
        return nan_unless(finite, V.sum(0)).to(gram.dtype)

    def __repr__(self) -> str:
        return f"UPGrad(pref_vector={self.pref_vector}, reg_eps={self.reg_eps})"
