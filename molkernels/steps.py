"""Fused multi-objective steps: MoCo, MoDo and MGDA in two passes over memory, no host sync.

Each step takes the parameters and a gradient stack aligned with them (block j of shape
[K, *params[j].shape], or one flat [K, D] tensor cut into per-parameter views), computes the
weights λ on the device and writes the combined direction d = Σ_k λ_k g_k either into p.grad
(lr=None, overwriting it, so any torch optimizer can take the step) or straight into the
parameters (p ← p − lr·d).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

from . import _ops
from ._stack import Stack, accum_dtype, as_blocks, flat_buffer
from .profiling import nvtx_range

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


def _check_scalar(value, name: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")


def _aligned_blocks(params: Sequence[torch.Tensor], grads: Stack, K: int, name: str) -> List[torch.Tensor]:
    """grads as per-parameter blocks [K, *p.shape]; a flat [K, D] tensor is cut into views."""
    single_block = len(params) == 1 and isinstance(grads, torch.Tensor) and grads.shape[1:] == params[0].shape
    if isinstance(grads, torch.Tensor) and not single_block:
        if grads.dim() != 2:
            raise ValueError(f"{name}: a tensor stack is one flat [K, D] buffer, got shape {tuple(grads.shape)}")
        total = sum(p.numel() for p in params)
        if grads.shape[1] != total:
            raise ValueError(f"{name}: flat stack has D = {grads.shape[1]} columns, the parameters have {total} elements")
        if grads.stride(1) != 1:
            raise ValueError(f"{name}: a flat stack needs contiguous rows")
        views, offset = [], 0
        for p in params:
            views.append(grads[:, offset:offset + p.numel()].view(grads.shape[0], *p.shape))
            offset += p.numel()
        grads = views
    blocks = as_blocks(grads, name)
    if len(blocks) != len(params):
        raise ValueError(f"{name}: has {len(blocks)} blocks for {len(params)} parameters")
    for j, (block, p) in enumerate(zip(blocks, params)):
        if block.shape[0] != K:
            raise ValueError(f"{name}[{j}]: has K = {block.shape[0]} objectives, the state has {K}")
        if block.shape[1:] != p.shape:
            raise ValueError(f"{name}[{j}]: shape {tuple(block.shape)} does not match parameter {j} of shape "
                             f"{tuple(p.shape)} (expected {(K, *p.shape)})")
        if block.device != p.device:
            raise ValueError(f"{name}[{j}]: on {block.device}, parameter {j} on {p.device}")
    return blocks


def _outputs(params: Sequence[torch.Tensor], lr: Optional[float]):
    """Where the direction goes: (tensors, alpha, accumulate)."""
    if lr is None:
        outs = []
        for p in params:
            if p.grad is None or p.grad.shape != p.shape or not p.grad.is_contiguous():
                p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
            outs.append(p.grad)
        return outs, 1.0, False
    for j, p in enumerate(params):
        if not p.is_contiguous():
            raise ValueError(f"params[{j}]: must be contiguous to be updated in place")
    return [p.detach() for p in params], -float(lr), True


def _check_params(params) -> List[torch.Tensor]:
    params = list(params)
    if not params:
        raise ValueError("params: expected at least one parameter")
    for j, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise TypeError(f"params[{j}]: expected a floating-point tensor")
    return params


def _simplex_step(lam: torch.Tensor, matrix: torch.Tensor, gamma: float, rho: float, backend: str) -> torch.Tensor:
    """Π_Δ(λ − γ (M + ρ I) λ), on the device."""
    direction = matrix @ lam + rho * lam
    return _ops.op("project_simplex", backend)(lam - gamma * direction)


def _all_reduce(matrix: torch.Tensor, process_group) -> torch.Tensor:
    """The sharded steps' one collective: the local K×K (or 2K×2K) matrix summed over the group."""
    from .distributed import all_reduce_gram

    return all_reduce_gram(matrix, process_group)


def _raise_if_not_finite(gram: torch.Tensor, lam: torch.Tensor) -> None:
    """check_finite=True: one host sync to catch a diverged run early."""
    if not bool(torch.isfinite(gram).all()):
        raise FloatingPointError("the Gram matrix of the objective gradients is not finite")
    if not bool(torch.isfinite(lam).all()):
        raise FloatingPointError("the objective weights λ are not finite")


