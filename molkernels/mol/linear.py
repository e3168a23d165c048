"""Fixed-weight aggregators: Linear (any weights) and Mean (1/K each)."""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from .._stack import Stack, accum_dtype, as_blocks
from ..ops import combine
from .base import GramWeighting, check_gram, nan_unless, to_device, write_direction


class Linear(GramWeighting):
    """d = Σ_k w_k g_k with fixed weights w (linear scalarisation, the usual weighted sum of losses).

    The weights do not depend on the Gram, so aggregate() and mol.backward skip the Gram pass: one
    pass over the gradient memory (a non-finite gradient entry then reaches only the coordinates
    it is in). weights(gram) is w, or NaN when the Gram has a non-finite entry, like every
    GramWeighting's.
    """

    def __init__(self, weights):
        w = weights.detach() if isinstance(weights, torch.Tensor) else torch.as_tensor(weights, dtype=torch.float64)
        if not w.is_floating_point():
            w = w.to(torch.float64)
        if w.dim() != 1 or w.numel() < 1:
            raise ValueError(f"weights: expected a vector of K >= 1 values, got shape {tuple(w.shape)}")
        self._w = w.to(torch.float64).cpu().clone()
        self._cache: Dict[Tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def num_objectives(self) -> int:
        return self._w.numel()

    def _on(self, device, dtype) -> torch.Tensor:
        key = (torch.device(device), dtype)
        if key not in self._cache:
            self._cache[key] = to_device(self._w, key[0], dtype)
        return self._cache[key]

    def check_num_objectives(self, K: int, name: str) -> None:
        self._check_k(K, name)

    def _check_k(self, K: int, name: str) -> None:
        if K != self.num_objectives:
            raise ValueError(f"{name}: has K = {K} objectives, {type(self).__name__} has {self.num_objectives} weights")

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        K = check_gram(gram)
        self._check_k(K, "gram")
        return nan_unless(torch.isfinite(gram).all(), self._on(gram.device, gram.dtype))

    def aggregate(self, grads: Stack, *, backend: str = "auto"):
        blocks = as_blocks(grads, "grads")
        self._check_k(blocks[0].shape[0], "grads")
        return combine(grads, self._on(blocks[0].device, accum_dtype(blocks[0].dtype)), backend=backend)

    def _write_grads(self, params, samples, losses, backend, process_group=None):
        flat, views = samples[0]  # fixed weights: no Gram, so nothing to reduce across ranks
        self._check_k(flat.shape[0], "losses")
        w = self._on(flat.device, accum_dtype(flat.dtype))
        write_direction(params, views, w, backend)
        return w

    def __repr__(self) -> str:
        return f"Linear(weights={self._w.tolist()})"


class Mean(GramWeighting):
    """d = (1/K) Σ_k g_k, for any K (one pass over the gradient memory; weights(gram) is 1/K, or
    NaN when the Gram has a non-finite entry, as for Linear)."""

    @staticmethod
    def _uniform(K: int, device, dtype) -> torch.Tensor:
        return torch.full((K,), 1.0 / K, dtype=dtype, device=device)

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        K = check_gram(gram)
        return nan_unless(torch.isfinite(gram).all(), self._uniform(K, gram.device, gram.dtype))

    def aggregate(self, grads: Stack, *, backend: str = "auto"):
        blocks = as_blocks(grads, "grads")
        w = self._uniform(blocks[0].shape[0], blocks[0].device, accum_dtype(blocks[0].dtype))
        return combine(grads, w, backend=backend)

    def _write_grads(self, params, samples, losses, backend, process_group=None):
        flat, views = samples[0]  # no Gram, so nothing to reduce across ranks
        w = self._uniform(flat.shape[0], flat.device, accum_dtype(flat.dtype))
        write_direction(params, views, w, backend)
        return w
