"""Aligned-MTL: aligning the principal components of the gradient matrix."""

from __future__ import annotations

import torch

from .base import GramWeighting, as_pref_vector, check_gram, nan_unless, normalized_gram, preference

SCALE_MODES = ("min", "median", "rmse")


class AlignedMTL(GramWeighting):
    """Aligned-MTL (Senushkin et al., 2023, "Independent Component Alignment for Multi-Task
    Learning", Algorithm 1), as in torchjd and the authors' code:

        G = V Σ Vᵀ (eigendecomposition, the r eigenvalues σ_1 ≥ … ≥ σ_r > tol kept),
        B = √σ_s · V_r Σ_r^{-1/2} V_rᵀ,      w = B p,

    With J = V Σ^{1/2} Wᵀ the gradient matrix (rows g_k), B J = √σ_s V_r W_rᵀ =: J_aligned has
    orthogonal rows of equal norm √σ_s (condition number 1), and d = Σ_k w_k g_k = J_alignedᵀ p. σ_s is the smallest kept
    eigenvalue (scale_mode="min", the paper's), their median ("median"), or mean ("rmse", the
    authors' code's option). tol = max σ · K · ε(dtype of the Gram), as torchjd; with no eigenvalue
    above it, B = I. p is the preference vector (1/K each by default). Computed in float64.

    On CUDA, torch.linalg.eigh checks its result on the host: one synchronisation per step.
    """

    def __init__(self, pref_vector=None, *, scale_mode: str = "min"):
        if scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode: expected one of {SCALE_MODES}, got {scale_mode!r}")
        self.pref_vector = as_pref_vector(pref_vector)
        self._pref_cache = {}
        self.scale_mode = scale_mode

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        K = check_gram(gram)
        G, _, finite = normalized_gram(gram)   # the weights do not depend on the scale of G
        p = preference(self.pref_vector, K, G, cache=self._pref_cache)
        e, V = torch.linalg.eigh(G)                      # ascending
        e, V = e.flip(0), V.flip(1)                      # descending
        tol = e[0] * K * torch.finfo(gram.dtype).eps
        keep = e > tol
        rank = keep.sum()
        inv_sqrt = torch.where(keep, torch.where(keep, e, torch.ones_like(e)).rsqrt(), torch.zeros_like(e))
        if self.scale_mode == "min":
            scale = torch.where(keep, e, torch.full_like(e, float("inf"))).min()
        elif self.scale_mode == "median":
            # torch.median's lower median of the kept eigenvalues, in descending order index
            # rank − 1 − (rank − 1) // 2
            index = (rank - 1 - torch.div(rank - 1, 2, rounding_mode="floor")).clamp(min=0)
            scale = e.index_select(0, index.reshape(1)).squeeze(0)  # a device index, no .item()
        else:
            scale = torch.where(keep, e, torch.zeros_like(e)).sum() / rank.clamp(min=1)
        B = scale.clamp(min=0).sqrt() * (V * inv_sqrt) @ V.T
        B = torch.where(rank > 0, B, torch.eye(K, dtype=G.dtype, device=G.device))
        return nan_unless(finite, B @ p).to(gram.dtype)

    def __repr__(self) -> str:
        return f"AlignedMTL(pref_vector={self.pref_vector}, scale_mode={self.scale_mode!r})"