class _StepState:
    """λ on the simplex and the step count, with state_dict()/load_state_dict()."""

    def __init__(self, params, num_objectives: int, *, dtype: torch.dtype = torch.float32):
        params = _check_params(params)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype: the state is float32 or float64, got {dtype}")
        if isinstance(num_objectives, bool) or not isinstance(num_objectives, int) or num_objectives < 1:
            raise ValueError(f"num_objectives: expected an integer >= 1, got {num_objectives!r}")
        self.num_objectives = num_objectives
        self.shapes = [p.shape for p in params]
        self.device = params[0].device
        self.lam = torch.full((num_objectives,), 1.0 / num_objectives, dtype=dtype, device=self.device)
        self.step = 0

    def _check_matches(self, params: List[torch.Tensor]) -> None:
        if [p.shape for p in params] != self.shapes:
            raise ValueError("params: shapes differ from the ones the state was created for")

    def state_dict(self) -> dict:
        return {"lam": self.lam.clone(), "step": self.step, "num_objectives": self.num_objectives}

    def load_state_dict(self, state: dict) -> None:
        if state["num_objectives"] != self.num_objectives:
            raise ValueError(f"state: has {state['num_objectives']} objectives, this state {self.num_objectives}")
        self.lam.copy_(state["lam"])
        self.step = int(state["step"])


class MoDoState(_StepState):
    """MoDo's state: the weights λ (in `dtype`, float32 by default, starting at 1/K) and the step
    count."""


class MoCoState(_StepState):
    """MoCo's state: the tracked gradients Y ([K, *p.shape] per parameter, views of one flat
    [K, D] buffer in `dtype`: float32 by default, float64 for float64 gradients), λ (in `dtype`,
    starting at 1/K) and the step count.

    y_init="zero" starts Y at 0 as the published code does; "first" sets Y to the first gradients.
    """

    def __init__(self, params, num_objectives: int, *, y_init: str = "zero", dtype: torch.dtype = torch.float32):
        super().__init__(params, num_objectives, dtype=dtype)
        if y_init not in ("zero", "first"):
            raise ValueError(f"y_init: expected 'zero' or 'first', got {y_init!r}")
        self.y_init = y_init
        self.y_flat, self.y = flat_buffer(self.shapes, num_objectives, dtype=dtype, device=self.device)
        self.y_flat.zero_()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "y": self.y_flat.clone(), "y_init": self.y_init}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state["y"].shape != self.y_flat.shape:
            raise ValueError(f"state: y has shape {tuple(state['y'].shape)}, expected {tuple(self.y_flat.shape)}")
        self.y_flat.copy_(state["y"])
        self.y_init = state["y_init"]


def _normalization_scale(normalize: str, grad_sq_norms: torch.Tensor, losses, K: int, device) -> torch.Tensor:
    """Per-objective factors s_k applied to g_k (MGDA-UB's normalisations and LibMTL-MoCo's):
    'l2': 1/‖g_k‖; 'loss': 1/f_k; 'loss+': f_k/‖g_k‖ (unit gradients scaled by their loss)."""
    norms = grad_sq_norms.clamp(min=0).sqrt()
    tiny = torch.finfo(norms.dtype).tiny
    if normalize == "l2":
        return 1.0 / norms.clamp(min=tiny)
    if losses is None:
        raise ValueError(f"losses: normalize={normalize!r} needs the K loss values")
    f = torch.as_tensor(losses, dtype=norms.dtype, device=device).detach().reshape(-1)
    if f.shape != (K,):
        raise ValueError(f"losses: expected {K} values, got shape {tuple(f.shape)}")
    if normalize == "loss":
        return 1.0 / f
    return f / norms.clamp(min=tiny)


