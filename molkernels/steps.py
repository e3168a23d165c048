"""Fused multi-objective steps: MoCo, MoDo and MGDA in two passes over memory, no host sync.

Each step takes the parameters (a list of tensors, or one tensor as the only parameter) and a
gradient stack aligned with them (block j of shape [K, *params[j].shape], or one flat [K, D]
tensor cut into per-parameter views), computes the weights λ on the device and writes the
combined direction d = Σ_k λ_k g_k either into p.grad (lr=None, overwriting it, so any torch
optimizer can take the step) or straight into the parameters (p ← p − lr·d).

Every argument is checked before any kernel runs, from shapes, dtypes, devices and addresses only
(no host synchronisation): a bad one raises ValueError/TypeError naming it, and the parameters,
their gradients and the state are left as they were. The steps take no part in autograd: they run
under torch.no_grad() and bump the version counter of every tensor they write (parameters, p.grad,
MoCo's Y), as torch.optim does, so a graph built before the step refuses to backpropagate through
the changed values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import List, Optional, Sequence, Tuple

import torch

from . import _ops
from ._checks import (Labelled, check_disjoint, check_flag, check_integer, check_number, check_on_simplex, labelled,
                      mark_written)
from ._stack import Stack, accum_dtype, as_blocks, check_float_tensor, flat_buffer
from .profiling import nvtx_range

NORMALIZATIONS = ("none", "l2", "loss", "loss+")

def _check_lr(lr) -> None:
    """lr: None (the direction goes into p.grad) or a step size >= 0."""
    if lr is not None:
        check_number("lr", lr, 0.0)


def _aligned_blocks(params: Sequence[torch.Tensor], grads: Stack, K: int, name: str) -> List[torch.Tensor]:
    """grads as per-parameter blocks [K, *p.shape]; a flat [K, D] tensor is cut into views."""
    single_block = len(params) == 1 and isinstance(grads, torch.Tensor) and grads.shape[1:] == params[0].shape
    if isinstance(grads, torch.Tensor) and not single_block:
        check_float_tensor(grads, name)
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


def _reusable_grad(p: torch.Tensor) -> Optional[torch.Tensor]:
    """p.grad when the step can write the direction into it (dense, p's shape, contiguous), else None."""
    g = p.grad
    if g is not None and g.layout == torch.strided and g.shape == p.shape and g.is_contiguous():
        return g
    return None


def _destinations(params: Sequence[torch.Tensor], lr: Optional[float]) -> Labelled:
    """The existing tensors the step will write the direction into: the parameters (lr given; they
    must be contiguous) or each p.grad that is reused (lr=None). Only looks: nothing is allocated."""
    if lr is None:
        return [(f"params[{j}].grad", g) for j, p in enumerate(params) if (g := _reusable_grad(p)) is not None]
    for j, p in enumerate(params):
        if not p.is_contiguous():
            raise ValueError(f"params[{j}]: must be contiguous to be updated in place")
    return labelled(params, "params")


def _outputs(params: Sequence[torch.Tensor], lr: Optional[float]):
    """Where the direction goes: (tensors, alpha, accumulate). With lr=None a p.grad that cannot be
    reused is replaced by a fresh tensor, so this runs only once every check has passed."""
    if lr is None:
        outs = []
        for p in params:
            g = _reusable_grad(p)
            if g is None:
                g = p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
            outs.append(g)
        return outs, 1.0, False
    # p.detach() shares p's memory and version counter: the kernels write p's values in place
    return [p.detach() for p in params], -float(lr), True


def _check_params(params) -> List[torch.Tensor]:
    """The parameters as a list: one tensor is the only parameter (as in mol.backward), any other
    iterable lists them. Each is a dense floating-point leaf tensor (what torch.optim accepts), all
    of one dtype and on one device, and no two share memory (a parameter listed twice would be
    written by two threads at once)."""
    if isinstance(params, torch.Tensor):
        params = [params]
    elif not isinstance(params, Iterable) or isinstance(params, (str, bytes, Mapping)):
        raise TypeError(f"params: expected a tensor or an iterable of tensors, got {type(params).__name__}")
    params = list(params)
    if not params:
        raise ValueError("params: expected at least one parameter")
    for j, p in enumerate(params):
        check_float_tensor(p, f"params[{j}]")
        if not p.is_leaf:
            raise ValueError(f"params[{j}]: is not a leaf tensor (it is computed from tensors that require grad); "
                             "pass the parameters themselves, as torch.optim requires")
        if p.dtype != params[0].dtype:
            raise TypeError(f"params[{j}]: dtype {p.dtype} differs from params[0]'s {params[0].dtype}")
        if p.device != params[0].device:
            raise ValueError(f"params[{j}]: on {p.device}, params[0] on {params[0].device}")
    check_disjoint(labelled(params, "params"))
    return params


def _decayed_rate(base: float, decay: float, step: torch.Tensor) -> torch.Tensor:
    """base / (t+1)^decay for the device-side step count t, as a 0-d float64 tensor computed on
    the device: no host synchronisation, and a graph replay recomputes it."""
    rate = torch.full((), base, dtype=torch.float64, device=step.device)
    return rate if decay == 0 else rate / (step + 1).to(torch.float64).pow(decay)


def _check_state(state, kind: type, params: List[torch.Tensor]) -> None:
    if not isinstance(state, kind):
        raise TypeError(f"state: expected a {kind.__name__}, got {type(state).__name__}")
    state._check_matches(params)


def _simplex_step(lam: torch.Tensor, matrix: torch.Tensor, gamma, rho: float, backend: str) -> torch.Tensor:
    """Π_Δ(λ − γ (M + ρ I) λ), on the device (γ: a number or a 0-d device tensor)."""
    direction = matrix @ lam + rho * lam
    return _ops.op("project_simplex", backend)(lam - gamma * direction)


def _check_process_group(process_group) -> None:
    """A given process_group must be usable (torch.distributed initialised) before pass 1 moves
    anything: the collective comes after it."""
    if process_group is not None:
        from .distributed import _group_rank_world

        _group_rank_world(process_group)


def _all_reduce(matrix: torch.Tensor, process_group) -> torch.Tensor:
    """The sharded steps' one collective: the local K×K (or 2K×2K) matrix summed over the group."""
    from .distributed import all_reduce_gram

    return all_reduce_gram(matrix, process_group)


def _objectives(ks: List[int], singular: str, plural: str) -> str:
    return f"objective {ks[0]} {singular}" if len(ks) == 1 else f"objectives {', '.join(map(str, ks))} {plural}"


def _raise_unless_finite_gradients(diagonal: torch.Tensor, stacks: Sequence[Tuple[str, List[torch.Tensor]]]) -> None:
    """check_finite=True, before anything is written: FloatingPointError naming the objectives k
    whose entry of `diagonal` (‖g_k‖², or g1_k·g2_k for MoDo, from a Gram matrix) is not finite.
    A non-finite entry of g_k always makes it non-finite, finite ones only when the sum overflows:
    on failure (only then) the gradients' rows are read to tell which."""
    bad = torch.nonzero(~torch.isfinite(diagonal)).flatten().tolist()  # the one host synchronisation
    if not bad:
        return
    for name, blocks in stacks:
        nonfinite = [k for k in bad if not all(bool(torch.isfinite(b[k]).all()) for b in blocks)]
        if nonfinite:
            raise FloatingPointError(f"{name}: {_objectives(nonfinite, 'has a non-finite gradient', 'have non-finite gradients')} "
                                     "(the diagonal of the Gram matrix is not finite there)")
    names = " and ".join(name for name, _ in stacks)
    raise FloatingPointError(f"{names}: {_objectives(bad, 'has a gradient', 'have gradients')} whose squared norm is "
                             f"not finite although the gradients here are: it overflows {diagonal.dtype} (or, with "
                             "process_group, another rank's shard is not finite)")


def _raise_if_not_finite(matrix: torch.Tensor, what: str, lam: torch.Tensor) -> None:
    """check_finite=True, before anything is written: the K×K matrix and the new λ are finite."""
    if not bool(torch.isfinite(matrix).all()):
        raise FloatingPointError(f"{what} is not finite")
    if not bool(torch.isfinite(lam).all()):
        raise FloatingPointError("the objective weights λ are not finite")


class _StepState:
    """λ on the simplex and the step count, with state_dict()/load_state_dict()."""

    def __init__(self, params, num_objectives: int, *, dtype: torch.dtype = torch.float32):
        params = _check_params(params)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype: the state is float32 or float64, got {dtype}")
        self.num_objectives = check_integer("num_objectives", num_objectives, 1)
        self.shapes = [p.shape for p in params]
        self.device = params[0].device
        self.lam = torch.full((num_objectives,), 1.0 / num_objectives, dtype=dtype, device=self.device)
        # The step count lives on the device, and the decayed rates are computed there from it: a
        # step captured in a CUDA graph then replays with each step's count and rates, where a host
        # int would keep its capture-time value forever.
        self._step = torch.zeros((), dtype=torch.int64, device=self.device)

    @property
    def step(self) -> int:
        """The number of steps taken (read from the device: on a GPU this synchronises)."""
        return int(self._step)

    def _check_matches(self, params: List[torch.Tensor]) -> None:
        if len(params) != len(self.shapes):
            raise ValueError(f"params: {len(params)} parameters, the state was created for {len(self.shapes)}")
        for j, (p, shape) in enumerate(zip(params, self.shapes)):
            if p.shape != shape:
                raise ValueError(f"params[{j}]: shape {tuple(p.shape)}, the state was created for {tuple(shape)}")
        if params[0].device != self.device:
            raise ValueError(f"params: on {params[0].device}, the state on {self.device}")

    def _keys(self) -> Tuple[str, ...]:
        return ("lam", "step", "num_objectives", "shapes")

    def state_dict(self) -> dict:
        """λ (a copy), the step count, K and the parameters' shapes (plain ints, so the dict loads
        with torch.load(weights_only=True))."""
        return {"lam": self.lam.clone(), "step": self.step, "num_objectives": self.num_objectives,
                "shapes": [list(shape) for shape in self.shapes]}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict() of the same class, saved for the same K and parameter shapes.

        All of it is checked first, then all of it is applied: on any error (ValueError/TypeError
        naming the key, e.g. "state['lam']: ...") the state is unchanged. Tensors must have this
        state's dtypes and shapes (never cast or broadcast; they may be on another device and are
        copied to this one); λ must lie on the simplex (finite, >= 0, summing to 1 within
        256·K·eps of its dtype); step must be an int >= 0. Then the run resumes bitwise."""
        values = self._validated(state)
        self._apply(values)

    def _validated(self, state) -> dict:
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected a dict from state_dict(), got {type(state).__name__}")
        expected = set(self._keys())
        missing, unknown = sorted(expected - set(state)), sorted(set(state) - expected, key=repr)
        if missing or unknown:
            found = "; ".join(part for part in (f"missing keys {missing}" if missing else "",
                                                f"unknown keys {unknown}" if unknown else "") if part)
            raise ValueError(f"state: {found} (a {type(self).__name__}'s state_dict() has the keys {sorted(expected)})")
        K = state["num_objectives"]
        if isinstance(K, bool) or not isinstance(K, int):
            raise TypeError(f"state['num_objectives']: expected an int, got {K!r}")
        if K != self.num_objectives:
            raise ValueError(f"state['num_objectives']: saved with {K} objectives, this state has {self.num_objectives}")
        lam = self._checked_tensor(state, "lam", self.lam)
        check_on_simplex(lam, "state['lam']")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"state['step']: expected an int, got {step!r} ({type(step).__name__})")
        if step < 0:
            raise ValueError(f"state['step']: expected a step count >= 0, got {step}")
        values = {"lam": lam, "step": step, **self._validated_extra(state)}
        shapes = state["shapes"]
        if not isinstance(shapes, (list, tuple)) or not all(
                isinstance(shape, (list, tuple, torch.Size))
                and all(isinstance(n, int) and not isinstance(n, bool) for n in shape) for shape in shapes):
            raise TypeError(f"state['shapes']: expected a list of shapes (lists of ints), got {shapes!r}")
        saved, mine = [tuple(shape) for shape in shapes], [tuple(shape) for shape in self.shapes]
        if saved != mine:
            raise ValueError(f"state['shapes']: saved for parameters of shapes {saved}, this state's are {mine}")
        return values

    def _validated_extra(self, state) -> dict:
        """The subclass's own entries, checked (after the common ones, before the shapes)."""
        return {}

    @staticmethod
    def _checked_tensor(state, key: str, like: torch.Tensor) -> torch.Tensor:
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state['{key}']: expected a tensor, got {type(value).__name__}")
        if value.shape != like.shape:
            raise ValueError(f"state['{key}']: {key} has shape {tuple(value.shape)}, this state's is {tuple(like.shape)}")
        if value.dtype != like.dtype:
            raise TypeError(f"state['{key}']: dtype {value.dtype}, this state's is {like.dtype} (create the state "
                            f"with dtype={value.dtype} to load it)")
        return value

    def _apply(self, values: dict) -> None:
        self.lam.copy_(values["lam"])
        self._step.fill_(values["step"])


