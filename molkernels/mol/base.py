"""The aggregator interface.

An :class:`Aggregator` turns K per-objective gradients into one update direction:
``aggregate(grads)`` takes a gradient stack (a ``[K, *shape]`` tensor, or a list of per-parameter
blocks ``[K, *shape_j]``) and returns the direction in the stack's structure: a tensor of shape
``shape`` for a tensor stack, a list of per-block tensors of shape ``shape_j`` for a list.

A :class:`GramWeighting` is an aggregator whose direction is ``Σ_k w_k g_k`` with weights that
depend on the gradients only through their Gram matrix ``G = [⟨g_i, g_j⟩]`` (K×K). It implements
``weights(gram) -> w`` with torch ops on the Gram's device (float64 inside, no ``.item()``, no numpy),
and aggregation is then two passes over the gradient memory whatever the method:

    G = molkernels.gram(grads)        pass 1 (fused, one kernel launch for a whole flat buffer)
    w = self.weights(G)               K×K work on the device
    d = molkernels.combine(grads, w)  pass 2

Aggregators that keep state between steps (MoCo, MoDo, Nash-MTL, FAMO, PCGrad's generator) have
``state_dict()`` / ``load_state_dict()``; a resumed run continues identically. ``load_state_dict``
checks every key, shape, dtype and value first (errors name the key: ``state['lam']: ...``; a dict
of another class misses keys) and then applies all of it, or nothing. Stateless aggregators accept
only ``{}``.

Non-finite input: no aggregator returns finite numbers computed from a NaN or an Inf.

* Weights that depend on the Gram (every GramWeighting's ``weights(gram)``, Mean's and Linear's
  included) are NaN, all K of them, when any entry of the Gram is NaN or ±Inf, so the direction
  Σ_k w_k g_k is NaN in every coordinate. A NaN or Inf anywhere in g_k makes row and column k of
  the Gram non-finite, and a Gram that overflows (float32 gradients of norm above ~1e19, float64
  above ~1e154) has Inf entries: both give NaN, never another method's weights. This is arithmetic
  on the device (torch.where on an is-finite flag, see :func:`normalized_gram`): no
  synchronisation, no exception (the eigendecompositions never see the non-finite matrix).
* Every finite Gram, however large or small, gives the method's own weights: they are computed in
  float64 from G divided by its largest |entry| (so nothing in the K×K work overflows), which
  changes nothing but rounding for the scale-invariant methods (all Gram-based ones but
  Nash-MTL), and Nash-MTL puts the scale back exactly (its α scales as 1/√scale).
* Fixed weights (Mean, Linear in aggregate() and mol.backward, which skip the Gram) and FAMO's
  loss weights combine the gradients coordinate by coordinate: a non-finite gradient entry makes
  the coordinates it reaches non-finite (NaN, or ±Inf where IEEE arithmetic keeps one), the other
  coordinates are the exact combination, and the returned weights are the fixed ones. FAMO's
  weights, and so its whole direction, are NaN when a loss is non-finite.
* Stateful aggregators carry a non-finite input into their state, where it stays visible: MoDo's
  λ, Nash-MTL's α, MoCo's Y and λ become NaN (FAMO's logits after ``update()`` with a non-finite
  loss), so every later output is NaN until ``reset()`` or ``load_state_dict()`` of a good state;
  ``load_state_dict`` rejects a NaN state. PCGrad's generator advances as on any step.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .. import _ops
from .._checks import check_state_keys, mark_written
from .._stack import Stack, accum_dtype, as_blocks, check_float_tensor
from ..ops import combine, gram


class Aggregator:
    """Base class: ``aggregate(grads) -> direction`` (also callable as ``aggregator(grads)``).

    Class attributes read by :func:`molkernels.mol.backward`:

    * ``samples``: independent gradient samples per step (1; MoDo: 3, mol.backward then takes a
      list of three loss vectors, one per mini-batch).
    * ``loss_based``: the method needs the losses, not the per-objective gradients (FAMO).
    """

    samples: int = 1
    loss_based: bool = False

    def aggregate(self, grads: Stack):
        raise NotImplementedError

    def __call__(self, *args, **kwargs):
        return self.aggregate(*args, **kwargs)

    def state_dict(self) -> dict:
        """The state a resumed run needs (empty for stateless aggregators)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned (stateless aggregators: only ``{}``)."""
        check_state_keys(state, "state", ())

    def reset(self) -> None:
        """Forget the state (stateless aggregators: nothing to do)."""

    def check_num_objectives(self, K: int, name: str) -> None:
        """Raise ValueError naming `name` when this aggregator cannot take K objectives (fixed
        weights, or a state built for another K). mol.backward calls it before any backward pass."""

    # mol.backward's hook: the per-objective gradients are in flat [K, D] buffers (one per sample),
    # with per-parameter views; write the direction into p.grad and return the weights (or None).
    # process_group (not None): the buffers hold this rank's shard of the parameter dimension, and
    # the K×K matrices the weights come from are summed over the group (molkernels.distributed).
    def _write_grads(self, params: List[torch.Tensor], samples, losses, backend: str,
                     process_group=None) -> Optional[torch.Tensor]:
        if process_group is not None:
            raise ValueError(f"process_group: {type(self).__name__} has no distributed path (the Gram-based "
                             "aggregators, MoCo and MoDo have one)")
        flat, views = samples[0]
        direction = self.aggregate(views)
        for p, d in zip(params, direction):
            p.grad = d
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GramWeighting(Aggregator):
    """An aggregator whose direction is Σ_k w_k g_k with w = weights(G), G the K×K Gram matrix.

    Subclasses implement ``weights(gram)``: a ``[K]`` tensor on the Gram's device, in the Gram's
    dtype, computed with torch ops only (so on CUDA nothing waits for the host, except where a
    subclass says otherwise).
    """

    def weights(self, gram: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def aggregate(self, grads: Stack, *, backend: str = "auto"):
        """Σ_k w_k g_k with w = weights(gram(grads)): two passes over the stack."""
        as_blocks(grads, "grads")
        G = gram(grads, backend=backend)
        w = self.weights(G)
        return combine(grads, w, backend=backend)

    def _write_grads(self, params, samples, losses, backend, process_group=None):
        flat, views = samples[0]
        G = gram(flat, backend=backend)
        if process_group is not None:
            from ..distributed import all_reduce_gram

            G = all_reduce_gram(G, process_group)
        w = self.weights(G)
        write_direction(params, views, w, backend)
        return w


# --------------------------------------------------------------------------------------------------
# Helpers shared by the aggregators


def check_gram(gram: torch.Tensor, name: str = "gram") -> int:
    """Checks a [K, K] float matrix (shapes and dtype only: no synchronisation); returns K."""
    check_float_tensor(gram, name)
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 1:
        raise ValueError(f"{name}: expected a square [K, K] matrix with K >= 1, got shape {tuple(gram.shape)}")
    return gram.shape[0]


def normalized_gram(gram: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Ĝ, scale, finite) for a [K, K] Gram, on its device with no host synchronisation:

    * finite: a 0-dim bool, whether every entry of the Gram is finite;
    * scale: its largest |entry| in float64 (1 when the Gram is 0 or not finite);
    * Ĝ = G / scale in float64, symmetrised: |Ĝ_ij| ≤ 1, so no K×K computation on it overflows
      whatever the gradients' scale. Where the Gram is not finite Ĝ is the identity, so the solvers
      (torch.linalg.eigh among them, which raises on NaN) see a well-posed matrix; the weights
      computed from it are then replaced by NaN with :func:`nan_unless`.
    """
    G = gram.to(torch.float64)
    finite = torch.isfinite(G).all()
    largest = G.abs().amax()
    scale = torch.where(finite & (largest > 0), largest, torch.ones_like(largest))
    G = G / scale
    G = 0.5 * (G + G.T)
    return torch.where(finite, G, torch.eye(G.shape[0], dtype=G.dtype, device=G.device)), scale, finite


