"""FAMO: fast adaptive multitask optimisation, from the losses alone."""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch

from .._checks import check_integer, check_number, check_state_keys, check_state_vector
from .._stack import Stack, accum_dtype, as_blocks
from ..ops import combine
from .base import Aggregator, nan_unless


class FAMO(Aggregator):
    """FAMO (Liu et al., 2023, "FAMO: Fast Adaptive Multitask Optimization"), as in the authors'
    code: logits ξ ∈ R^K, z = softmax(ξ), and with D_k = ℓ_k − ℓ_k^min + eps,

        weighted loss:  L = Σ_k z_k log D_k / c,   c = Σ_k z_k / D_k  (c held constant),
        so ∇L = Σ_k w_k ∇ℓ_k with w_k = z_k / (c D_k)  (Σ w = 1):

    one backward pass, no per-objective gradients. After the optimiser step, with the new losses
    ℓ' (on the same batch, or the next one):

        δ_k = log D_k − log D'_k   (the decrease of log ℓ_k),
        ξ ← Adam step (lr = w_lr, weight_decay = gamma) with gradient ∂(zᵀδ)/∂ξ = z ⊙ (δ − zᵀδ).

    API (the loop of the paper):

        famo = FAMO(K)
        mol.backward(losses, params, famo)   # or famo.backward(losses, params): writes p.grad
        optimizer.step()
        famo.update(new_losses)              # new losses after the step

    ``backward(losses)`` without params calls loss.backward() (accumulating into .grad, as the
    official code does); with params it overwrites p.grad, like mol.backward. ``aggregate(grads,
    losses)`` gives the same direction Σ_k w_k g_k from given per-objective gradients.
    ``max_norm > 0`` clips the norm of the gradient written over ``params``.

    A non-finite loss makes the weights, the weighted loss and so the whole direction NaN; given to
    update() (as either loss), it makes the logits NaN, and every later weight NaN until reset().
    """

    loss_based = True

    def __init__(self, num_objectives: int, *, gamma: float = 0.01, w_lr: float = 0.025, min_losses=None,
                 eps: float = 1e-8, max_norm: float = 0.0, device=None):
        check_integer("num_objectives", num_objectives, 1)
        for value, name in ((gamma, "gamma"), (w_lr, "w_lr"), (eps, "eps"), (max_norm, "max_norm")):
            check_number(name, value, 0.0)
        self.num_objectives = num_objectives
        self.gamma, self.w_lr, self.eps, self.max_norm = float(gamma), float(w_lr), float(eps), float(max_norm)
        self.logits = torch.zeros(num_objectives, dtype=torch.float32, device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.logits], lr=self.w_lr, weight_decay=self.gamma)
        self.min_losses = self._vector(min_losses if min_losses is not None else torch.zeros(num_objectives),
                                       "min_losses")
        self.prev_losses: Optional[torch.Tensor] = None

    def _vector(self, values, name: str) -> torch.Tensor:
        if isinstance(values, (list, tuple)):
            if len(values) == 0:
                raise ValueError(f"{name}: expected {self.num_objectives} losses, got none")
            values = torch.stack([torch.as_tensor(v).detach().reshape(()).to(torch.float32) for v in values])
        v = torch.as_tensor(values).detach()
        if v.numel() != self.num_objectives:
            raise ValueError(f"{name}: expected {self.num_objectives} losses, got {v.numel()}")
        return v.reshape(-1).to(device=self.logits.device, dtype=torch.float32)

    @property
    def z(self) -> torch.Tensor:
        """The task weights softmax(ξ)."""
        return torch.softmax(self.logits.detach(), -1)

    def check_num_objectives(self, K: int, name: str) -> None:
        if K != self.num_objectives:
            raise ValueError(f"{name}: expected {self.num_objectives} losses, got {K}")

    def loss_weights(self, losses) -> torch.Tensor:
        """w_k = z_k / (c D_k): the weights of the objective gradients in ∇L (Σ w = 1)."""
        D = self._vector(losses, "losses") - self.min_losses + self.eps
        ratio = self.z / D
        return nan_unless(torch.isfinite(D).all(), ratio / ratio.sum())

    def weighted_loss(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        """L = Σ_k z_k log D_k / c, differentiable in the losses; records them for update()."""
        if isinstance(losses, torch.Tensor):
            stacked = losses.reshape(-1)
        else:
            if len(losses) == 0:
                raise ValueError(f"losses: expected {self.num_objectives} losses, got none")
            stacked = torch.stack([loss.reshape(()) for loss in losses])
        if stacked.numel() != self.num_objectives:
            raise ValueError(f"losses: expected {self.num_objectives} losses, got {stacked.numel()}")
        z = self.z.to(stacked.device)
        D = stacked - self.min_losses.to(stacked.device, stacked.dtype) + self.eps
        # An Inf loss would otherwise get the weight z_k/(c·Inf) = 0 and drop out of a finite L.
        c = nan_unless(torch.isfinite(D).all(), (z / D).sum().detach())
        self.prev_losses = stacked.detach().to(torch.float32).clone()
        return (torch.log(D) * z).sum() / c

    def backward(self, losses, params=None, *, retain_graph: bool = False) -> torch.Tensor:
        """Backward of the weighted loss. Without params: loss.backward() (accumulates into .grad);
        with params: p.grad = ∂L/∂p (overwritten; zeros for parameters L does not reach), clipped
        to max_norm when it is > 0. Returns the weights w of the objective gradients."""
        loss = self.weighted_loss(losses)
        w = self.loss_weights(self.prev_losses)
        if params is None:
            loss.backward(retain_graph=retain_graph)
            return w
        params = list(params)
        grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = torch.zeros_like(p) if g is None else g.detach()
        if self.max_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        return w

    def update(self, new_losses) -> None:
        """One Adam step on the logits from the decrease of the log-losses since backward()."""
        if self.prev_losses is None:
            raise RuntimeError("update: call backward() (or weighted_loss()) with the current losses first")
        new = self._vector(new_losses, "new_losses")
        delta = (torch.log(self.prev_losses - self.min_losses + self.eps)
                 - torch.log(new - self.min_losses + self.eps))
        z = self.z
        self.optimizer.zero_grad(set_to_none=False)
        self.logits.grad = nan_unless(torch.isfinite(delta).all(), z * (delta - (z * delta).sum()))
        self.optimizer.step()

    def set_min_losses(self, min_losses) -> None:
        self.min_losses = self._vector(min_losses, "min_losses")

    def aggregate(self, grads: Stack, losses=None, *, backend: str = "auto"):
        """Σ_k w_k g_k with FAMO's weights w for these losses (the direction of ∇L)."""
        if losses is None:
            raise ValueError("losses: FAMO weights the objective gradients by the losses; pass losses=")
        blocks = as_blocks(grads, "grads")
        if blocks[0].shape[0] != self.num_objectives:
            raise ValueError(f"grads: has K = {blocks[0].shape[0]} objectives, FAMO has {self.num_objectives}")
        w = self.loss_weights(losses).to(device=blocks[0].device, dtype=accum_dtype(blocks[0].dtype))
        return combine(grads, w, backend=backend)

    def state_dict(self) -> dict:
        return {"logits": self.logits.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "min_losses": self.min_losses.clone(),
                "prev_losses": None if self.prev_losses is None else self.prev_losses.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned. Checked before anything changes: finite float32 [K]
        logits, min_losses and prev_losses (or None), and an Adam state for this FAMO's one
        parameter with its hyperparameters (w_lr, gamma, ...) and float32 [K] moments."""
        check_state_keys(state, "state", ("logits", "optimizer", "min_losses", "prev_losses"))
        K = self.num_objectives
        logits = check_state_vector(state["logits"], "state['logits']", torch.float32, K)
        min_losses = check_state_vector(state["min_losses"], "state['min_losses']", torch.float32, K)
        prev = state["prev_losses"]
        if prev is not None:
            check_state_vector(prev, "state['prev_losses']", torch.float32, K)
        self._check_optimizer_state(state["optimizer"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))  # no aliasing of the caller's moments
        with torch.no_grad():
            self.logits.copy_(logits)
        self.min_losses = min_losses.to(self.logits.device).clone()
        self.prev_losses = None if prev is None else prev.to(self.logits.device).clone()

    def _check_optimizer_state(self, saved) -> None:
        """Raises unless `saved` is an Adam state_dict this FAMO's optimizer can load unchanged
        (torch.optim would take the saved hyperparameters and cast the moments silently)."""
        label = "state['optimizer']"
        if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
            raise ValueError(f"{label}: expected torch.optim.Adam.state_dict() (keys 'state', 'param_groups'), got "
                             f"{list(saved) if isinstance(saved, dict) else type(saved).__name__}")
        groups = saved["param_groups"]
        if not isinstance(groups, list) or len(groups) != 1 or not isinstance(groups[0], dict) \
                or groups[0].get("params") != [0]:
            raise ValueError(f"{label}['param_groups']: expected one group holding the logits (params [0]), got {groups!r}")
        ours = self.optimizer.state_dict()["param_groups"][0]
        for key in ("lr", "weight_decay"):
            if key not in groups[0]:
                raise ValueError(f"{label}['param_groups'][0]: missing {key!r}")
        for key, value in groups[0].items():
            if key in ours and key != "params" and value != ours[key]:
                raise ValueError(f"{label}['param_groups'][0][{key!r}]: {value!r}, this FAMO's optimizer has "
                                 f"{ours[key]!r} (w_lr={self.w_lr}, gamma={self.gamma})")
        moments = saved["state"]
        if not isinstance(moments, dict) or set(moments) - {0}:
            raise ValueError(f"{label}['state']: expected {{}} or the state of parameter 0, got keys "
                             f"{list(moments) if isinstance(moments, dict) else type(moments).__name__}")
        if 0 not in moments:
            return
        entry = moments[0]
        if not isinstance(entry, dict) or set(entry) != {"step", "exp_avg", "exp_avg_sq"}:
            raise ValueError(f"{label}['state'][0]: expected the keys ['step', 'exp_avg', 'exp_avg_sq'], got "
                             f"{list(entry) if isinstance(entry, dict) else type(entry).__name__}")
        step = entry["step"]
        if not isinstance(step, torch.Tensor) or step.dim() != 0 or not step.is_floating_point() \
                or not bool(torch.isfinite(step)) or bool(step < 1) or bool(step != step.round()):
            raise ValueError(f"{label}['state'][0]['step']: expected a 0-dim float tensor holding an integer >= 1, "
                             f"got {step!r}")
        K = self.num_objectives
        check_state_vector(entry["exp_avg"], f"{label}['state'][0]['exp_avg']", torch.float32, K)
        exp_avg_sq = check_state_vector(entry["exp_avg_sq"], f"{label}['state'][0]['exp_avg_sq']", torch.float32, K)
        if bool((exp_avg_sq < 0).any()):
            raise ValueError(f"{label}['state'][0]['exp_avg_sq']: a mean of squares is >= 0, got {exp_avg_sq.tolist()}")

    def reset(self) -> None:
        with torch.no_grad():
            self.logits.zero_()
        self.optimizer = torch.optim.Adam([self.logits], lr=self.w_lr, weight_decay=self.gamma)
        self.prev_losses = None

    def __repr__(self) -> str:
        return f"FAMO(num_objectives={self.num_objectives}, gamma={self.gamma}, w_lr={self.w_lr})"
