"""mol.backward: per-objective gradients into one flat buffer, aggregated into p.grad."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .._checks import check_disjoint, labelled
from .._stack import flat_buffer
from .base import Aggregator, GramWeighting

STRATEGIES = ("auto", "batched", "loop")

# How the K per-objective gradients are computed. Measured on this CPU (torch 2.14, a machine
# shared with other jobs, so trimmed means of interleaved runs), MLP 32-W-W-K with ReLU, batch B,
# mean-squared losses, time for forward + the K gradients:
#
#                          1 thread                       2 threads (contended)
#     K   W     B     K passes    one batched call    K passes    one batched call
#     3   64    64     0.56 ms      0.39 ms             0.78 ms     0.56 ms
#     5   64    64     0.86 ms      0.45 ms             0.96 ms     0.46 ms
#     10  64    64     1.70 ms      0.59 ms             2.0 ms      0.54 ms
#     5   256   256    5.8 ms       6.6 ms              20 ms       20 ms
#     10  256   256    15.3 ms      15.4 ms             25 ms       23 ms
#     5   1024  256    106 ms       110 ms              301 ms      208 ms
#     10  1024  256    223 ms       236 ms              582 ms      318 ms
#
# "K passes": torch.autograd.grad per loss with retain_graph; "one batched call":
# torch.autograd.grad(stacked_losses, params, grad_outputs=I_K, is_grads_batched=True), which vmaps
# one backward over the K rows of the identity. Where per-op overhead dominates (small layers,
# larger K) the batched call is 1.4–3× faster; where the matmuls dominate the two are within ~10%
# (single-threaded the batched call is up to 13% slower at W = 256–1024, with two threads it
# was as fast or faster). K = 2 is a tie. "auto" therefore uses the batched call; "loop" is for
# models whose backward does not support vmap (custom autograd.Functions without a vmap rule,
# data-dependent control flow in backward) and saves the K-wide intermediate gradients' memory.


def _loss_list(losses, name: str) -> List[torch.Tensor]:
    if isinstance(losses, torch.Tensor):
        if losses.dim() > 1:
            raise ValueError(f"{name}: expected a vector of K losses, got shape {tuple(losses.shape)}")
        items = [losses] if losses.dim() == 0 else list(losses.unbind(0))
    elif isinstance(losses, (list, tuple)):
        items = list(losses)
    else:
        raise TypeError(f"{name}: expected a tensor or a sequence of scalar tensors, got {type(losses).__name__}")
    if not items:
        raise ValueError(f"{name}: expected at least one loss, got none")
    for k, loss in enumerate(items):
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"{name}[{k}]: expected a scalar tensor, got "
                             f"{type(loss).__name__ if not isinstance(loss, torch.Tensor) else tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError(f"{name}[{k}]: does not require grad (it is not computed from the parameters)")
    return [loss.reshape(()) for loss in items]


def _check_params(params, name: str = "params") -> List[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        params = [params]
    params = list(params)
    if not params:
        raise ValueError(f"{name}: expected at least one tensor, got none")
    for j, p in enumerate(params):
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise TypeError(f"{name}[{j}]: expected a floating-point tensor")
        if not p.requires_grad:
            raise ValueError(f"{name}[{j}]: does not require grad")
        if p.dtype != params[0].dtype:
            raise TypeError(f"{name}[{j}]: dtype {p.dtype} differs from {name}[0]'s {params[0].dtype}")
        if p.device != params[0].device:
            raise ValueError(f"{name}[{j}]: on {p.device}, {name}[0] on {params[0].device}")
    # A tensor listed twice, or two that share memory, would get two gradient rows for one p.grad:
    # "params[2]: overlaps params[0]" (DTensors by their local shards), before any backward pass.
    from ..distributed import local_tensors

    check_disjoint(labelled(local_tensors(params), name))
    return params


def objective_gradients(losses: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], *, strategy: str = "auto",
                        retain_graph: bool = False) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """The gradients of each loss with respect to `inputs`, in one flat [K, D] buffer
    (molkernels.flat_buffer, the inputs' dtype and device) with per-input views [K, *shape]. An
    input a loss does not depend on gets zeros in that loss's row."""
    losses = list(losses)
    inputs = list(inputs)
    K = len(losses)
    flat, views = flat_buffer([t.shape for t in inputs], K, dtype=inputs[0].dtype, device=inputs[0].device)
    if strategy == "loop" or K == 1:
        for k, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, inputs, retain_graph=retain_graph or k < K - 1, allow_unused=True)
            for view, g in zip(views, grads):
                if g is None:
                    view[k].zero_()
                else:
                    view[k].copy_(g)
        return flat, views
    stacked = torch.stack(losses)
    eye = torch.eye(K, dtype=stacked.dtype, device=stacked.device)
    try:
        grads = torch.autograd.grad(stacked, inputs, grad_outputs=eye, retain_graph=retain_graph, allow_unused=True,
                                    is_grads_batched=True)
    except RuntimeError as error:
        raise RuntimeError(f"mol.backward: the batched backward (is_grads_batched=True) failed ({error}); "
                           "pass strategy='loop' for K separate backward passes") from error
    for view, g in zip(views, grads):
        if g is None:
            view.zero_()
        else:
            view.copy_(g)
    return flat, views