class MoDoState(_StepState):
    """MoDo's state: the weights λ (in `dtype`, float32 by default, starting at 1/K) and the step
    count."""


class MoCoState(_StepState):
    """MoCo's state: the tracked gradients Y ([K, *p.shape] per parameter, views of one flat
    [K, D] buffer in `dtype`: float32 by default, float64 for float64 gradients), λ (in `dtype`,
    starting at 1/K) and the step count.

    y_init="zero" starts Y at 0 as the published code does; "first" sets Y to the first gradients.
    load_state_dict also requires y to be finite and y_init one of those two.
    """

    def __init__(self, params, num_objectives: int, *, y_init: str = "zero", dtype: torch.dtype = torch.float32):
        super().__init__(params, num_objectives, dtype=dtype)
        if y_init not in ("zero", "first"):
            raise ValueError(f"y_init: expected 'zero' or 'first', got {y_init!r}")
        self.y_init = y_init
        self.y_flat, self.y = flat_buffer(self.shapes, num_objectives, dtype=dtype, device=self.device)
        self.y_flat.zero_()

    def _keys(self) -> Tuple[str, ...]:
        return super()._keys() + ("y", "y_init")

    def state_dict(self) -> dict:
        return {**super().state_dict(), "y": self.y_flat.clone(), "y_init": self.y_init}

    def _validated_extra(self, state) -> dict:
        y = self._checked_tensor(state, "y", self.y_flat)
        if not bool(torch.isfinite(y).all()):
            raise ValueError("state['y']: the tracked gradients are not finite (a diverged run's state)")
        if state["y_init"] not in ("zero", "first"):
            raise ValueError(f"state['y_init']: expected 'zero' or 'first', got {state['y_init']!r}")
        return {"y": y, "y_init": state["y_init"]}

    def _apply(self, values: dict) -> None:
        super()._apply(values)
        self.y_flat.copy_(values["y"])
        self.y_init = values["y_init"]


