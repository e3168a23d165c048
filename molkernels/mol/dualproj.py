"""DualProj: the mean gradient projected onto the dual cone of the gradients."""

from __future__ import annotations

import torch

from .base import nan_unless
from .dualcone import DualConeWeighting, project_weights


class DualProj(DualConeWeighting):
    """DualProj (the projection of Lopez-Paz & Ranzato, 2017, "Gradient Episodic Memory for
    Continual Learning", Eq. 11, applied to the mean gradient, as in torchjd):

        d = π_C(Σ_k p_k g_k),    C = {x : ⟨g_k, x⟩ ≥ 0 ∀k},

    i.e. w = argmin_{v ≥ p} vᵀ Ĝ v, with p the preference vector (1/K each by default) and
    Ĝ = G/trace(G) + reg_eps·I (torchjd's default reg_eps = 1e-4). Solved exactly by one min_norm
    call (see molkernels.mol.dualcone).
    """

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        G, p, finite = self._regularized_and_preference(gram)
        return nan_unless(finite, project_weights(G, p.unsqueeze(0))[0]).to(gram.dtype)

    def __repr__(self) -> str:
        return f"DualProj(pref_vector={self.pref_vector}, reg_eps={self.reg_eps})"
