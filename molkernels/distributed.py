"""Multi-objective steps across ranks with torch.distributed.

The Gram matrix is additive over shards of the parameter dimension: with the columns of the
gradient stack G [K, D] split over ranks, G Gᵀ = Σ_r G_r G_rᵀ. Each rank computes the fused Gram of
its own shard, one all_reduce of the K×K matrix gives the full Gram on every rank, every rank solves
the same λ from the same bits, and each combines its own shard. The communication of a step is K²
numbers, whatever D.

Which path (see the README's "Distributed" section for a worked example):

* **Sharded gradients** (FSDP2's ``fully_shard``, ZeRO-3, tensor/model parallelism: each rank holds
  a shard of the *global* per-objective gradients): ``moco_step``, ``modo_step``, ``mgda_step`` and
  ``mol.backward`` take ``process_group=``; the one collective of a step is the K×K all_reduce
  (2K×2K with MoCo's normalisations, whose pass 1 computes the Gram of [Y; G]; G₁G₂ᵀ for MoDo).
  ``gram`` and ``cross_gram`` here are the bare ops. With FSDP2 the per-objective gradients are
  DTensor shards: molkernels works on their local shards (``p.to_local()``), and ``mol.backward``
  does this for a ``fully_shard``-ed model.
* **Replicated gradients** (DDP-style data parallelism: every rank holds the whole model and the
  per-objective gradients of its own batch): the K gradients must be averaged across ranks once per
  step, as one [K, D] buffer, never with K separate all_reduces. :class:`ReplicatedGradients`
  (and ``mol.backward(..., replicated=True)``) does it one of two ways: reduce="reduce_scatter"
  (the default on NCCL) reduce-scatters the flat buffer (rank r owns columns [r·c, (r+1)·c),
  c = ⌈D/n⌉), runs the step on its shard with the sharded Gram, and all-gathers the direction: ring
  traffic per rank (n−1)/n·(K+1)·D elements plus K², with the Gram and the combine on D/n columns
  per rank; reduce="all_reduce" (the default on gloo, whose reduce_scatter is slower than its
  all_reduce) is one all_reduce of the [K, D] buffer ((n−1)/n·2K·D on a ring, :func:`all_reduce_stack`),
  after which every rank runs the ordinary single-process step on the full, identical buffer with no
  further collective.

Process groups: the functions of this module take ``process_group=None`` as torch.distributed does
(None: the default group). The steps and ``mol.backward`` take ``process_group=None`` to mean "not
distributed" (nothing is added to the single-process path); pass ``torch.distributed.group.WORLD``
for the default group. With HSDP (a replicate × shard mesh) pass the shard dimension's group.

Determinism: the K×K matrices are summed in float64 (8K² bytes on the wire) and rounded once to the
Gram's dtype, so the distributed Gram matches the single-process one to rounding. Ring and tree
all_reduce algorithms (gloo, NCCL) reduce each element once and broadcast the result, so every rank
receives the same bits, and the weights, computed by deterministic kernels from them, are bitwise
equal on all ranks (the same backend on the same kind of device). ``reduce="gather"`` (the
``all_reduce_gram`` argument) makes this independent of the collective's algorithm: the n local
matrices are all-gathered (n·K² numbers) and summed in rank order on every rank.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ._stack import Stack, as_blocks, flat_buffer
from .profiling import nvtx_range
from . import steps
from .steps import _check_params

REDUCTIONS = ("all_reduce", "gather")


def _group_rank_world(process_group) -> Tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group: torch.distributed is not initialised (call "
                           "torch.distributed.init_process_group first, e.g. under torchrun)")
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def _all_gather_into(output: torch.Tensor, input: torch.Tensor, process_group) -> None:
    """output [n·m] = the n ranks' input [m] (1-D, so every backend takes it), one all_gather."""
    # torch 2.14 names it all_gather_single (all_gather_into_tensor is deprecated there).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, input, group=process_group)


