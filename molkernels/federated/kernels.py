"""Client-stacked local optimisers for federated learning: the C clients' parameters, gradients and
optimiser states are rows of [C, D] tensors, and one call steps every active client at once.

    batched_adam_step(params, grads, exp_avg, exp_avg_sq, step, active, lr=1e-3)
    batched_sgd_step(params, grads, active, lr=0.1, momentum=0.9, momentum_buffer=buf)
    server = masked_weighted_mean(params, num_samples, active)
    reset_client_state(joined, exp_avg, exp_avg_sq, step)

Each active row gets the update torch.optim gives that client alone (its own step count, so its
own bias correction), in torch's order of operations: bit for bit for SGD and for Adam's moments
where torch's CPU kernels fuse the same multiply-adds (AVX2/AVX-512 builds), and for Adam's
parameters to within an ulp of the update, because the kernels take the correctly rounded square
root and torch's vectorised CPU sqrt is off by an ulp in about a fifth of the elements. Inactive
rows, their state and their step stay bitwise unchanged.
The kernels read p, g and the state once and write p and the state once, and read the step counts
on the device: no host synchronisation. A [C, *shape] tensor is treated as [C, D] with D the
product of *shape.

Dtypes: parameters and gradients float32 or float64, or float16/bfloat16 with float32 optimiser
state (the update is computed in float32 and the parameters rounded once); the state is in float32
(float64 for float64 parameters). Every argument is checked, naming the bad one, before a kernel
runs; so is memory: a tensor the kernel writes (params, a state) that overlaps another argument
(`exp_avg is exp_avg_sq`, grads a view of params, ...) raises ValueError naming both.

The steps run under torch.no_grad(), as torch.optim's do, and bump the version counter of every
tensor they write, so an autograd graph that saved the old parameters raises "modified by an
inplace operation" on backward instead of using the new values.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _ops
from .._checks import check_dense, check_disjoint, check_number, mark_written
from .._stack import FLOAT_DTYPES, accum_dtype
from ..profiling import nvtx_range


def _check_clients(params, name: str) -> None:
    """params-like [C, ...]: a contiguous float tensor with C >= 1 rows."""
    check_dense(params, name)
    if params.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {params.dtype}")
    if params.dim() < 1 or params.shape[0] < 1:
        raise ValueError(f"{name}: expected a client-stacked [C, D] tensor with C >= 1, got shape {tuple(params.shape)}")
    if not params.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")


def _check_like(t, name: str, params: torch.Tensor, dtype: torch.dtype, *, mutable: bool = True) -> None:
    """t has params' shape and device and the given dtype (contiguous when updated in place)."""
    check_dense(t, name)
    if t.dim() < 1 or t.shape[0] != params.shape[0]:
        raise ValueError(f"{name}: has C = {t.shape[0] if t.dim() else 'no'} clients, params has C = {params.shape[0]}")
    if t.shape != params.shape:
        raise ValueError(f"{name}: shape {tuple(t.shape)} differs from params' {tuple(params.shape)} (D mismatch)")
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected {dtype}, got {t.dtype}")
    if t.device != params.device:
        raise ValueError(f"{name}: on {t.device}, params on {params.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous" + (" (it is updated in place)" if mutable else ""))


def _check_vector(t, name: str, C: int, dtype: torch.dtype, device: torch.device, what: str) -> None:
    """A contiguous [C] tensor of one dtype, on the clients' device."""
    check_dense(t, name)
    if t.dtype != dtype:
        raise TypeError(f"{name}: expected a {dtype} tensor ({what}), got {t.dtype}")
    if t.shape != (C,):
        raise ValueError(f"{name}: expected shape ({C},), one entry per client, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: on {t.device}, params on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")