def nan_unless(finite: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t where the 0-dim bool `finite` holds, else NaN everywhere (on the device: no synchronisation)."""
    return torch.where(finite, t, torch.full_like(t, float("nan")))


def trace_normalized(G: torch.Tensor) -> torch.Tensor:
    """G / trace(G), and 0 where the trace is 0 (every gradient zero): weights that depend only
    on the directions of the gradients, not on their scale, are computed from this."""
    tr = torch.diagonal(G).sum()
    positive = tr > 0
    return torch.where(positive, G / torch.where(positive, tr, torch.ones_like(tr)), torch.zeros_like(G))


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A host tensor on `device` without a host synchronisation: pinned, non-blocking for CUDA (a
    blocking copy from pageable memory waits for the device)."""
    t = t.to(dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def preference(pref_vector, K: int, like: torch.Tensor, name: str = "pref_vector", cache=None) -> torch.Tensor:
    """The preference vector u (1/K each by default) as a float64 tensor on like's device
    (copied there once per device when `cache`, a dict, is given)."""
    if pref_vector is None:
        return torch.full((K,), 1.0 / K, dtype=torch.float64, device=like.device)
    if pref_vector.shape != (K,):
        raise ValueError(f"{name}: has shape {tuple(pref_vector.shape)}, the Gram is {K}×{K} (K = {K} objectives)")
    if cache is None:
        return to_device(pref_vector, like.device, torch.float64)
    if like.device not in cache:
        cache[like.device] = to_device(pref_vector, like.device, torch.float64)
    return cache[like.device]


def as_pref_vector(pref_vector, name: str = "pref_vector") -> Optional[torch.Tensor]:
    if pref_vector is None:
        return None
    u = pref_vector.detach() if isinstance(pref_vector, torch.Tensor) else torch.as_tensor(pref_vector, dtype=torch.float64)
    if not u.is_floating_point():
        u = u.to(torch.float64)
    if u.dim() != 1 or u.numel() < 1:
        raise ValueError(f"{name}: expected a vector of K values, got shape {tuple(u.shape)}")
    return u.clone()


def grad_outputs(params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """p.grad for each parameter, (re)allocated when missing or unsuitable, to be overwritten."""
    outs = []
    for p in params:
        g = p.grad
        if g is None or g.shape != p.shape or g.dtype != p.dtype or g.device != p.device or not g.is_contiguous():
            p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
        outs.append(p.grad)
    return outs


def write_direction(params, views, weights: torch.Tensor, backend: str = "auto") -> None:
    """p.grad = Σ_k w_k g_k[p] for every parameter (overwritten), in one pass over the stack."""
    outs = grad_outputs(params)
    backend = _ops.resolve_backend(backend, views[0].device)
    w = weights.to(accum_dtype(views[0].dtype))
    _ops.op("combine_into", backend)(list(views), w, outs, 1.0, False)
    mark_written(outs)