def _reduce_scatter_into(output: torch.Tensor, input: torch.Tensor, process_group) -> None:
    """output [m, ...] = the sum over ranks of rows [r·m, (r+1)·m) of input [n·m, ...], one
    reduce_scatter."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(output, input, op=dist.ReduceOp.SUM, group=process_group)


# --------------------------------------------------------------------------------------------------
# Sharded gradients: the K×K all_reduce


def all_reduce_gram(matrix: torch.Tensor, process_group=None, *, reduce: str = "all_reduce") -> torch.Tensor:
    """Σ over the ranks of `process_group` of each rank's [..., K, K] matrix (a local Gram, G₁G₂ᵀ, or
    MoCo's [Y; G] Gram): one collective, summed in float64 and rounded once to `matrix`'s dtype.
    Returns a new tensor (the input is not modified), identical on every rank.

    reduce="all_reduce" (default): one all_reduce of K² float64 numbers. reduce="gather": one
    all_gather of the n local matrices, summed in rank order on every rank (n·K² numbers; bitwise
    equal on all ranks whatever algorithm the collective library picks).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce: expected one of {REDUCTIONS}, got {reduce!r}")
    _, world = _group_rank_world(process_group)
    with nvtx_range("all_reduce_gram"):
        if reduce == "all_reduce":
            total = matrix.to(torch.float64, copy=True).contiguous()
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=process_group)
        else:
            local = matrix.to(torch.float64).reshape(-1).contiguous()
            gathered = torch.empty(world * local.numel(), dtype=torch.float64, device=local.device)
            _all_gather_into(gathered, local, process_group)
            gathered = gathered.view(world, *matrix.shape)
            total = gathered[0].clone()
            for r in range(1, world):
                total += gathered[r]
        return total.to(matrix.dtype)


def gram(g: Stack, process_group=None, *, backend: str = "auto", reduce: str = "all_reduce") -> torch.Tensor:
    """The Gram matrix of a gradient stack whose columns are sharded over the ranks: this rank's
    stack `g` holds its shard (any size, empty included, as a tensor or a list of blocks). The
    fused Gram of the shard, then one K×K all_reduce; identical on every rank."""
    from .ops import gram as local_gram

    return all_reduce_gram(local_gram(g, backend=backend), process_group, reduce=reduce)


def cross_gram(a: Stack, b: Stack, process_group=None, *, backend: str = "auto",
               reduce: str = "all_reduce") -> torch.Tensor:
    """Σ A Bᵀ of two stacks sharded over the ranks alike (e.g. MoDo's G₁G₂ᵀ): the local cross
    Gram of this rank's shards, then one K×K all_reduce."""
    from .ops import cross_gram as local_cross_gram

    return all_reduce_gram(local_cross_gram(a, b, backend=backend), process_group, reduce=reduce)


# --------------------------------------------------------------------------------------------------
# FSDP2 / DTensor parameters


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def local_tensors(params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """This rank's shards of the parameters: p.to_local() for DTensors (FSDP2's fully_shard), the
    tensor itself otherwise. The local tensors share storage with the parameters, so a step with
    lr= updates the sharded parameters in place."""
    return [p.to_local().detach() if is_dtensor(p) else p for p in params]


def assign_grads(params: Sequence[torch.Tensor], local_params: Sequence[torch.Tensor]) -> None:
    """After a step with lr=None on `local_params` (= local_tensors(params)), make each local
    direction the gradient of its parameter: p.grad = the DTensor with that local shard (the
    parameter's mesh and placements) for DTensor parameters, the tensor itself otherwise."""
    if len(params) != len(local_params):
        raise ValueError(f"local_params: has {len(local_params)} tensors for {len(params)} parameters")
    for j, (p, local) in enumerate(zip(params, local_params)):
        if local.grad is None:
            raise ValueError(f"local_params[{j}]: has no gradient (run a step with lr=None on it first)")
        p.grad = _as_sharded_like(p, local.grad) if is_dtensor(p) else local.grad


def _as_sharded_like(p, local: torch.Tensor):
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, device_mesh=p.device_mesh, placements=p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def fsdp_objective_gradients(losses: Sequence[torch.Tensor], params: Sequence[torch.Tensor], *,
                             retain_graph: bool = False):
    """The per-objective gradients of FSDP2 (fully_shard) parameters, as this rank's local shards in
    one flat [K, D_local] buffer with views shaped like p.to_local().

    One backward pass per loss (retaining the graph between them): FSDP's hooks all-gather what the
    backward needs and reduce-scatter (average over the data-parallel ranks) each objective's
    gradient into the sharded p.grad, which is copied into row k. That is FSDP's own gradient
    traffic, once per objective; it is inherent to data parallelism, where each per-objective
    gradient is a mean over the ranks' batches. p.grad of `params` is None afterwards; parameters of
    the model outside `params` accumulate the sum of the K gradients, as with loss.backward().
    """
    locals_ = local_tensors(params)
    K = len(losses)
    flat, views = flat_buffer([t.shape for t in locals_], K, dtype=locals_[0].dtype, device=locals_[0].device)
    for p in params:
        p.grad = None
    for k, loss in enumerate(losses):
        loss.backward(retain_graph=retain_graph or k < K - 1)
        for view, p in zip(views, params):
            if p.grad is None:
                view[k].zero_()
            else:
                view[k].copy_(p.grad.to_local() if is_dtensor(p.grad) else p.grad)
                p.grad = None
    return flat, views


# --------------------------------------------------------------------------------------------------
# What a step communicates

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
               "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "reduce", "all_to_all",
               "all_to_all_single", "barrier", "gather", "scatter", "send", "recv", "isend", "irecv",
               "all_reduce_coalesced", "all_gather_coalesced", "all_gather_object", "broadcast_object_list")
