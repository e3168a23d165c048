"""PCGrad: projecting conflicting gradients, in random order, from the Gram matrix."""

from __future__ import annotations

import torch

from .._checks import check_state_keys
from .base import GramWeighting, check_gram, nan_unless, normalized_gram, to_device


class PCGrad(GramWeighting):
    """PCGrad (Yu et al., 2020, "Gradient Surgery for Multi-Task Learning", Algorithm 1):

        for each i:  g_i^PC = g_i;  for j in a random permutation of the tasks, j ≠ i:
                         if ⟨g_i^PC, g_j⟩ < 0:  g_i^PC ← g_i^PC − ⟨g_i^PC, g_j⟩ / ‖g_j‖² · g_j
        d = Σ_i g_i^PC

    Every g_i^PC stays a combination Σ_k c_ik g_k of the gradients, and ⟨g_i^PC, g_j⟩ = (C G)_ij,
    so the coefficients follow from the Gram alone: start from C = I, and each projection
    subtracts (C G)_ij / G_jj from C_ij; w = Σ_i C_i (the sum, as in the paper and torchjd).

    The K permutations of a step are drawn on the host from this aggregator's own
    torch.Generator (seeded by `seed`, saved in state_dict), one torch.randperm(K) per task i in
    order, as torchjd draws them from the global generator: with torch.manual_seed(s) before a
    torchjd call and PCGrad(seed=s) here, both use the same permutations. The K problems are
    processed together, one permutation position at a time (K small tensor steps on the device,
    no synchronisation); zero gradients (G_jj = 0) are never projected on.
    """

    def __init__(self, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed: expected an integer, got {seed!r}")
        self.seed = seed
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)

    def permutations(self, K: int) -> torch.Tensor:
        """The next step's K permutations [K, K] (row i: the order in which task i is projected)."""
        return torch.stack([torch.randperm(K, generator=self.generator) for _ in range(K)])

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        K = check_gram(gram)
        G, _, finite = normalized_gram(gram)   # the projection coefficients are ratios of G's entries
        perms = to_device(self.permutations(K), G.device, torch.int64)
        rows = torch.arange(K, device=G.device)
        C = torch.eye(K, dtype=G.dtype, device=G.device)
        diag = torch.diagonal(G)
        safe_diag = torch.where(diag > 0, diag, torch.ones_like(diag))
        for t in range(K):
            j = perms[:, t]                                   # task j_i for each problem i
            inner = (C * G[j]).sum(-1)                        # ⟨g_i^PC, g_{j_i}⟩
            project = (j != rows) & (inner < 0) & (diag[j] > 0)
            step = torch.where(project, inner / safe_diag[j], torch.zeros_like(inner))
            C = C.index_put((rows, j), -step, accumulate=True)
        return nan_unless(finite, C.sum(0)).to(gram.dtype)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned: an integer seed and a CPU generator state (checked on
        a scratch generator first, so a bad one changes nothing)."""
        check_state_keys(state, "state", ("seed", "generator"))
        seed, generator_state = state["seed"], state["generator"]
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"state['seed']: expected an integer, got {seed!r}")
        expected = self.generator.get_state()
        if (not isinstance(generator_state, torch.Tensor) or generator_state.dtype != expected.dtype
                or generator_state.shape != expected.shape):
            got = (f"{generator_state.dtype} tensor of shape {tuple(generator_state.shape)}"
                   if isinstance(generator_state, torch.Tensor) else type(generator_state).__name__)
            raise ValueError(f"state['generator']: expected a {expected.dtype} tensor of shape {tuple(expected.shape)} "
                             f"(torch.Generator.get_state()), got a {got}")
        try:
            torch.Generator(device="cpu").set_state(generator_state)
        except RuntimeError as error:
            raise ValueError(f"state['generator']: not a valid generator state ({error})") from None
        self.seed = seed
        self.generator.set_state(generator_state)

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)

    def __repr__(self) -> str:
        return f"PCGrad(seed={self.seed})"
