"""MoCo and MoDo as aggregators: stochastic multi-objective methods that keep λ between steps.

Both keep the weights λ on the simplex and move them by one projected step per iteration, so they
are stateful; mol.backward runs them with molkernels' fused steps.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from .._checks import check_integer, check_number, check_on_simplex, check_state_keys, check_state_vector
from .._stack import Stack, accum_dtype, as_blocks, check_same_structure
from ..ops import combine, cross_gram, project_simplex
from ..steps import MoCoState, NORMALIZATIONS, moco_step
from .base import Aggregator, check_gram, nan_unless, write_direction


def _placeholders(blocks: List[torch.Tensor]) -> List[torch.Tensor]:
    """Zero-storage stand-ins for parameters shaped like the blocks (molkernels' steps write the
    direction into p.grad)."""
    return [torch.zeros((), dtype=b.dtype, device=b.device).expand(b.shape[1:]) for b in blocks]


class MoCo(Aggregator):
    """MoCo (Fernando et al., 2023, "Mitigating Gradient Bias in Multi-objective Learning: A
    Provably Convergent Approach"), with the tracking variables Y (one per objective gradient):

        t = step;  β_t = beta/(t+1)^beta_decay;  γ_t = gamma/(t+1)^gamma_decay
        Y ← Y − β_t (Y − G)                      (G the objective gradients, optionally normalised)
        λ ← Π_Δ(λ − γ_t (Y Yᵀ + ρ I) λ)
        d = Yᵀ λ

    This wraps molkernels.moco_step (tracking fused with the Gram of Y: two passes over memory).
    mol.backward(losses, params, moco) calls moco_step on the parameters with the flat [K, D]
    gradient buffer; aggregate(grads) tracks the stack it is given (Y then has the stack's
    structure). The state (Y, λ, step) is created on first use for that structure; one MoCo
    object serves one training run. `normalize` ('l2', 'loss', 'loss+') rescales each g_k as in
    moco_step; 'loss' and 'loss+' need the losses (mol.backward passes them).
    """

    def __init__(self, beta: float = 0.5, gamma: float = 0.1, rho: float = 0.0, *, beta_decay: float = 0.0,
                 gamma_decay: float = 0.0, normalize: str = "none", y_init: str = "zero"):
        self.beta = check_number("beta", beta, 0.0, 1.0)
        self.gamma = check_number("gamma", gamma, 0.0)
        self.rho = check_number("rho", rho, 0.0)
        self.beta_decay = check_number("beta_decay", beta_decay, 0.0)
        self.gamma_decay = check_number("gamma_decay", gamma_decay, 0.0)
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize: expected one of {NORMALIZATIONS}, got {normalize!r}")
        if y_init not in ("zero", "first"):
            raise ValueError(f"y_init: expected 'zero' or 'first', got {y_init!r}")
        self.normalize = normalize
        self.y_init = y_init
        self.state: Optional[MoCoState] = None
        self._pending: Optional[dict] = None

    @property
    def lam(self) -> Optional[torch.Tensor]:
        return None if self.state is None else self.state.lam

    def _state_for(self, params, K: int, dtype: torch.dtype) -> MoCoState:
        if self.state is None:
            state = MoCoState(params, K, y_init=self.y_init, dtype=accum_dtype(dtype))
            if self._pending is not None:
                state.load_state_dict(self._pending)  # raises, naming the key, before the state is kept
                self._pending = None
            self.state = state
        elif self.state.num_objectives != K:
            raise ValueError(f"grads: has K = {K} objectives, the MoCo state has {self.state.num_objectives}")
        return self.state

    def check_num_objectives(self, K: int, name: str) -> None:
        if self.state is not None and self.state.num_objectives != K:
            raise ValueError(f"{name}: has K = {K} objectives, the MoCo state has {self.state.num_objectives}")

    def _step(self, params, grads, K, dtype, losses, backend, process_group=None):
        state = self._state_for(params, K, dtype)
        return moco_step(params, grads, state, beta=self.beta, gamma=self.gamma, rho=self.rho, lr=None,
                         beta_decay=self.beta_decay, gamma_decay=self.gamma_decay, normalize=self.normalize,
                         losses=losses, backend=backend, process_group=process_group)

    def aggregate(self, grads: Stack, *, losses=None, backend: str = "auto"):
        """One MoCo step on this stack: updates Y and λ, returns d = Yᵀλ in the stack's structure."""
        blocks = as_blocks(grads, "grads")
        holders = _placeholders(blocks)
        self._step(holders, blocks, blocks[0].shape[0], blocks[0].dtype, losses, backend)
        out = [h.grad for h in holders]
        return out[0] if isinstance(grads, torch.Tensor) else out

    def _write_grads(self, params, samples, losses, backend, process_group=None):
        flat, views = samples[0]
        values = torch.stack([loss.detach().reshape(()) for loss in losses]) if self.normalize in ("loss", "loss+") else None
        return self._step(params, flat, flat.shape[0], flat.dtype, values, backend, process_group).clone()

    def state_dict(self) -> dict:
        if self.state is None:
            return {"state": self._pending}
        return {"state": self.state.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned: {"state": a MoCoState's state_dict, or None}. With a
        state in place, MoCoState.load_state_dict checks and applies it (all or nothing). Before the
        first step the parameters' structure is unknown, so the inner dict is kept and
        MoCoState.load_state_dict checks it when the first step builds the state (a bad one raises
        there, before any change, and again until a good state is loaded or reset())."""
        check_state_keys(state, "state", ("state",))
        inner = state["state"]
        if inner is not None and not isinstance(inner, dict):
            raise TypeError(f"state['state']: expected a dict from MoCoState.state_dict() or None, "
                            f"got {type(inner).__name__}")
        if inner is None:
            self.reset()
        elif self.state is None:
            self._pending = inner
        else:
            self.state.load_state_dict(inner)

    def reset(self) -> None:
        self.state = None
        self._pending = None

    def __repr__(self) -> str:
        return (f"MoCo(beta={self.beta}, gamma={self.gamma}, rho={self.rho}, beta_decay={self.beta_decay}, "
                f"gamma_decay={self.gamma_decay}, normalize={self.normalize!r})")


class MoDo(Aggregator):
    """MoDo (Chen et al., 2023, "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
    Generalization and Conflict-Avoidance"), from three independent mini-batches' gradients:

        λ ← Π_Δ(λ − γ_t (G₁ G₂ᵀ + ρ I) λ),   γ_t = gamma/(t+1)^gamma_decay,   d = G₃ᵀ λ

    (G₁G₂ᵀ one pass over G₁ and G₂ with molkernels.cross_gram, d one pass over G₃, as
    molkernels.modo_step does). ``samples = 3``: mol.backward takes a list of three loss vectors
    (one per mini-batch, each with the K objectives) and computes three flat gradient buffers;
    ``aggregate(grads1, grads2, grads3)`` takes three stacks of one structure; ``weights(matrix)``
    is the λ update alone from a K×K matrix M = G₁G₂ᵀ (torchjd's MoDoWeighting).
    λ starts at 1/K; state_dict() holds λ and the step count.
    """

    samples = 3

    def __init__(self, gamma: float = 0.1, rho: float = 0.0, *, gamma_decay: float = 0.0):
        self.gamma = check_number("gamma", gamma, 0.0)
        self.rho = check_number("rho", rho, 0.0)
        self.gamma_decay = check_number("gamma_decay", gamma_decay, 0.0)
        self.lam: Optional[torch.Tensor] = None  # float64
        self.step = 0

    def weights(self, matrix: torch.Tensor) -> torch.Tensor:
        """λ ← Π_Δ(λ − γ_t (M + ρI) λ) for M = G₁G₂ᵀ [K, K]; returns λ in M's dtype."""
        K = check_gram(matrix, "matrix")
        M = matrix.to(torch.float64)
        if self.lam is None:
            self.lam = torch.full((K,), 1.0 / K, dtype=torch.float64, device=M.device)
        elif self.lam.shape != (K,):
            raise ValueError(f"matrix: has K = {K} objectives, the MoDo state has {self.lam.shape[0]}")
        lam = self.lam.to(M.device)
        gamma_t = self.gamma / (self.step + 1) ** self.gamma_decay
        # A non-finite M makes λ NaN for good (see molkernels.mol.base), whatever the projection
        # makes of an Inf.
        self.lam = nan_unless(torch.isfinite(M).all(), project_simplex(lam - gamma_t * (M @ lam + self.rho * lam)))
        self.step += 1
        return self.lam.to(matrix.dtype)

    def aggregate(self, grads1: Stack, grads2: Stack = None, grads3: Stack = None, *, backend: str = "auto"):
        """One MoDo step: λ from cross_gram(grads1, grads2), d = Σ_k λ_k grads3_k."""
        for value, label in ((grads2, "grads2"), (grads3, "grads3")):
            if value is None:
                raise ValueError(f"{label}: MoDo needs three independent gradient samples; {label} is missing")
        b1, b2, b3 = as_blocks(grads1, "grads1"), as_blocks(grads2, "grads2"), as_blocks(grads3, "grads3")
        check_same_structure(b1, b2, "grads1", "grads2")
        check_same_structure(b1, b3, "grads1", "grads3")
        lam = self.weights(cross_gram(grads1, grads2, backend=backend))
        return combine(grads3, lam.to(accum_dtype(b3[0].dtype)), backend=backend)

    def check_num_objectives(self, K: int, name: str) -> None:
        if self.lam is not None and self.lam.shape != (K,):
            raise ValueError(f"{name}: has K = {K} objectives, the MoDo state has {self.lam.shape[0]}")

    def _write_grads(self, params, samples, losses, backend, process_group=None):
        (f1, _), (f2, _), (f3, views3) = samples
        matrix = cross_gram(f1, f2, backend=backend)
        if process_group is not None:
            from ..distributed import all_reduce_gram

            matrix = all_reduce_gram(matrix, process_group)
        lam = self.weights(matrix)
        write_direction(params, views3, lam, backend)
        return lam

    def state_dict(self) -> dict:
        return {"lam": None if self.lam is None else self.lam.clone(), "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned: λ None or a float64 [K] vector on the simplex (the K
        of the current λ, if there is one: reset() first to load another K), the step an int >= 0;
        checked before anything changes."""
        check_state_keys(state, "state", ("lam", "step"))
        lam = state["lam"]
        if lam is not None:
            size = None if self.lam is None else self.lam.numel()
            check_on_simplex(check_state_vector(lam, "state['lam']", torch.float64, size), "state['lam']")
        step = check_integer("state['step']", state["step"])
        self.lam = None if lam is None else lam.clone()
        self.step = step

    def reset(self) -> None:
        self.lam = None
        self.step = 0

    def __repr__(self) -> str:
        return f"MoDo(gamma={self.gamma}, rho={self.rho}, gamma_decay={self.gamma_decay})"