def moco_step(params, grads: Stack, state: MoCoState, beta: float = 0.5, gamma: float = 0.1, rho: float = 0.0,
              lr: Optional[float] = None, *, beta_decay: float = 0.0, gamma_decay: float = 0.0,
              normalize: str = "none", losses=None, check_finite: bool = False,
              backend: str = "auto", process_group=None) -> torch.Tensor:
    """One MoCo step (Fernando et al., 2023), in two passes over the gradient and tracking memory:

        t = state.step;  β_t = beta/(t+1)^beta_decay;  γ_t = gamma/(t+1)^gamma_decay
        Y ← Y − β_t (Y − S G)                 pass 1, fused with the Gram Y Yᵀ
        λ ← Π_Δ(λ − γ_t (Y Yᵀ + ρ I) λ)       on the device
        d = Yᵀ λ                              pass 2: p.grad = d (lr=None) or p ← p − lr·d

    S = I unless `normalize` ('l2', 'loss', 'loss+', see _normalization_scale) rescales each g_k;
    then pass 1 reads Y and G for the Gram of [Y; G], and the update of Y moves to pass 2.
    Returns λ (a device tensor; no host synchronisation unless check_finite=True).

    process_group: params, grads and the state hold this rank's shard of the parameter dimension
    (molkernels.distributed); the local Gram of pass 1 (K×K, or the 2K×2K Gram of [Y; G] with a
    normalisation, whose norms then come from the full Gram) is summed over the group with one
    all_reduce between pass 1 and the λ update, the step's only collective; every rank gets the
    same λ and combines its shard. `losses` are then the global losses (the same on every rank).
    """
    params = _check_params(params)
    state._check_matches(params)
    K = state.num_objectives
    blocks = _aligned_blocks(params, grads, K, "grads")
    for value, name in ((beta, "beta"), (gamma, "gamma"), (rho, "rho"), (beta_decay, "beta_decay"),
                        (gamma_decay, "gamma_decay")):
        _check_scalar(value, name)
    _check_scalar(lr, "lr", allow_none=True)
    if beta > 1:
        raise ValueError(f"beta: expected a value in [0, 1], got {beta}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize: expected one of {NORMALIZATIONS}, got {normalize!r}")
    if accum_dtype(blocks[0].dtype) != state.y_flat.dtype:
        raise TypeError(f"grads: {blocks[0].dtype} gradients need a {accum_dtype(blocks[0].dtype)} tracking state, "
                        f"the state is {state.y_flat.dtype}")
    backend = _ops.resolve_backend(backend, blocks[0].device)
    t = state.step
    beta_t = 1.0 if (t == 0 and state.y_init == "first") else beta / (t + 1) ** beta_decay
    gamma_t = gamma / (t + 1) ** gamma_decay
    outs, alpha, accumulate = _outputs(params, lr)
    with nvtx_range("moco_step"):
        if normalize == "none":
            yy = _ops.op("moco_track_gram", backend)(state.y, blocks, beta_t)
            if process_group is not None:
                yy = _all_reduce(yy, process_group)
        else:
            joint = _ops.op("joint_gram", backend)(state.y, blocks)
            if process_group is not None:
                joint = _all_reduce(joint, process_group)
            scale = _normalization_scale(normalize, torch.diagonal(joint)[K:], losses, K, joint.device)
            old, cross, gg = joint[:K, :K], joint[:K, K:], joint[K:, K:]
            yy = ((1 - beta_t) ** 2 * old + beta_t * (1 - beta_t) * (cross * scale + scale[:, None] * cross.T)
                  + beta_t ** 2 * scale[:, None] * gg * scale)
        lam = _simplex_step(state.lam, yy.to(state.lam.dtype), gamma_t, rho, backend)
        if check_finite:
            _raise_if_not_finite(yy, lam)
        if normalize == "none":
            _ops.op("combine_into", backend)(state.y, lam, outs, alpha, accumulate)
        else:
            _ops.op("moco_track_combine", backend)(state.y, blocks, scale, beta_t, lam, outs, alpha, accumulate)
    state.lam.copy_(lam)
    state.step += 1
    return state.lam