def _checked_losses(normalize: str, losses, K: int, check_finite: bool) -> Optional[torch.Tensor]:
    """The K losses of normalize='loss'/'loss+' as a detached [K] tensor on their own device (None
    for the other normalisations). A loss must be finite and > 0: 1/f_k or f_k/‖g_k‖ of a loss <= 0
    would flip (or drop) its objective's gradient, so the step would ascend it. Losses on the CPU
    are checked here (ValueError naming losses[k]), and so are device losses with
    check_finite=True, which synchronises anyway; otherwise device losses are not read by the host
    (the steps do not synchronise) and a bad one makes its factor NaN, hence λ and the direction NaN
    (see _normalization_scale)."""
    if normalize not in ("loss", "loss+"):
        return None
    if losses is None:
        raise ValueError(f"losses: normalize={normalize!r} needs the K loss values")
    if isinstance(losses, torch.Tensor):
        f = losses.detach()
    else:
        try:
            f = torch.as_tensor(losses, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"losses: expected a tensor or a sequence of {K} numbers ({error})") from None
    if f.is_complex() or f.dtype == torch.bool:
        raise TypeError(f"losses: expected real loss values, got {f.dtype}")
    if f.numel() != K:
        raise ValueError(f"losses: expected {K} values, got shape {tuple(f.shape)}")
    f = f.reshape(K)
    if f.device.type == "cpu" or check_finite:
        bad = torch.nonzero(~(torch.isfinite(f) & (f > 0))).flatten().tolist()
        if bad:
            k = bad[0]
            raise ValueError(f"losses[{k}]: normalize={normalize!r} needs finite losses > 0 (a loss <= 0 would flip "
                             f"or drop objective {k}'s gradient), got {f[k].item()!r}")
    return f


