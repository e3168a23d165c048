"""IMTL-G: impartial multi-task learning, the gradient part."""

from __future__ import annotations

import torch

from .base import GramWeighting, check_gram, nan_unless, normalized_gram, trace_normalized


def pinv_psd(G: torch.Tensor, rtol: float) -> torch.Tensor:
    """Pseudo-inverse of a symmetric PSD matrix: eigenvalues ≤ rtol·max eigenvalue count as 0."""
    e, V = torch.linalg.eigh(G)
    keep = e > rtol * e.max().clamp(min=0)
    inv = torch.where(keep, 1.0 / torch.where(keep, e, torch.ones_like(e)), torch.zeros_like(e))
    return (V * inv) @ V.T


class IMTLG(GramWeighting):
    """IMTL-G (Liu et al., 2021, "Towards Impartial Multi-task Learning"), in the form of Quinton &
    Rey (2024) and torchjd that allows linearly dependent gradients:

        v = G⁺ n,  n_k = ‖g_k‖ = √G_kk,    w = v / Σ_k v_k   (w = 0 when Σ v = 0),

    so that d = Σ w_k g_k has the same projection ⟨d, g_k/‖g_k‖⟩ = 1/Σv onto every unit gradient,
    with Σ w = 1. G⁺ is the eigendecomposition pseudo-inverse in float64 of G/trace(G) (the weights do
    not depend on the scale of G); eigenvalues below K·ε·λ_max count as zero, ε the machine epsilon
    of the Gram's dtype, as torch.linalg.pinv does for that dtype.

    On CUDA, torch.linalg.eigh checks its result on the host: one synchronisation per step.
    """

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        K = check_gram(gram)
        G, _, finite = normalized_gram(gram)
        G = trace_normalized(G)
        n = torch.diagonal(G).clamp(min=0).sqrt()
        v = pinv_psd(G, K * torch.finfo(gram.dtype).eps) @ n
        total = v.sum()
        ok = total.abs() > 1e-12
        w = torch.where(ok, v / torch.where(ok, total, torch.ones_like(total)), torch.zeros_like(v))
        return nan_unless(finite, w).to(gram.dtype)