def modo_step(params, grads1: Stack, grads2: Stack, grads3: Stack, state: MoDoState, gamma: float = 0.1,
              rho: float = 0.0, lr: Optional[float] = None, *, gamma_decay: float = 0.0, check_finite: bool = False,
              backend: str = "auto", process_group=None) -> torch.Tensor:
    """One MoDo step (Chen et al., 2023) from three independent mini-batches' gradient stacks:

        λ ← Π_Δ(λ − γ_t (G₁ G₂ᵀ + ρ I) λ)     one pass over G₁ and G₂ (cross_gram)
        d = G₃ᵀ λ                             one pass over G₃: p.grad = d or p ← p − lr·d

    process_group: the stacks hold this rank's shard; G₁G₂ᵀ is summed over the group with one
    K×K all_reduce (the only collective) before the λ update.
    """
    params = _check_params(params)
    state._check_matches(params)
    K = state.num_objectives
    for value, label in ((grads2, "grads2"), (grads3, "grads3")):
        if value is None:
            raise ValueError(f"{label}: MoDo needs three independent gradient samples; {label} is missing")
    g1 = _aligned_blocks(params, grads1, K, "grads1")
    g2 = _aligned_blocks(params, grads2, K, "grads2")
    g3 = _aligned_blocks(params, grads3, K, "grads3")
    for value, name in ((gamma, "gamma"), (rho, "rho"), (gamma_decay, "gamma_decay")):
        _check_scalar(value, name)
    _check_scalar(lr, "lr", allow_none=True)
    backend = _ops.resolve_backend(backend, g1[0].device)
    gamma_t = gamma / (state.step + 1) ** gamma_decay
    outs, alpha, accumulate = _outputs(params, lr)
    with nvtx_range("modo_step"):
        cross = _ops.op("cross_gram", backend)(g1, g2)
        if process_group is not None:
            cross = _all_reduce(cross, process_group)
        lam = _simplex_step(state.lam, cross.to(state.lam.dtype), gamma_t, rho, backend)
        if check_finite:
            _raise_if_not_finite(cross, lam)
        _ops.op("combine_into", backend)(g3, lam, outs, alpha, accumulate)
    state.lam.copy_(lam)
    state.step += 1
    return state.lam


def mgda_step(params, grads: Stack, lr: Optional[float] = None, *, normalize: str = "none", losses=None,
              check_finite: bool = False, backend: str = "auto", process_group=None) -> torch.Tensor:
    """One MGDA step (Désidéri, 2012; Sener & Koltun, 2018): λ = argmin_{λ ∈ Δ} λᵀ G Gᵀ λ (exact,
    on the device), d = Gᵀ λ, the min-norm point of the convex hull of the gradients.

    normalize ('l2', 'loss', 'loss+'; see _normalization_scale) takes the min-norm point of the
    rescaled gradients s_k g_k instead (MGDA-UB's normalisations), so that an objective whose
    gradient is short does not take all the weight: λ = argmin λᵀ S G Gᵀ S λ, d = Σ_k λ_k s_k g_k.
    The norms come from the Gram's diagonal, so this costs no extra pass. Returns λ.

    process_group: the stack holds this rank's shard; the Gram is summed over the group with one
    K×K all_reduce (the only collective), and every rank solves the same λ."""
    params = _check_params(params)
    if isinstance(grads, torch.Tensor):
        K = grads.shape[0]
    else:
        K = as_blocks(grads, "grads")[0].shape[0]
    blocks = _aligned_blocks(params, grads, K, "grads")
    _check_scalar(lr, "lr", allow_none=True)
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize: expected one of {NORMALIZATIONS}, got {normalize!r}")
    if normalize in ("loss", "loss+") and losses is None:
        raise ValueError(f"losses: normalize={normalize!r} needs the K loss values")
    backend = _ops.resolve_backend(backend, blocks[0].device)
    outs, alpha, accumulate = _outputs(params, lr)
    with nvtx_range("mgda_step"):
        gram = _ops.op("gram", backend)(blocks)
        if process_group is not None:
            gram = _all_reduce(gram, process_group)
        if normalize == "none":
            lam = _ops.op("min_norm", backend)(gram)
            weights = lam
        else:
            scale = _normalization_scale(normalize, torch.diagonal(gram), losses, K, gram.device)
            lam = _ops.op("min_norm", backend)(scale[:, None] * gram * scale)
            weights = lam * scale
        if check_finite:
            _raise_if_not_finite(gram, lam)
        _ops.op("combine_into", backend)(blocks, weights, outs, alpha, accumulate)
    return lam