def batched_adam_step(params: torch.Tensor, grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                      step: torch.Tensor, active: torch.Tensor, *, lr: float, beta1: float = 0.9,
                      beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                      backend: str = "auto") -> None:
    """One Adam step of every active client, in place.

    For each row c with active[c] (p, g, m, v its rows of params, grads, exp_avg, exp_avg_sq):

        step[c] += 1;  t = step[c]
        g ← g + weight_decay · p                      (L2 penalty, as torch.optim.Adam)
        m ← m + (1 − β₁)(g − m)                       (exp_avg.lerp_(g, 1 − β₁))
        v ← β₂ v + (1 − β₂) g²                        (exp_avg_sq.mul_(β₂).addcmul_(g, g, 1 − β₂))
        p ← p − lr / (1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)

    which is what torch.optim.Adam([p], lr, (β₁, β₂), eps, weight_decay, foreach=False) does for
    that client alone, in the same order of operations (see the module docstring for the bits). Rows with active[c] False (and their step) are left
    bitwise unchanged. A fresh client starts from m = v = 0, step = 0 (see reset_client_state).

    params, grads: [C, D] (or [C, *shape]), float32/float64, or float16/bfloat16 with float32
    state; exp_avg, exp_avg_sq: params' shape in float32 (float64 for float64 params); step: int64
    [C], counts >= 0; active: bool [C]; all contiguous on one device, and the tensors written
    (params, exp_avg, exp_avg_sq, step) share no memory with each other or with grads and active.
    lr ≥ 0, β₁, β₂ ∈ [0, 1), eps ≥ 0, weight_decay ≥ 0, all finite. A negative step count (whose
    bias correction would be negative or zero) raises ValueError when step is on the CPU; on a GPU
    (and under torch.compile) the counts are not read by the host (no synchronisation).
    """
    _check_clients(params, "params")
    C, state_dtype = params.shape[0], accum_dtype(params.dtype)
    _check_like(grads, "grads", params, params.dtype, mutable=False)
    _check_like(exp_avg, "exp_avg", params, state_dtype)
    _check_like(exp_avg_sq, "exp_avg_sq", params, state_dtype)
    _check_vector(step, "step", C, torch.int64, params.device, "per-client step counts")
    _check_vector(active, "active", C, torch.bool, params.device, "the mask of clients that step")
    lr = check_number("lr", lr, 0.0)
    beta1 = check_number("beta1", beta1, 0.0, 1.0, high_open=True)
    beta2 = check_number("beta2", beta2, 0.0, 1.0, high_open=True)
    eps = check_number("eps", eps, 0.0)
    weight_decay = check_number("weight_decay", weight_decay, 0.0)
    if step.device.type == "cpu" and not torch.compiler.is_compiling():  # a host read, not traceable
        negative = torch.nonzero(step < 0).flatten().tolist()
        if negative:
            raise ValueError(f"step: client {negative[0]} has step count {int(step[negative[0]])}; counts are >= 0 "
                             "(reset_client_state starts a client at 0)")
    written = [("params", params), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("step", step)]
    check_disjoint(written, [("grads", grads), ("active", active)])
    backend = _ops.resolve_backend(backend, params.device)
    with torch.no_grad(), nvtx_range("batched_adam_step"):
        _ops.op("fl_adam_step", backend)(params, grads, exp_avg, exp_avg_sq, step, active, lr, beta1, beta2, eps,
                                         weight_decay)
    mark_written([t for _, t in written])


def batched_sgd_step(params: torch.Tensor, grads: torch.Tensor, active: torch.Tensor, *, lr: float,
                     momentum: float = 0.0, momentum_buffer: Optional[torch.Tensor] = None,
                     weight_decay: float = 0.0, backend: str = "auto") -> None:
    """One SGD step of every active client, in place.

    For each row c with active[c]:

        g ← g + weight_decay · p
        b ← momentum · b + g;  g ← b                  (only when momentum > 0)
        p ← p − lr · g

    which is torch.optim.SGD([p], lr, momentum, dampening=0, weight_decay, nesterov=False) for
    that client alone; a zero momentum-buffer row gives b = g exactly, as torch's first step does,
    so a fresh client starts from a zero row. Inactive rows (and their buffer rows) stay bitwise
    unchanged. momentum > 0 needs momentum_buffer (params' shape, float32, float64 for float64
    params); with momentum = 0 a given buffer is neither read nor written. The tensors written
    (params, the buffer) share no memory with each other or with grads and active.
    """
    _check_clients(params, "params")
    C = params.shape[0]
    _check_like(grads, "grads", params, params.dtype, mutable=False)
    _check_vector(active, "active", C, torch.bool, params.device, "the mask of clients that step")
    lr = check_number("lr", lr, 0.0)
    momentum = check_number("momentum", momentum, 0.0)
    weight_decay = check_number("weight_decay", weight_decay, 0.0)
    if momentum > 0:
        if momentum_buffer is None:
            raise ValueError("momentum_buffer: required when momentum > 0 (a zero-initialised tensor like params)")
        _check_like(momentum_buffer, "momentum_buffer", params, accum_dtype(params.dtype))
    else:
        momentum_buffer = None
    written = [("params", params)] + ([("momentum_buffer", momentum_buffer)] if momentum_buffer is not None else [])
    check_disjoint(written, [("grads", grads), ("active", active)])
    backend = _ops.resolve_backend(backend, params.device)
    with torch.no_grad(), nvtx_range("batched_sgd_step"):
        _ops.op("fl_sgd_step", backend)(params, grads, momentum_buffer, active, lr, momentum, weight_decay)
    mark_written([t for _, t in written])