def _normalization_scale(normalize: str, grad_sq_norms: torch.Tensor, losses: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-objective factors s_k applied to g_k (MGDA-UB's normalisations and LibMTL-MoCo's):
    'none': 1; 'l2': 1/‖g_k‖; 'loss': 1/f_k; 'loss+': f_k/‖g_k‖ (unit gradients scaled by their
    loss). A loss that is not finite and > 0 gives s_k = NaN (on the device, no synchronisation)."""
    norms = grad_sq_norms.clamp(min=0).sqrt()
    if normalize == "none":
        return torch.ones_like(norms)
    tiny = torch.finfo(norms.dtype).tiny
    if normalize == "l2":
        return 1.0 / norms.clamp(min=tiny)
    f = losses.to(device=norms.device, dtype=norms.dtype)
    f = torch.where(torch.isfinite(f) & (f > 0), f, torch.nan)
    if normalize == "loss":
        return 1.0 / f
    return f / norms.clamp(min=tiny)


def _check_normalize(normalize) -> None:
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize: expected one of {NORMALIZATIONS}, got {normalize!r}")


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
    'loss' and 'loss+' need `losses`, finite and > 0 (see _checked_losses: CPU losses are checked,
    device losses that are not make λ NaN). Returns λ (a device tensor; no host synchronisation
    unless check_finite=True).

    The step count t lives on the device (state.step reads it) and β_t, γ_t are computed there
    (β_0 = 1 with y_init="first"), so the step can be captured in a CUDA graph after one eager
    warm-up step: each replay advances t and takes that step's rates, as eager steps do.

    check_finite=True takes that joint path for every normalisation, so that nothing is written
    before the checks: from the Gram of [Y; G] (one host synchronisation) it raises
    FloatingPointError naming the objectives whose gradients are not finite, or when Y Yᵀ or the
    new λ are not, with Y, λ, step, the parameters and p.grad unchanged; a caller can skip the
    batch and go on. It costs no extra pass (pass 2 reads G once more), and its λ agrees with the
    unchecked step's to rounding, not bitwise.

    process_group: params, grads and the state hold this rank's shard of the parameter dimension
    (molkernels.distributed); the local Gram of pass 1 (K×K, or the 2K×2K Gram of [Y; G] with a
    normalisation, whose norms then come from the full Gram) is summed over the group with one
    all_reduce between pass 1 and the λ update, the step's only collective; every rank gets the
    same λ and combines its shard. `losses` are then the global losses (the same on every rank).
    """
    params = _check_params(params)
    _check_state(state, MoCoState, params)
    K = state.num_objectives
    blocks = _aligned_blocks(params, grads, K, "grads")
    if check_number("beta", beta, 0.0) > 1:
        raise ValueError(f"beta: expected a value in [0, 1], got {beta}")
    for value, name in ((gamma, "gamma"), (rho, "rho"), (beta_decay, "beta_decay"), (gamma_decay, "gamma_decay")):
        check_number(name, value, 0.0)
    _check_lr(lr)
    _check_normalize(normalize)
    check_flag("check_finite", check_finite)
    f = _checked_losses(normalize, losses, K, check_finite)
    if accum_dtype(blocks[0].dtype) != state.y_flat.dtype:
        raise TypeError(f"grads: {blocks[0].dtype} gradients need a {accum_dtype(blocks[0].dtype)} tracking state, "
                        f"the state is {state.y_flat.dtype}")
    check_disjoint(_destinations(params, lr) + [("state.y", state.y_flat)], labelled(blocks, "grads"))
    backend = _ops.resolve_backend(backend, blocks[0].device)
    _check_process_group(process_group)
    beta_t = _decayed_rate(beta, beta_decay, state._step)  # read by the kernels on the device
    if state.y_init == "first":
        beta_t = torch.where(state._step == 0, torch.ones_like(beta_t), beta_t)
    gamma_t = _decayed_rate(gamma, gamma_decay, state._step)
    joint_path = normalize != "none" or check_finite
    with torch.no_grad(), nvtx_range("moco_step"):
        if not joint_path:
            yy = _ops.op("moco_track_gram", backend)(state.y, blocks, beta_t)
            if process_group is not None:
                yy = _all_reduce(yy, process_group)
        else:
            joint = _ops.op("joint_gram", backend)(state.y, blocks)
            if process_group is not None:
                joint = _all_reduce(joint, process_group)
            if check_finite:
                _raise_unless_finite_gradients(torch.diagonal(joint)[K:], [("grads", blocks)])
            scale = _normalization_scale(normalize, torch.diagonal(joint)[K:], f)
            old, cross, gg = joint[:K, :K], joint[:K, K:], joint[K:, K:]
            yy = ((1 - beta_t) ** 2 * old + beta_t * (1 - beta_t) * (cross * scale + scale[:, None] * cross.T)
                  + beta_t ** 2 * scale[:, None] * gg * scale)
        lam = _simplex_step(state.lam, yy.to(state.lam.dtype), gamma_t, rho, backend)
        if check_finite:
            _raise_if_not_finite(yy, "the Gram matrix of the tracked gradients Y", lam)
        outs, alpha, accumulate = _outputs(params, lr)
        if not joint_path:
            _ops.op("combine_into", backend)(state.y, lam, outs, alpha, accumulate)
        else:
            _ops.op("moco_track_combine", backend)(state.y, blocks, scale, beta_t, lam, outs, alpha, accumulate)
        state.lam.copy_(lam)
        state._step += 1
    mark_written(outs + [state.y_flat])
    return state.lam


def modo_step(params, grads1: Stack, grads2: Stack, grads3: Stack, state: MoDoState, gamma: float = 0.1,
              rho: float = 0.0, lr: Optional[float] = None, *, gamma_decay: float = 0.0, check_finite: bool = False,
              backend: str = "auto", process_group=None) -> torch.Tensor:
    """One MoDo step (Chen et al., 2023) from three independent mini-batches' gradient stacks:

        λ ← Π_Δ(λ − γ_t (G₁ G₂ᵀ + ρ I) λ)     one pass over G₁ and G₂ (cross_gram)
        d = G₃ᵀ λ                             one pass over G₃: p.grad = d or p ← p − lr·d

    check_finite=True (one host synchronisation, and one more pass: the Gram of G₃) raises
    FloatingPointError naming the stack and objectives whose gradients are not finite, or when
    G₁G₂ᵀ or the new λ are not, before anything is written.

    As in moco_step, the step count and γ_t live on the device, so a captured step replays with
    each step's γ_t.

    process_group: the stacks hold this rank's shard; G₁G₂ᵀ is summed over the group with one
    K×K all_reduce (the only collective) before the λ update.
    """
    params = _check_params(params)
    _check_state(state, MoDoState, params)
    K = state.num_objectives
    for value, label in ((grads2, "grads2"), (grads3, "grads3")):
        if value is None:
            raise ValueError(f"{label}: MoDo needs three independent gradient samples; {label} is missing")
    g1 = _aligned_blocks(params, grads1, K, "grads1")
    g2 = _aligned_blocks(params, grads2, K, "grads2")
    g3 = _aligned_blocks(params, grads3, K, "grads3")
    for value, name in ((gamma, "gamma"), (rho, "rho"), (gamma_decay, "gamma_decay")):
        check_number(name, value, 0.0)
    _check_lr(lr)
    check_flag("check_finite", check_finite)
    if g2[0].dtype != g1[0].dtype:  # G₁G₂ᵀ reads both in one kernel; G₃ may have any float dtype
        raise TypeError(f"grads2: dtype {g2[0].dtype} differs from grads1's {g1[0].dtype}")
    check_disjoint(_destinations(params, lr),
                    labelled(g1, "grads1") + labelled(g2, "grads2") + labelled(g3, "grads3"))
    backend = _ops.resolve_backend(backend, g1[0].device)
    _check_process_group(process_group)
    gamma_t = _decayed_rate(gamma, gamma_decay, state._step)
    with torch.no_grad(), nvtx_range("modo_step"):
        cross = _ops.op("cross_gram", backend)(g1, g2)
        if process_group is not None:
            cross = _all_reduce(cross, process_group)
        if check_finite:
            _raise_unless_finite_gradients(torch.diagonal(cross), [("grads1", g1), ("grads2", g2)])
            gram3 = _ops.op("gram", backend)(g3)
            if process_group is not None:
                gram3 = _all_reduce(gram3, process_group)
            _raise_unless_finite_gradients(torch.diagonal(gram3), [("grads3", g3)])
        lam = _simplex_step(state.lam, cross.to(state.lam.dtype), gamma_t, rho, backend)
        if check_finite:
            _raise_if_not_finite(cross, "the cross Gram matrix G₁G₂ᵀ", lam)
        outs, alpha, accumulate = _outputs(params, lr)
        _ops.op("combine_into", backend)(g3, lam, outs, alpha, accumulate)
        state.lam.copy_(lam)
        state._step += 1
    mark_written(outs)
    return state.lam


def mgda_step(params, grads: Stack, lr: Optional[float] = None, *, normalize: str = "none", losses=None,
              check_finite: bool = False, backend: str = "auto", process_group=None) -> torch.Tensor:
    """One MGDA step (Désidéri, 2012; Sener & Koltun, 2018): λ = argmin_{λ ∈ Δ} λᵀ G Gᵀ λ (exact,
    on the device), d = Gᵀ λ, the min-norm point of the convex hull of the gradients.

    normalize ('l2', 'loss', 'loss+'; see _normalization_scale) takes the min-norm point of the
    rescaled gradients s_k g_k instead (MGDA-UB's normalisations), so that an objective whose
    gradient is short does not take all the weight: λ = argmin λᵀ S G Gᵀ S λ, d = Σ_k λ_k s_k g_k.
    The norms come from the Gram's diagonal, so this costs no extra pass. 'loss' and 'loss+' need
    `losses`, finite and > 0 (see _checked_losses). Returns λ.

    check_finite=True (one host synchronisation, no extra pass) raises FloatingPointError naming
    the objectives whose gradients are not finite (from the Gram's diagonal), or when the Gram or λ
    are not, before the direction is written.

    process_group: the stack holds this rank's shard; the Gram is summed over the group with one
    K×K all_reduce (the only collective), and every rank solves the same λ."""
    params = _check_params(params)
    K = as_blocks(grads, "grads")[0].shape[0]
    blocks = _aligned_blocks(params, grads, K, "grads")
    _check_lr(lr)
    _check_normalize(normalize)
    check_flag("check_finite", check_finite)
    f = _checked_losses(normalize, losses, K, check_finite)
    check_disjoint(_destinations(params, lr), labelled(blocks, "grads"))
    backend = _ops.resolve_backend(backend, blocks[0].device)
    _check_process_group(process_group)
    with torch.no_grad(), nvtx_range("mgda_step"):
        gram = _ops.op("gram", backend)(blocks)
        if process_group is not None:
            gram = _all_reduce(gram, process_group)
        if check_finite:
            _raise_unless_finite_gradients(torch.diagonal(gram), [("grads", blocks)])
        if normalize == "none":
            lam = _ops.op("min_norm", backend)(gram)
            weights = lam
        else:
            scale = _normalization_scale(normalize, torch.diagonal(gram), f)
            lam = _ops.op("min_norm", backend)(scale[:, None] * gram * scale)
            weights = lam * scale
        if check_finite:
            _raise_if_not_finite(gram, "the Gram matrix of the objective gradients", lam)
        outs, alpha, accumulate = _outputs(params, lr)
        _ops.op("combine_into", backend)(blocks, weights, outs, alpha, accumulate)
    mark_written(outs)
    return lam