# Older torch names of the single-tensor collectives, recorded under the current ones.
_COLLECTIVE_ALIASES = {"all_gather_into_tensor": "all_gather_single", "reduce_scatter_tensor": "reduce_scatter_single"}


@contextlib.contextmanager
def record_collectives() -> Iterator[List[Tuple[str, List[torch.Tensor]]]]:
    """Records the torch.distributed collectives called from Python inside the block, in call
    order, as (name, the tensors handed to it); only outermost calls, so an alias that calls
    another counts once. For checking what a step sends (the tests and `bench distributed` use
    it). FSDP2's all_gathers and reduce_scatters go through these Python functions and are seen;
    collectives issued from C++, such as DDP's reducer, are not."""
    calls: List[Tuple[str, List[torch.Tensor]]] = []
    depth = [0]
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def wrap(name, fn):
        def recorded(*args, **kwargs):
            if depth[0] == 0:
                calls.append((_COLLECTIVE_ALIASES.get(name, name), [a for a in args if isinstance(a, torch.Tensor)]))
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
        return recorded

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


# --------------------------------------------------------------------------------------------------
# Replicated gradients (DDP-style): reduce once per step


def shard_bounds(D: int, world: int, rank: int) -> Tuple[int, int]:
    """Columns [start, stop) of a [K, D] stack that rank `rank` of `world` owns in
    ReplicatedGradients: contiguous chunks of c = ⌈D/world⌉ columns (the last ones shorter or
    empty)."""
    chunk = -(-D // world) if D else 0
    start = min(rank * chunk, D)
    return start, min(start + chunk, D)


def all_reduce_stack(grads: Stack, process_group=None, *, average: bool = True) -> Stack:
    """The simple path for replicated gradients: one all_reduce of the whole per-objective gradient
    stack (in place; a flat [K, D] buffer, e.g. mol.objective_gradients', is one collective; a list
    of blocks is one per block), divided by the group size when `average` (DDP's mean). Afterwards
    every rank holds the same buffer and runs the ordinary single-process step on it, with no
    further collective (the weights are equal on all ranks as the inputs are)."""
    blocks = as_blocks(grads, "grads")
    _, world = _group_rank_world(process_group)
    with nvtx_range("all_reduce_stack"):
        for block in blocks:
            if not block.is_contiguous():
                raise ValueError("grads: the blocks must be contiguous to be all-reduced in place")
            dist.all_reduce(block, op=dist.ReduceOp.SUM, group=process_group)
            if average and world > 1:
                block.div_(world)
    return grads


REPLICATED_REDUCTIONS = ("auto", "reduce_scatter", "all_reduce")


def _default_reduction(process_group) -> str:
    """reduce_scatter where the collective library has a real one (NCCL: half an all_reduce's ring
    traffic); all_reduce on gloo, whose reduce_scatter measured about twice as slow as its
    all_reduce of the same buffer (README, Distributed)."""
    backend = str(dist.get_backend(process_group)).lower()
    return "reduce_scatter" if "nccl" in backend else "all_reduce"


class ReplicatedGradients:
    """Multi-objective steps for replicated parameters (DDP-style data parallelism) with one
    reduction of the per-objective gradients per step, never one per objective:

        rep = ReplicatedGradients(params, group)              # the parameters, identical on all ranks
        state = rep.moco_state(K)                             # MoCo's state for rep.shard
        grads, _ = mol.objective_gradients(losses, params)    # [K, D], this rank's batch
        lam = rep.moco_step(grads, state, beta=0.5, gamma=0.1)   # p.grad = the averaged direction
        optimizer.step()

    reduce="reduce_scatter": (1) one reduce_scatter of the [K, D] stack: rank r receives the sum over
    ranks of its columns [r·c, (r+1)·c), c = ⌈D/n⌉ (divided by n when `average`); (2) the step on
    that shard with the sharded Gram (one K×K all_reduce); (3) one all_gather of the direction's
    shards, written into p.grad (lr=None) or applied p ← p − lr·d. Three collectives whatever K;
    ring traffic per rank (n−1)/n·(K+1)·D elements plus K², and the Gram and combine on D/n columns.
    The gradients are copied once into the rank-major layout the reduce_scatter needs. `shard` is a
    one-tensor parameter list standing for this rank's c columns, and a MoCo state holds this
    rank's [K, c] shard of Y (each rank checkpoints its own, for the same world size).

    reduce="all_reduce": one all_reduce of the [K, D] stack ((n−1)/n·2K·D on a ring; a flat stack
    is reduced in place), then the ordinary single-process step on it on every rank, no other
    collective; `shard` is then the parameters themselves and a MoCo state the full one.

    reduce="auto" (default): reduce_scatter on NCCL, all_reduce on gloo (see _default_reduction).
    Either way far less than K all_reduces of D, one per objective.
    """

    def __init__(self, params: Sequence[torch.Tensor], process_group=None, *, average: bool = True,
                 reduce: str = "auto"):
        params = _check_params(params)
        for j, p in enumerate(params):
            if is_dtensor(p):
                raise TypeError(f"params[{j}]: is a DTensor (sharded): pass process_group to the steps or "
                                "mol.backward instead, ReplicatedGradients is for replicated parameters")
            if p.dtype != params[0].dtype or p.device != params[0].device:
                raise ValueError(f"params[{j}]: all parameters need one dtype and device")
        if reduce not in REPLICATED_REDUCTIONS:
            raise ValueError(f"reduce: expected one of {REPLICATED_REDUCTIONS}, got {reduce!r}")
        self.params = params
        self.process_group = process_group
        self.average = average
        self.rank, self.world = _group_rank_world(process_group)
        self.reduce_mode = _default_reduction(process_group) if reduce == "auto" else reduce
        self.sizes = [p.numel() for p in params]
        self.D = sum(self.sizes)
        self.chunk = -(-self.D // self.world) if self.D else 0
        self.start, self.stop = shard_bounds(self.D, self.world, self.rank)
        dtype, device = params[0].dtype, params[0].device
        if self.reduce_mode == "reduce_scatter":
            # A zero-storage stand-in for this rank's c columns: the steps write the direction's
            # shard into its .grad.
            self.shard = [torch.zeros((), dtype=dtype, device=device).expand(self.chunk)]
        else:
            self.shard = params
        # Buffers kept between steps (fresh ones cost page faults on every step): the rank-major
        # send buffer of reduce_scatter, the all_gather's output, all_reduce's flat stack.
        self._send = None
        self._gathered = None
        self._flat = None

    @property
    def step_group(self):
        """The process_group the step on `shard` takes: the group for the sharded Gram
        (reduce_scatter), None for the full, identical stack (all_reduce)."""
        return self.process_group if self.reduce_mode == "reduce_scatter" else None

    def _send_buffer(self, K: int, dtype, device) -> torch.Tensor:
        key = (K, dtype, device)
        if self._send is None or self._send[0] != key:
            send = torch.empty(self.world, K, self.chunk, dtype=dtype, device=device)
            for r in range(self.world):  # the padding past D, never written by the copies: zero
                lo, hi = shard_bounds(self.D, self.world, r)
                send[r, :, hi - lo:].zero_()
            self._send = (key, send)
        return self._send[1]

    # ---- the collectives around a step ----

    def reduce(self, grads: Stack, *, in_place: bool = False) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The averaged (summed when not `average`) gradients the step on `shard` takes: (flat,
        views aligned with `shard`). reduce_scatter: this rank's [K, c] columns (a new tensor);
        all_reduce: the whole [K, D] stack, in a buffer kept between calls, or, with in_place=True,
        in `grads` itself when it is one contiguous flat [K, D] tensor (saves a copy of K·D)."""
        if self.reduce_mode == "reduce_scatter":
            local = self.reduce_scatter(grads)
            return local, [local]
        blocks = self._blocks(grads)
        if (in_place and len(blocks) == 1 and blocks[0].dim() == 2 and blocks[0].shape[1] == self.D
                and blocks[0].is_contiguous()):
            flat = blocks[0]
        else:
            K, dtype, device = blocks[0].shape[0], blocks[0].dtype, blocks[0].device
            if self._flat is None or self._flat.shape[0] != K or self._flat.dtype != dtype or self._flat.device != device:
                self._flat = torch.empty(K, self.D, dtype=dtype, device=device)
            flat, offset = self._flat, 0
            for block in blocks:
                cols = block.reshape(K, -1)
                flat[:, offset:offset + cols.shape[1]].copy_(cols)
                offset += cols.shape[1]
        all_reduce_stack(flat, self.process_group, average=self.average)
        views, offset = [], 0
        for p, size in zip(self.params, self.sizes):
            views.append(flat[:, offset:offset + size].view(flat.shape[0], *p.shape))
            offset += size
        return flat, views

    def step_lr(self, lr: Optional[float]) -> Optional[float]:
        """The lr the step on `shard` takes: None with reduce_scatter (finish applies lr to the
        gathered direction), lr itself with all_reduce (the step updates the parameters)."""
        return None if self.reduce_mode == "reduce_scatter" else lr

    def finish(self, lr: Optional[float] = None) -> None:
        """After the step on `shard` (with lr=step_lr(lr)): reduce_scatter: all-gather the
        direction's shards into p.grad (lr=None) or apply them (lr); all_reduce: nothing left."""
        if self.reduce_mode == "reduce_scatter":
            self.write(self.shard[0].grad, lr)

    def reduce_scatter(self, grads: Stack) -> torch.Tensor:
        """This rank's [K, c] shard of the sum (mean when `average`) over ranks of `grads` (a flat
        [K, D] tensor, or blocks aligned with the parameters): one reduce_scatter. Columns past D
        (the last rank's padding) are zero."""
        blocks = self._blocks(grads)
        K, n, c = blocks[0].shape[0], self.world, self.chunk
        send = self._send_buffer(K, blocks[0].dtype, blocks[0].device)
        offset = 0
        for block in blocks:  # copy each block's columns into the rank-major layout
            cols = block.reshape(K, -1)
            size = cols.shape[1]
            pos = offset
            while pos < offset + size:
                r = pos // c
                end = min(offset + size, (r + 1) * c)
                send[r, :, pos - r * c:end - r * c].copy_(cols[:, pos - offset:end - offset])
                pos = end
            offset += size
        local = torch.empty(K, c, dtype=send.dtype, device=send.device)
        with nvtx_range("reduce_scatter_stack"):
            _reduce_scatter_into(local, send.view(n * K, c), self.process_group)
        if self.average and n > 1:
            local.div_(n)
        return local

    def write(self, local_direction: torch.Tensor, lr: Optional[float] = None) -> None:
        """All-gather the direction's shards ([c] on each rank, one all_gather) and write the full
        direction into p.grad (lr=None, overwritten) or apply p ← p − lr·d."""
        if local_direction.shape != (self.chunk,):
            raise ValueError(f"local_direction: expected shape ({self.chunk},), got {tuple(local_direction.shape)}")
        key = (local_direction.dtype, local_direction.device)
        if self._gathered is None or self._gathered[0] != key:
            self._gathered = (key, torch.empty(self.world * self.chunk, dtype=key[0], device=key[1]))
        full = self._gathered[1]
        with nvtx_range("all_gather_direction"):
            _all_gather_into(full, local_direction.contiguous(), self.process_group)
        offset = 0
        for p, size in zip(self.params, self.sizes):
            d = full[offset:offset + size].view(p.shape)
            offset += size
            if lr is None:
                if p.grad is None or p.grad.shape != p.shape or p.grad.dtype != p.dtype:
                    p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
                p.grad.copy_(d)
            else:
                with torch.no_grad():
                    p.add_(d, alpha=-float(lr))

    # ---- states and steps on the shard ----

    def moco_state(self, num_objectives: int, **kwargs):
        """A MoCoState for `shard` (Y is [K, c] with reduce_scatter, [K, D] with all_reduce)."""
        return steps.MoCoState(self.shard, num_objectives, **kwargs)

    def modo_state(self, num_objectives: int, **kwargs):
        return steps.MoDoState(self.shard, num_objectives, **kwargs)

    def mgda_step(self, grads: Stack, lr: Optional[float] = None, **kwargs) -> torch.Tensor:
        """molkernels.mgda_step on this rank's gradients averaged over the ranks."""
        flat, _ = self.reduce(grads)
        lam = steps.mgda_step(self.shard, flat, self.step_lr(lr), process_group=self.step_group, **kwargs)
        self.finish(lr)
        return lam

    def moco_step(self, grads: Stack, state, beta: float = 0.5, gamma: float = 0.1, rho: float = 0.0,
                  lr: Optional[float] = None, **kwargs) -> torch.Tensor:
        """molkernels.moco_step on the averaged gradients, `state` from moco_state. With
        normalize='loss'/'loss+', pass the losses averaged over the ranks."""
        flat, _ = self.reduce(grads)
        lam = steps.moco_step(self.shard, flat, state, beta, gamma, rho, self.step_lr(lr),
                              process_group=self.step_group, **kwargs)
        self.finish(lr)
        return lam

    def modo_step(self, grads1: Stack, grads2: Stack, grads3: Stack, state, gamma: float = 0.1, rho: float = 0.0,
                  lr: Optional[float] = None, **kwargs) -> torch.Tensor:
        """molkernels.modo_step on the three averaged samples (three reductions)."""
        flats = []
        for g in (grads1, grads2, grads3):
            flat, _ = self.reduce(g)
            flats.append(flat.clone() if flat is self._flat else flat)  # the kept buffer is reused
        lam = steps.modo_step(self.shard, *flats, state, gamma, rho, self.step_lr(lr),
                              process_group=self.step_group, **kwargs)
        self.finish(lr)
        return lam

    def _blocks(self, grads: Stack) -> List[torch.Tensor]:
        if isinstance(grads, torch.Tensor) and grads.dim() == 2 and grads.shape[1] == self.D:
            return [grads]  # one flat [K, D] buffer
        blocks = as_blocks(grads, "grads")
        if len(blocks) != len(self.params):
            raise ValueError(f"grads: has {len(blocks)} blocks for {len(self.params)} parameters")
        for j, (b, p) in enumerate(zip(blocks, self.params)):
            if b.shape[1:] != p.shape:
                raise ValueError(f"grads[{j}]: shape {tuple(b.shape)} does not match parameter {j} of shape "
                                 f"{tuple(p.shape)}")
        return blocks


__all__ = [
    "ReplicatedGradients",
    "all_reduce_gram",
    "all_reduce_stack",
    "assign_grads",
    "cross_gram",
    "fsdp_objective_gradients",
    "gram",
    "is_dtensor",
    "local_tensors",
    "shard_bounds",
]