def masked_weighted_mean(x: torch.Tensor, weights: torch.Tensor, active: torch.Tensor, *, check: bool = False,
                         backend: str = "auto") -> torch.Tensor:
    """The server average Σ_{c active} w_c x_c / Σ_{c active} w_c of the rows of x [C, D] (or
    [C, *shape]): a new tensor of shape x.shape[1:] in x's dtype.

    Accumulated in float32 (float64 for float64 x) in the fixed client order c = 0, 1, …, C−1, so
    the result is deterministic (no atomics) and the same on every run. Inactive rows are never
    read into the sum: NaN or stale values there do not leak.

    With no active client, or active weights that sum to zero, every output element is NaN; this
    is not checked by default, because checking means a host synchronisation on CUDA. check=True
    does that one synchronisation and raises ValueError instead, also for weights that are negative
    or not finite.

    weights: [C] float tensor (e.g. each client's sample count), converted to the accumulation
    dtype; active: bool [C].
    """
    _check_clients(x, "x")
    C = x.shape[0]
    check_dense(weights, "weights")
    if weights.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weights: expected a float tensor, got {weights.dtype}")
    if weights.shape != (C,):
        raise ValueError(f"weights: expected shape ({C},), one entry per client, got {tuple(weights.shape)}")
    if weights.device != x.device:
        raise ValueError(f"weights: on {weights.device}, x on {x.device}")
    _check_vector(active, "active", C, torch.bool, x.device, "the mask of clients averaged")
    if check:
        _raise_unless_averageable(weights, active)
    backend = _ops.resolve_backend(backend, x.device)
    w = weights.to(accum_dtype(x.dtype)).contiguous()
    with nvtx_range("masked_weighted_mean"):
        return _ops.op("fl_weighted_mean", backend)(x, w, active)


def _raise_unless_averageable(weights: torch.Tensor, active: torch.Tensor) -> None:
    """check=True of masked_weighted_mean: one host synchronisation."""
    active_weights = weights[active]
    if active_weights.numel() == 0:
        raise ValueError("active: no client is active, so the weighted mean is undefined")
    if not bool(torch.isfinite(active_weights).all()) or bool((active_weights < 0).any()):
        raise ValueError("weights: the active clients' weights must be finite and >= 0")
    if float(active_weights.sum()) == 0:
        raise ValueError("weights: the active clients' weights sum to zero, so the weighted mean is undefined")


def reset_client_state(joined: torch.Tensor, *state: Optional[torch.Tensor]) -> None:
    """Zero, in place, the rows c with joined[c] of each state tensor (exp_avg, exp_avg_sq, step,
    momentum_buffer, ...; None entries are skipped): a client that joins starts as a fresh
    torch.optim optimiser would, with m = v = 0, step = 0 and a zero momentum buffer. The other
    rows are untouched. One masked fill per tensor on the device, no host synchronisation.

    joined: bool [C]; each state tensor [C, ...] on joined's device.
    """
    check_dense(joined, "joined")
    if joined.dtype != torch.bool:
        raise TypeError(f"joined: expected a torch.bool tensor (the mask of clients that join), got {joined.dtype}")
    if joined.dim() != 1:
        raise ValueError(f"joined: expected a [C] mask, got shape {tuple(joined.shape)}")
    C = joined.shape[0]
    tensors = []
    for i, t in enumerate(state):
        if t is None:
            continue
        check_dense(t, f"state[{i}]")
        if t.dim() < 1 or t.shape[0] != C:
            raise ValueError(f"state[{i}]: expected C = {C} rows (joined's length), got shape {tuple(t.shape)}")
        if t.device != joined.device:
            raise ValueError(f"state[{i}]: on {t.device}, joined on {joined.device}")
        tensors.append(t)
    for t in tensors:
        t.masked_fill_(joined.view((C,) + (1,) * (t.dim() - 1)), 0)