def backward(losses, params, aggregator: Aggregator, *, shared=None, strategy: str = "auto",
             retain_graph: bool = False, backend: str = "auto", process_group=None,
             replicated=False) -> Optional[torch.Tensor]:
    """Aggregate the gradients of K losses into p.grad, for any training loop and torch optimizer:

        losses = model_losses(batch)                 # K scalars (a [K] tensor or a sequence)
        lam = mol.backward(losses, params, mol.UPGrad())
        optimizer.step(); optimizer.zero_grad()

    1. The K per-objective gradients with respect to `params` go into one flat [K, D] buffer
       (molkernels.flat_buffer): one batched autograd.grad (strategy "auto"/"batched", the faster
       one measured, see STRATEGIES' comment) or K backward passes ("loop"). Parameters a loss
       does not reach get zeros.
    2. The aggregator writes its direction into p.grad (overwritten, not accumulated): a
       GramWeighting takes the Gram of the buffer (one kernel over the whole model), its weights,
       and combines into p.grad (a second pass); MoCo runs molkernels.moco_step on the buffer.

    Returns the weights λ (a device tensor) where the aggregator has them, else None.

    MoDo (``aggregator.samples == 3``): `losses` is a list of three loss vectors from three
    independent mini-batches; three buffers are computed. FAMO (``loss_based``): one backward of
    its weighted loss, no per-objective gradients.

    Shared-representation mode (``shared=z``, MGDA-UB of Sener & Koltun, 2018): the per-objective
    gradients are taken with respect to the shared feature tensor(s) z (e.g. the encoder output,
    [batch, features]) instead of the parameters, so the buffer is [K, z.numel()] however large the
    model; the Gram of those gradients gives the weights λ = aggregator.weights(G), and one backward
    of Σ_k λ_k ℓ_k writes p.grad. Needs a GramWeighting. The weights then come from the
    representation's gradients (MGDA-UB's upper bound), not the parameters'.

    Across ranks (``process_group``, e.g. ``torch.distributed.group.WORLD``; None: one process,
    nothing added), for the Gram-based aggregators, MoCo, MoDo and Mean/Linear:

    * FSDP2 (``fully_shard``; `params` are DTensors): one backward pass per objective (FSDP
      reduce-scatters each into the sharded p.grad), the local shards in one [K, D_local] buffer,
      the sharded Gram (one K×K all_reduce), and each rank writes its shard of the direction into
      p.grad (a DTensor like p). Parameters of the model outside `params` accumulate the sum of the
      K gradients.
    * Sharded plain tensors (model parallelism: `params` are this rank's parameters, the losses
      the global ones): the gradients as without process_group, the Gram summed over the group with
      one K×K all_reduce.
    * ``replicated=True`` (DDP-style: every rank holds all of `params` and the losses of its own
      batch): the [K, D] gradients of this rank's losses are averaged over the ranks once
      (molkernels.distributed.ReplicatedGradients): "reduce_scatter" (NCCL's default) reduce-
      scatters them, runs the step on this rank's columns with the sharded Gram, and all-gathers
      the direction into p.grad; "all_reduce" (gloo's default) all-reduces the buffer and runs the
      single-process step on every rank. ``replicated=True`` picks by backend; pass either name to
      choose. Run the forward outside DDP's gradient hooks (the plain module, or
      ``ddp.no_sync()``).

    In the data-parallel modes (FSDP2, replicated), MoCo's normalize='loss'/'loss+' uses the losses
    averaged over the ranks (one more all_reduce of K numbers). A MoCo state holds this rank's shard
    of Y: each rank checkpoints its own. FAMO and the shared-representation mode have no
    distributed path.

    Raises ValueError naming the argument for empty or non-scalar losses, parameters that do not
    require grad or that are listed twice or overlap in memory (naming both positions), or K not
    matching the aggregator, before any backward pass.

    Non-finite gradients or losses give NaN weights and a NaN direction, never a finite one (see
    molkernels.mol.base for each kind of aggregator).
    """
    if not isinstance(aggregator, Aggregator):
        raise TypeError(f"aggregator: expected a molkernels.mol.Aggregator, got {type(aggregator).__name__}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    if process_group is not None:
        return _distributed_backward(losses, params, aggregator, process_group, replicated=replicated,
                                     shared=shared, strategy=strategy, retain_graph=retain_graph, backend=backend)
    if replicated:
        raise ValueError("replicated: needs a process_group")
    params = _check_params(params)

    if aggregator.loss_based:
        if shared is not None:
            raise ValueError("shared: FAMO takes no per-objective gradients, so there is no shared mode for it")
        loss_list = _loss_list(losses, "losses")
        aggregator.check_num_objectives(len(loss_list), "losses")
        return aggregator.backward(loss_list, params, retain_graph=retain_graph)

    if aggregator.samples > 1:
        if shared is not None:
            raise ValueError(f"shared: {type(aggregator).__name__} has no shared-representation mode")
        if not isinstance(losses, (list, tuple)) or len(losses) != aggregator.samples:
            raise ValueError(f"losses: {type(aggregator).__name__} needs a list of {aggregator.samples} loss vectors "
                             f"(one per independent mini-batch), got "
                             f"{len(losses) if isinstance(losses, (list, tuple)) else type(losses).__name__}")
        lists = [_loss_list(item, f"losses[{i}]") for i, item in enumerate(losses)]
        for i, item in enumerate(lists[1:], start=1):
            if len(item) != len(lists[0]):
                raise ValueError(f"losses[{i}]: has {len(item)} losses, losses[0] has {len(lists[0])}")
        aggregator.check_num_objectives(len(lists[0]), "losses")
        samples = [objective_gradients(item, params, strategy=strategy, retain_graph=retain_graph) for item in lists]
        return aggregator._write_grads(params, samples, lists[0], backend)

    loss_list = _loss_list(losses, "losses")
    aggregator.check_num_objectives(len(loss_list), "losses")
    if shared is None:
        samples = [objective_gradients(loss_list, params, strategy=strategy, retain_graph=retain_graph)]
        return aggregator._write_grads(params, samples, loss_list, backend)

    if not isinstance(aggregator, GramWeighting):
        raise ValueError(f"shared: the shared-representation mode needs a GramWeighting (weights from a Gram "
                         f"matrix), {type(aggregator).__name__} is not one")
    features = _check_params(shared, "shared")
    from ..ops import gram

    flat, _ = objective_gradients(loss_list, features, strategy=strategy, retain_graph=True)
    lam = aggregator.weights(gram(flat, backend=backend))
    total = (torch.stack(loss_list) * lam.detach().to(loss_list[0].dtype)).sum()
    grads = torch.autograd.grad(total, params, retain_graph=retain_graph, allow_unused=True)
    for p, g in zip(params, grads):
        p.grad = torch.zeros_like(p) if g is None else g
    return lam


def _distributed_backward(losses, params, aggregator: Aggregator, process_group, *, replicated: bool, shared,
                          strategy: str, retain_graph: bool, backend: str) -> Optional[torch.Tensor]:
    """mol.backward across the ranks of process_group (see backward's docstring)."""
    from .. import distributed

    if aggregator.loss_based:
        raise ValueError(f"process_group: {type(aggregator).__name__} weighs the losses, not their gradients: "
                         "it has no distributed path")
    if shared is not None:
        raise ValueError("shared: the shared-representation mode has no distributed path")
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    sharded = [distributed.is_dtensor(p) for p in params]
    fsdp = any(sharded)
    if fsdp and not all(sharded):
        raise ValueError("params: mixes DTensor (FSDP2) and plain parameters")
    if fsdp and replicated:
        raise ValueError("replicated: FSDP2 parameters are sharded, not replicated")
    params = _check_params(params)

    if aggregator.samples > 1:
        if not isinstance(losses, (list, tuple)) or len(losses) != aggregator.samples:
            raise ValueError(f"losses: {type(aggregator).__name__} needs a list of {aggregator.samples} loss vectors")
        lists = [_loss_list(item, f"losses[{i}]") for i, item in enumerate(losses)]
        for i, item in enumerate(lists[1:], start=1):
            if len(item) != len(lists[0]):
                raise ValueError(f"losses[{i}]: has {len(item)} losses, losses[0] has {len(lists[0])}")
    else:
        lists = [_loss_list(losses, "losses")]
    aggregator.check_num_objectives(len(lists[0]), "losses")
    loss_values = lists[0]

    if fsdp:
        samples = [distributed.fsdp_objective_gradients(item, params, retain_graph=retain_graph) for item in lists]
        locals_ = [view[0] for view in samples[0][1]]
        holders = [torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape) for t in locals_]
    elif replicated:
        rep = distributed.ReplicatedGradients(params, process_group,
                                              reduce="auto" if replicated is True else replicated)
        samples = []
        for item in lists:
            flat, _ = objective_gradients(item, params, strategy=strategy, retain_graph=retain_graph)
            samples.append(rep.reduce(flat, in_place=True))  # each sample's own fresh buffer
        holders = rep.shard
    else:
        samples = [objective_gradients(item, params, strategy=strategy, retain_graph=retain_graph) for item in lists]
        holders = params

    if (fsdp or replicated) and getattr(aggregator, "normalize", "none") in ("loss", "loss+"):
        values = torch.stack([loss.detach().reshape(()) for loss in loss_values]).to(torch.float64)
        torch.distributed.all_reduce(values, group=process_group)
        values = values / torch.distributed.get_world_size(process_group)
        loss_values = list(values.to(loss_values[0].dtype).unbind(0))

    step_group = rep.step_group if replicated else process_group
    lam = aggregator._write_grads(holders, samples, loss_values, backend, process_group=step_group)
    if fsdp:
        for p, h in zip(params, holders):
            p.grad = distributed._as_sharded_like(p, h.grad)
    elif replicated:
        rep.finish()
    return lam
