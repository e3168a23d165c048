"""JointTrainer: SFT and preference learning (DPO) trained together instead of one after the other.

Methods (λ ∈ [0, 1] weighs the preference objective, 1 − λ the SFT objective; which objective a
step trains is molkernels.posttrain.schedule, shared with JointDPOTrainer):

    sequential  SFT for the first round((1 − λ)·total_steps) steps, then DPO (the usual pipeline)
    mix         (1 − λ)·f_SFT + λ·f_DPO on one batch of each per step
    alright     each step f_DPO with probability λ, else f_SFT: one objective per step
    maxright    each step the objective with the larger weighted optimality gap (see schedule)
    mgda        both objectives' gradients into one flat [2, D] buffer, combined by the fused
                min-norm step (molkernels.mgda_step): d = λ₁g_SFT + λ₂g_DPO of minimum norm
    moco        the same buffer through molkernels.moco_step (tracked gradients, projected λ step)

ALRIGHT and MAXRIGHT are Fernando et al., "Mitigating Forgetting in LLM Supervised Fine-Tuning and
Preference Learning" (2024). Every method ends with `optimizer.step()` on p.grad, so any torch
optimizer works.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import resource
import time
from typing import Dict, List, NamedTuple, Optional

import torch
from tqdm.auto import tqdm

from .. import _ops
from .._checks import (check_integer, check_number, check_state_generator, check_state_keys, check_state_tensor,
                       check_state_values, state_path)
from .._stack import flat_buffer
from ..distributed import assign_grads, is_dtensor, local_tensors
from ..steps import NORMALIZATIONS, MoCoState, mgda_step, moco_step
from .data import BatchStream, ByteTokenizer, PreferenceDataset, SFTDataset
from .losses import LOSS_TYPES, dpo_loss, response_tokens, sequence_logps, sft_loss
from .schedule import OBJECTIVES, MethodSchedule


def model_logits(model, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The [B, T, V] logits of a causal LM: an HF model's output.logits, or the tensor (or first
    element of the tuple or list) that a plain module returns; anything else raises TypeError
    naming the model."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"policy: returned a {type(out).__name__}; expected logits (a tensor, a tuple whose first "
                    f"element they are, or an output with .logits)")


class ReferenceLogps(NamedTuple):
    """What precompute_reference_logps did: the cache file (None without cache_dir) and whether
    the log-probabilities were read from it (True) or computed (False)."""

    path: Optional[str]
    reused: bool


def reference_fingerprint(model: torch.nn.Module, data: PreferenceDataset) -> str:
    """SHA-256 of what the reference log-probabilities depend on: the model's class, its config (when
    it has one) and every tensor of its state_dict (name, dtype, shape, bytes), and the tokenised
    pairs of `data` (so a tokenizer, a max_length or records that change the tokens change it, and
    ones that do not, do not)."""
    digest = hashlib.sha256()
    digest.update(f"{type(model).__module__}.{type(model).__qualname__}\n".encode())
    config = getattr(model, "config", None)
    if hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        flat = tensor.reshape(-1)
        step = 1 << 24  # bytes of at most 16 Mi elements at a time on the host
        for start in range(0, flat.numel(), step):
            digest.update(flat[start:start + step].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for ids, labels in data.chosen + data.rejected:
        digest.update(json.dumps([list(ids), list(labels)]).encode())
    return digest.hexdigest()


@torch.no_grad()
def precompute_reference_logps(model, data: PreferenceDataset, *, batch_size: int = 16,
                               cache_dir: Optional[str] = None) -> ReferenceLogps:
    """Score every pair of `data` once with the (frozen) reference `model` and keep the sequence
    log-probabilities in the dataset, so that training needs no reference forward passes.

    cache_dir: a folder where the scores are kept on disk under reference_fingerprint(model, data),
    reused by later runs and by every method on the same reference and data, and recomputed when
    the weights, the config or the tokenised data change (a cache file that does not hold [pairs, 2]
    finite scores for this fingerprint is recomputed and replaced, never trusted)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(data, PreferenceDataset):
        raise TypeError(f"data: expected a PreferenceDataset, got {type(data).__name__}")
    check_integer("batch_size", batch_size, 1)
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir: expected a folder path, got {type(cache_dir).__name__}")
    path = None
    if cache_dir is not None:
        fingerprint = reference_fingerprint(model, data)
        path = os.path.join(os.fspath(cache_dir), f"reference-logps-{fingerprint[:40]}.pt")
        cached = _read_reference_cache(path, fingerprint, len(data))
        if cached is not None:
            data.reference_logps = cached
            return ReferenceLogps(path, True)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = []
    for start in range(0, len(data), batch_size):
        indices = list(range(start, min(start + batch_size, len(data))))
        batch = {k: v.to(device) for k, v in data.batch(indices).items() if k in ("input_ids", "attention_mask", "labels")}
        logps = sequence_logps(model_logits(model, batch), batch["labels"]).float().cpu()
        scores.append(torch.stack([logps[:len(indices)], logps[len(indices):]], dim=1))
    model.train(was_training)
    data.reference_logps = torch.cat(scores)
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.{os.getpid()}.partial"  # then renamed: a reader never sees half a file
        torch.save({"fingerprint": fingerprint, "logps": data.reference_logps}, partial)
        os.replace(partial, path)
    return ReferenceLogps(path, False)


def _read_reference_cache(path: str, fingerprint: str, pairs: int) -> Optional[torch.Tensor]:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # missing or unreadable: recomputed and replaced
        return None
    if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint:
        return None
    logps = saved.get("logps")
    valid = isinstance(logps, torch.Tensor) and logps.dtype == torch.float32 and tuple(logps.shape) == (pairs, 2)
    return logps if valid and bool(torch.isfinite(logps).all()) else None


def _ranks(process_group):
    """(group, rank, ranks) of the processes that train together: process_group's, else the default
    group's when torch.distributed is initialised, else one process."""
    import torch.distributed as dist

    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return None, 0, 1
    if not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialised (init_process_group first)")
    return process_group, dist.get_rank(process_group), dist.get_world_size(process_group)


def _fsdp_module_class():
    """FSDP2's FSDPModule (the class fully_shard mixes into a module), None without it."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    return FSDPModule


def _check_fsdp_policy(policy: torch.nn.Module) -> bool:
    """Whether `policy` is an FSDP2 policy (fully_shard applied to it): every trainable parameter a
    DTensor sharded on dim 0 over one 1-D mesh. FSDP1 (FullyShardedDataParallel), DTensor
    parameters under a root that is not fully_shard-ed (tensor parallelism, fully_shard applied
    to submodules only), 2-D meshes (HSDP) and trainable parameters that FSDP2 does not manage
    raise ValueError naming the policy."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without FSDP
        FullyShardedDataParallel = None
    if FullyShardedDataParallel is not None and any(isinstance(m, FullyShardedDataParallel) for m in policy.modules()):
        raise ValueError("policy: wrapped in FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel), which "
                         "JointTrainer does not support; shard it with FSDP2 (torch.distributed.fsdp.fully_shard) "
                         "instead, or wrap it in DistributedDataParallel")
    fsdp_module = _fsdp_module_class()
    sharded = fsdp_module is not None and isinstance(policy, fsdp_module)
    trainable = [(name, p) for name, p in policy.named_parameters() if p.requires_grad]
    if not sharded:
        for name, p in trainable:
            if is_dtensor(p):
                raise ValueError(f"policy: parameter {name!r} is a DTensor but the policy is not fully_shard-ed; "
                                 "JointTrainer supports DTensor parameters only from FSDP2 with fully_shard applied "
                                 "to the policy itself (the root module), not tensor parallelism")
        return False
    from torch.distributed.tensor import Shard

    mesh = None
    for name, p in trainable:
        if not is_dtensor(p):
            raise ValueError(f"policy: trainable parameter {name!r} is not sharded by fully_shard (a plain tensor "
                             "in an FSDP2 policy); every trainable parameter must be managed by FSDP2")
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise ValueError(f"policy: parameter {name!r} is placed {tuple(p.placements)} on a {p.device_mesh.ndim}-D "
                             "mesh; JointTrainer supports FSDP2 sharding on dim 0 over a 1-D mesh (not HSDP or "
                             "tensor parallelism)")
        if mesh is None:
            mesh = p.device_mesh
        elif p.device_mesh != mesh:
            raise ValueError(f"policy: parameter {name!r} is sharded over another device mesh than the first "
                             "trainable parameter; every parameter must be sharded over one mesh")
    return True


def _check_fsdp_group(param, group) -> None:
    """The FSDP2 mesh of `param` spans exactly the ranks of the trainer's group (None: the default
    one), so that its reduce-scatters and the trainer's reductions sum over the same ranks."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError("policy: is fully_shard-ed but torch.distributed is not initialised")
    mesh_ranks = dist.get_process_group_ranks(param.device_mesh.get_group())
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    if sorted(mesh_ranks) != sorted(ranks):
        raise ValueError(f"process_group: holds ranks {sorted(ranks)}, the FSDP2 policy is sharded over ranks "
                         f"{sorted(mesh_ranks)}; pass the group of the policy's mesh")


class _PeakMemory:
    """Peak memory of a step: torch's allocator peak on CUDA; on CPU the process's peak resident
    set (VmHWM, reset per step through /proc/self/clear_refs where Linux allows it, else the
    lifetime peak)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resettable = device.type != "cuda" and os.access("/proc/self/clear_refs", os.W_OK)

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def read(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class JointTrainer:
    """Joint SFT + DPO training of a causal LM (see the module docstring for the methods).

    policy: any module called as policy(input_ids=..., attention_mask=...) that returns logits
    (HF transformers models, PEFT models), fp32 or bf16; its parameters with requires_grad are
    trained. optimizer: any torch optimizer holding all of them. sft_data / pref_data: SFTDataset /
    PreferenceDataset, or records (a list of dicts or a JSONL path) tokenised by `tokenizer`
    (ByteTokenizer by default).
    reference: the DPO reference model. None: the precomputed log-probabilities of pref_data if it
    has them, else a frozen copy of the policy as it is now; a module: that model, frozen;
    "adapters": the policy itself with its PEFT adapters disabled (policy.disable_adapter()).
    sft_opt / dpo_opt: the optimal values f* of MAXRIGHT's gaps (default 0, a lower bound of every
    loss here); single-objective runs estimate them. total_steps: the step budget that
    `sequential` splits. grad_accum: micro-batches of batch_size per objective per step (the SFT
    loss a token mean over all of them, as transformers' num_items_in_batch).
    moco_beta / moco_gamma: MoCo's tracking and λ step sizes. normalize: the gradient normalisation
    of mgda and moco ('none', 'l2', 'loss', 'loss+'; see molkernels.moco_step). seed fixes the data order and
    ALRIGHT's draws (an integer in [0, 2**32)); with a deterministic model the run is reproducible
    and state_dict() / load_state_dict() resume it identically. backend: the kernels of mgda and
    moco (a name that cannot run here is refused whatever the method). Every argument is checked
    here, before any step: TypeError or ValueError naming it.

    Across ranks (under torchrun, or with process_group=): batch_size is the per-rank micro-batch
    and rank r takes the r-th contiguous slice of each global batch of ranks·batch_size records; the
    gradients are reduced once per step (one all_reduce of the flat [2, D] buffer for mgda and moco,
    of all gradients otherwise; a DDP-wrapped policy runs under no_sync so that DDP does not reduce
    them again); the SFT token mean counts every rank's tokens; ALRIGHT's draws are the same on
    every rank. So n ranks with batch_size b train as one rank with n·b, every method.

    FSDP2 (a policy that torch.distributed.fsdp.fully_shard was applied to, the root module at
    least; its optimizer built on the sharded parameters): the same contract, every method. The
    policy's mesh must span the trainer's ranks (1-D, parameters sharded on dim 0; not HSDP or
    tensor parallelism). FSDP2 reduce-scatters the gradients itself, so the trainer adds no
    reduction of its own; it sets every FSDP module of the policy to sum (gradient divide factor
    1, sum reductions, zeros for unused parameters: set_gradient_divide_factor,
    set_force_sum_reduction_for_comms, set_reduce_scatter_unused_params), since its loss scaling
    already divides by the ranks, and these settings stay on the policy. Each forward gets its own
    backward and only the step's last backward of each gradient syncs
    (set_requires_gradient_sync), so grad_accum micro-batches and MAXRIGHT's evaluation forwards
    (under no_grad) add no reduction: one reduce-scatter per FSDP unit per step, two for mgda and
    moco, whose [2, D] buffer holds this rank's shards of both objectives' gradients, whose Gram
    the fused steps sum over the ranks (one 2×2 all_reduce), and whose direction each rank writes
    into its shard of p.grad. FSDP modules cannot be copied, so reference=None needs precomputed
    log-probabilities; else pass a frozen reference module (plain or fully_shard-ed) or
    'adapters'. state_dict() holds this rank's DTensor shards (policy and optimizer) and MoCo's
    state for this rank's shard: each rank saves its own and loads it into a trainer over the same
    ranks (load_state_dict refuses plain tensors for DTensor ones and the reverse). Every rank must
    call step, train, evaluate, state_dict and load_state_dict together (FSDP's all-gathers).
    FSDP1 (FullyShardedDataParallel) is refused with a ValueError naming the policy.
    """

    def __init__(self, policy: torch.nn.Module, optimizer: torch.optim.Optimizer, sft_data, pref_data, *,
                 reference=None, method: str = "alright", lam: float = 0.5, beta: float = 0.1,
                 loss_type: str = "sigmoid", label_smoothing: float = 0.0, sft_opt: Optional[float] = None,
                 dpo_opt: Optional[float] = None, max_eval_steps: int = 10, total_steps: Optional[int] = None,
                 batch_size: int = 8, grad_accum: int = 1, tokenizer=None, max_length: int = 512,
                 moco_beta: float = 0.5, moco_gamma: float = 0.1, normalize: str = "none", seed: int = 0,
                 backend: str = "auto", progress: bool = True, process_group=None):
        if not isinstance(policy, torch.nn.Module):
            raise TypeError(f"policy: expected a torch.nn.Module, got {type(policy).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.fsdp = _check_fsdp_policy(policy)  # True for an FSDP2 (fully_shard) policy
        self.schedule = MethodSchedule(method, lam, total_steps=total_steps, sft_opt=sft_opt, dpo_opt=dpo_opt,
                                       max_eval_steps=max_eval_steps, seed=seed)
        self.beta = check_number("beta", beta, 0.0, low_open=True)
        if not isinstance(loss_type, str) or loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
        self.label_smoothing = check_number("label_smoothing", label_smoothing, 0.0, 0.5)
        if self.label_smoothing == 0.5 or (self.label_smoothing and loss_type != "sigmoid"):
            raise ValueError(f"label_smoothing: expected a value in [0, 0.5) and only with loss_type='sigmoid', got "
                             f"{label_smoothing} with {loss_type!r}")
        self.grad_accum = check_integer("grad_accum", grad_accum, 1)
        check_integer("batch_size", batch_size, 1)
        self.moco_beta = check_number("moco_beta", moco_beta, 0.0, 1.0)
        self.moco_gamma = check_number("moco_gamma", moco_gamma, 0.0)
        if not isinstance(normalize, str) or normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize: expected one of {NORMALIZATIONS}, got {normalize!r}")
        if normalize != "none" and method not in ("mgda", "moco"):
            raise ValueError(f"normalize: applies to the mgda and moco methods, not {method!r}")
        self.normalize = normalize
        if not isinstance(progress, bool):
            raise ValueError(f"progress: expected True or False, got {progress!r}")
        if not isinstance(backend, str):
            raise ValueError(f"backend: expected a backend name, got {backend!r}")

        self.policy, self.optimizer, self.method, self.loss_type = policy, optimizer, method, loss_type
        self._module = policy.module if isinstance(policy, torch.nn.parallel.DistributedDataParallel) else policy
        self.backend, self.progress, self.seed = backend, progress, seed
        self.params = [p for p in policy.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("policy: has no parameters with requires_grad=True")
        self.device = self.params[0].device
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for name, p in policy.named_parameters():
            if p.requires_grad and id(p) not in held:
                raise ValueError(f"optimizer: does not hold the policy's trainable parameter {name!r}")
        if backend != "auto":  # only mgda and moco run kernels, but a name that cannot run is a mistake anywhere
            reason = _ops.unavailable_reason(backend)
            if reason is not None:
                raise ValueError(f"backend: {backend!r} cannot run here: {reason}")
            _ops.resolve_backend(backend, self.device)  # ValueError when the backend cannot take this device
        tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
        self.sft_data = sft_data if isinstance(sft_data, SFTDataset) else \
            SFTDataset(sft_data, tokenizer, max_length=max_length, name="sft_data")
        self.pref_data = pref_data if isinstance(pref_data, PreferenceDataset) else \
            PreferenceDataset(pref_data, tokenizer, max_length=max_length, name="pref_data")
        self.reference = self._resolve_reference(reference)

        self.group, self.rank, self.ranks = _ranks(process_group)
        if self.fsdp:
            _check_fsdp_group(self.params[0], self.group)
            # The fused steps take process_group=None as "one process": name the default group.
            self._step_group = self.group if self.group is not None else torch.distributed.group.WORLD
        self.streams = {"sft": BatchStream(len(self.sft_data), batch_size * self.ranks, seed),
                        "dpo": BatchStream(len(self.pref_data), batch_size * self.ranks, seed + 1)}
        self.step_count = 0
        self.history: List[dict] = []
        self.memory = _PeakMemory(self.device)
        if method in ("mgda", "moco"):
            dtypes = {p.dtype for p in self.params}
            if len(dtypes) != 1:
                raise ValueError(f"policy: mgda/moco need one dtype for all trainable parameters, got {sorted(map(str, dtypes))}")
            # With FSDP2 the buffer and MoCo's state hold this rank's shards of the parameters.
            steps_params = self._step_params()
            self.grads_flat, self.grads = flat_buffer([p.shape for p in steps_params], 2, dtype=self.params[0].dtype,
                                                      device=self.device)
            state_dtype = torch.float64 if self.params[0].dtype == torch.float64 else torch.float32
            self.moco_state = MoCoState(steps_params, 2, dtype=state_dtype) if method == "moco" else None

    # ----------------------------------------------------------------------------- reference

    def _resolve_reference(self, reference):
        if reference is None:
            if self.pref_data.reference_logps is not None:
                return "precomputed"
            if self.fsdp:
                raise ValueError("reference: None needs a copy of the policy, and an FSDP2 (fully_shard) policy cannot "
                                 "be copied (FSDP does not support deepcopy): pass reference= a frozen module (the "
                                 "model as it was before fully_shard, or its own fully_shard-ed copy), 'adapters' for "
                                 "a PEFT policy, or pref_data with precomputed log-probabilities")
            reference = copy.deepcopy(self._module)
        if isinstance(reference, str):
            if reference == "adapters":
                if not hasattr(self.policy, "disable_adapter"):
                    raise ValueError("reference: 'adapters' needs a PEFT policy with disable_adapter()")
                return reference
            if reference == "precomputed":
                if self.pref_data.reference_logps is None:
                    raise ValueError("reference: 'precomputed' needs ref_chosen_logps/ref_rejected_logps in pref_data "
                                     "(see precompute_reference_logps)")
                return reference
            raise ValueError(f"reference: expected None, a module, 'adapters' or 'precomputed', got {reference!r}")
        if not isinstance(reference, torch.nn.Module):
            raise ValueError(f"reference: expected None, a module, 'adapters' or 'precomputed', got "
                             f"{type(reference).__name__}")
        reference.eval()
        reference.requires_grad_(False)
        return reference

    @torch.no_grad()
    def _reference_logps(self, batch):
        if self.reference == "precomputed":
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if self.reference == "adapters":
            with self.policy.disable_adapter():
                logps = sequence_logps(model_logits(self.policy, batch), batch["labels"])
        else:
            logps = sequence_logps(model_logits(self.reference, batch), batch["labels"])
        half = logps.shape[0] // 2
        return logps[:half], logps[half:]

    # ----------------------------------------------------------------------------- objectives

    def _batch(self, objective: str) -> Dict[str, torch.Tensor]:
        data = self.sft_data if objective == "sft" else self.pref_data
        indices = self.streams[objective].next_indices()
        per_rank = len(indices) // self.ranks
        batch = data.batch(indices[self.rank * per_rank:(self.rank + 1) * per_rank])
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def objective(self, name: str, batch: Dict[str, torch.Tensor], *, num_items=None) -> torch.Tensor:
        """f_SFT or f_DPO of the policy on a batch (with autograd unless called under no_grad);
        num_items: the SFT loss's divisor (see sft_loss), for a micro-batch of a larger batch."""
        if name not in OBJECTIVES:
            raise ValueError(f"name: expected one of {OBJECTIVES}, got {name!r}")
        if num_items is not None and name != "sft":
            raise ValueError(f"num_items: applies to the 'sft' objective, not {name!r}")
        logits = model_logits(self.policy, batch)
        if name == "sft":
            return sft_loss(logits, batch["labels"], num_items=num_items)
        logps = sequence_logps(logits, batch["labels"])
        half = logps.shape[0] // 2
        ref_chosen, ref_rejected = self._reference_logps(batch)
        return dpo_loss(logps[:half], logps[half:], ref_chosen, ref_rejected, beta=self.beta,
                        label_smoothing=self.label_smoothing, loss_type=self.loss_type).loss

    # ----------------------------------------------------------------------------- steps

    def step(self) -> dict:
        """One training step; returns (and appends to self.history) its metrics. A non-finite loss
        raises FloatingPointError before anything is updated."""
        self.memory.reset()
        start = time.perf_counter()
        record = {"step": self.step_count}
        first_batches = {}
        no_sync = self.policy.no_sync if self._module is not self.policy else contextlib.nullcontext
        if self.schedule.refresh_due(self.step_count):  # the global batch's SFT token mean and DPO mean
            first_batches = {o: self._batch(o) for o in OBJECTIVES}
            tokens = self._all_reduce(response_tokens(first_batches["sft"]["labels"]))
            with torch.no_grad(), no_sync():
                shares = torch.stack([self.objective("sft", first_batches["sft"], num_items=tokens),
                                      self.objective("dpo", first_batches["dpo"]) / self.ranks])
            self.schedule.update_gaps(dict(zip(OBJECTIVES, self._all_reduce(shares).tolist())))
            record["refreshed"] = True
        weights = self.schedule.weights(self.step_count)
        self.optimizer.zero_grad(set_to_none=True)
        losses = {o: 0.0 for o in weights}
        if self.method in ("mgda", "moco"):
            self.grads_flat.zero_()
        # The step's batch is grad_accum micro-batches per objective on every rank. Their SFT losses
        # are divided by the response tokens of all of them (all ranks), so that they add up to the
        # token mean of the whole batch (uneven micro-batches would otherwise weigh their tokens
        # unevenly); each DPO loss, a mean over an equal number of pairs, by grad_accum · ranks. The
        # ranks' gradients are then summed.
        batches = {o: [first_batches.pop(o) if micro == 0 and o in first_batches else self._batch(o)
                       for micro in range(self.grad_accum)] for o in weights}
        sft_tokens = self._all_reduce(sum(response_tokens(b["labels"]) for b in batches["sft"])) \
            if "sft" in batches else None
        if self.fsdp:
            self._fsdp_backward(weights, batches, sft_tokens, losses)
        else:
            for micro in range(self.grad_accum):
                with no_sync():
                    values = {o: self._value(o, batches[o][micro], sft_tokens) for o in weights}
                if self.method in ("mgda", "moco"):
                    for row, o in enumerate(OBJECTIVES):  # two forward passes, so two independent graphs
                        grads = torch.autograd.grad(values[o], self.params, allow_unused=True)
                        for view, g in zip(self.grads, grads):
                            if g is not None:
                                view[row].add_(g)
                else:
                    with no_sync():
                        sum(weights[o] * values[o] for o in weights).backward()
                for o in weights:
                    losses[o] += values[o].detach()
        if self.ranks > 1:
            losses = dict(zip(losses, self._all_reduce(torch.stack(list(losses.values())))))
            if not self.fsdp:  # FSDP2's reduce-scatters have already summed them
                self._reduce_gradients()
        for o, value in losses.items():
            record[f"{o}_loss"] = value.item()
            if not math.isfinite(record[f"{o}_loss"]):
                raise FloatingPointError(f"step {self.step_count}: the {o.upper()} loss is {record[f'{o}_loss']}; "
                                         f"the parameters, the optimizer and MoCo's state were not updated")
        if self.method in ("mgda", "moco"):
            both = torch.stack([losses[o] for o in OBJECTIVES])
            # FSDP2: each rank's rows are its shards of the two global gradients; the steps sum the
            # local K×K Grams over the group (one all_reduce), so every rank solves the same λ from
            # the full Gram, and each writes its shard of the direction.
            params = self._step_params()
            group = self._step_group if self.fsdp else None
            if self.method == "mgda":
                record["weights"] = mgda_step(params, self.grads_flat, normalize=self.normalize, losses=both,
                                              backend=self.backend, process_group=group)
            else:
                record["weights"] = moco_step(params, self.grads_flat, self.moco_state, beta=self.moco_beta,
                                              gamma=self.moco_gamma, normalize=self.normalize, losses=both,
                                              backend=self.backend, process_group=group)
            if self.fsdp:
                assign_grads(self.params, params)  # p.grad: the DTensor holding this rank's shard
        self.optimizer.step()
        self.schedule.update_gaps({o: record[f"{o}_loss"] for o in losses})
        if "weights" in record:
            record["weights"] = record["weights"].tolist()
        record["trained"] = sorted(weights)
        record["sft_gap"], record["dpo_gap"] = self.schedule.gaps["sft"], self.schedule.gaps["dpo"]
        record["seconds"] = time.perf_counter() - start
        record["peak_mem_bytes"] = self.memory.read()
        self.step_count += 1
        self.history.append(record)
        return record

    def _value(self, objective: str, batch: dict[str, torch.Tensor], sft_tokens) -> torch.Tensor:
        """One micro-batch's share of an objective: the SFT loss over the step's response tokens
        (all ranks' and micro-batches'), the DPO mean divided by grad_accum · ranks."""
        if objective == "sft":
            return self.objective("sft", batch, num_items=sft_tokens)
        return self.objective(objective, batch) / (self.grad_accum * self.ranks)

    def _step_params(self) -> list[torch.Tensor]:
        """The tensors the fused steps see: this rank's local shards for FSDP2 (sharing storage
        with the DTensor parameters), else the parameters."""
        return local_tensors(self.params) if self.fsdp else self.params

    def _fsdp_backward(self, weights: dict[str, float], batches, sft_tokens, losses: dict[str, torch.Tensor]) -> None:
        """The step's backward passes for an FSDP2 policy, each objective's shares adding up (as
        the plain path's do) to the global gradient's sum over the ranks. FSDP2 reduce-scatters the
        gradients itself, so the trainer does not reduce them again: its divide factor is set to 1
        with sum reductions (FSDP2 averages by default, which would divide by the ranks a second
        time), and only the last backward of each gradient syncs (set_requires_gradient_sync), so
        grad_accum micro-batches accumulate locally and are reduced once. Every forward has its own
        backward: FSDP2 reduce-scatters once per backward of a forward, so one backward through
        two forwards (mix's SFT and DPO batches) would reduce some units twice. The other methods
        thus reduce once per step. mgda and moco take the objectives one after the other (all of
        SFT's micro-batches, then DPO's), so each objective's sharded gradient is reduce-scattered
        once and copied into its row of the [2, D_local] buffer: two reduce-scatters per step,
        FSDP's own traffic for two gradients."""
        policy = self.policy
        for module in policy.modules():
            if isinstance(module, _fsdp_module_class()):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # ReduceOp.SUM on every backend (gloo too)
        policy.set_reduce_scatter_unused_params(True)  # zeros for unused parameters: the same layout on every rank
        last = self.grad_accum - 1
        try:
            if self.method in ("mgda", "moco"):
                for p in self.params:
                    p.grad = None
                for row, o in enumerate(OBJECTIVES):
                    for micro in range(self.grad_accum):
                        policy.set_requires_gradient_sync(micro == last)
                        value = self._value(o, batches[o][micro], sft_tokens)
                        value.backward()
                        losses[o] += value.detach()
                    for view, p in zip(self.grads, self.params):
                        if p.grad is not None:
                            view[row].copy_(p.grad.to_local())
                            p.grad = None
            else:
                passes = [(micro, o) for micro in range(self.grad_accum) for o in weights]
                for i, (micro, o) in enumerate(passes):
                    policy.set_requires_gradient_sync(i == len(passes) - 1)
                    value = self._value(o, batches[o][micro], sft_tokens)
                    (weights[o] * value).backward()
                    losses[o] += value.detach()
        finally:
            policy.set_requires_gradient_sync(True)

    def _all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks (the tensor itself on one rank)."""
        if self.ranks > 1:
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor, group=self.group)
        return tensor

    def _reduce_gradients(self) -> None:
        """Sums the ranks' gradients in one all_reduce: the flat [2, D] buffer of mgda and moco, or
        every parameter's gradient flattened into one buffer."""
        if self.method in ("mgda", "moco"):
            torch.distributed.all_reduce(self.grads_flat, group=self.group)
            return
        for p in self.params:
            if p.grad is None:  # unused this step on this rank: zeros, so every rank sends the same layout
                p.grad = torch.zeros_like(p)
        flat = torch._utils._flatten_dense_tensors([p.grad for p in self.params])
        torch.distributed.all_reduce(flat, group=self.group)
        for p, g in zip(self.params, torch._utils._unflatten_dense_tensors(flat, [p.grad for p in self.params])):
            p.grad.copy_(g)

    def train(self, steps: int, *, callback=None) -> List[dict]:
        """Run `steps` steps under a tqdm bar; callback(trainer, record) after each one."""
        check_integer("steps", steps, 1)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback: expected callback(trainer, record), got {type(callback).__name__}")
        records = []
        bar = tqdm(range(steps), desc=self.method, disable=not self.progress, leave=False)
        for _ in bar:
            record = self.step()
            records.append(record)
            bar.set_postfix({k: f"{record[k]:.3f}" for k in ("sft_loss", "dpo_loss") if k in record})
            if callback is not None:
                callback(self, record)
        return records

    @torch.no_grad()
    def evaluate(self, sft_data: SFTDataset, pref_data: PreferenceDataset, *, batch_size: int = 32) -> Dict[str, float]:
        """Held-out f_SFT (token mean over the whole set) and f_DPO (mean over pairs), no grad."""
        if not isinstance(sft_data, SFTDataset):
            raise TypeError(f"sft_data: expected an SFTDataset, got {type(sft_data).__name__}")
        if not isinstance(pref_data, PreferenceDataset):
            raise TypeError(f"pref_data: expected a PreferenceDataset, got {type(pref_data).__name__}")
        check_integer("batch_size", batch_size, 1)
        if self.reference == "precomputed" and pref_data.reference_logps is None:
            raise ValueError("pref_data: this trainer's reference is precomputed log-probabilities; compute them for "
                             "the evaluation pairs too (precompute_reference_logps)")
        was_training = self.policy.training
        self.policy.eval()
        totals = {"sft": 0.0, "dpo": 0.0}
        tokens = 0
        for start in range(0, len(sft_data), batch_size):
            batch = {k: v.to(self.device) for k, v in sft_data.batch(range(start, min(start + batch_size, len(sft_data)))).items()}
            count = int((batch["labels"][:, 1:] != -100).sum())
            totals["sft"] += sft_loss(model_logits(self.policy, batch), batch["labels"]).item() * count
            tokens += count
        for start in range(0, len(pref_data), batch_size):
            indices = range(start, min(start + batch_size, len(pref_data)))
            batch = {k: v.to(self.device) for k, v in pref_data.batch(indices).items()}
            totals["dpo"] += self.objective("dpo", batch).item() * len(indices)
        self.policy.train(was_training)
        return {"sft_loss": totals["sft"] / tokens, "dpo_loss": totals["dpo"] / len(pref_data)}

    # ----------------------------------------------------------------------------- checkpoints

    def _config(self) -> dict:
        """What fixes the run besides the model and the data: a state resumes only into a trainer
        built with the same."""
        return {**self.schedule.config(), "beta": self.beta, "loss_type": self.loss_type,
                "label_smoothing": self.label_smoothing,
                "batch_size": self.streams["sft"].batch_size // self.ranks, "ranks": self.ranks,
                "grad_accum": self.grad_accum,
                "moco_beta": self.moco_beta, "moco_gamma": self.moco_gamma, "normalize": self.normalize,
                "seed": self.seed, "sft_records": len(self.sft_data), "pref_records": len(self.pref_data)}

    def _state_keys(self) -> List[str]:
        keys = ["method", "config", "step", "policy", "optimizer", "gaps", "streams", "choice_generator", "torch_rng",
                "history"]
        if isinstance(self.reference, torch.nn.Module):
            keys.append("reference")
        if self.device.type == "cuda":
            keys.append("cuda_rng")
        if self.method == "moco":
            keys.append("moco")
        return keys

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue identically: the method and configuration,
        the policy, the optimizer, an owned reference copy, the data positions, the random
        generators, MAXRIGHT's gaps, MoCo's state and the history."""
        state = {"method": self.method, "config": self._config(), "step": self.step_count,
                 "policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(), **self.schedule.state_dict(),
                 "streams": {o: s.position for o, s in self.streams.items()}, "torch_rng": torch.get_rng_state(),
                 "history": copy.deepcopy(self.history)}
        if isinstance(self.reference, torch.nn.Module):
            state["reference"] = self.reference.state_dict()
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if self.method == "moco":
            state["moco"] = self.moco_state.state_dict()
        return state

    def check_state_dict(self, state: dict, path: str = "state") -> None:
        """Raises TypeError/ValueError naming the first bad entry of `state` (e.g.
        `state['policy']['out.bias']: shape (3,), expected (258,)`): exactly the keys of
        state_dict(); the same method and configuration; a step count (an integer >= 0) and one
        history record per step; module states with exactly the module's keys, shapes and dtypes;
        an optimizer state of the same parameter groups whose per-parameter tensors fit their
        parameter (its shape with some dimensions 1, or one element; its dtype; finite; a step
        count >= 0); gaps that are numbers (inf before the first evaluation, never NaN); data
        positions >= 0; generator states their generators accept. MoCo's state is checked by
        MoCoState.load_state_dict itself."""
        if isinstance(state, dict) and "method" in state and state["method"] != self.method:  # before the keys it implies
            raise ValueError(f"{state_path(path, 'method')}: saved by method {state['method']!r}, this trainer runs "
                             f"{self.method!r}")
        check_state_keys(state, path, self._state_keys())
        if not isinstance(state["config"], dict):
            raise TypeError(f"{state_path(path, 'config')}: expected a dict, got {type(state['config']).__name__}")
        mine, theirs = self._config(), state["config"]
        different = sorted(k for k in set(mine) | set(theirs) if k not in mine or k not in theirs or mine[k] != theirs[k])
        if different:
            raise ValueError(f"{state_path(path, 'config')}: saved with a different configuration "
                             f"({', '.join(different)})")
        steps = check_integer(state_path(path, "step"), state["step"], low=0)
        history = state["history"]
        if not isinstance(history, list) or len(history) != steps:
            raise ValueError(f"{state_path(path, 'history')}: expected a list of {steps} records (one per step), got "
                             f"{len(history) if isinstance(history, list) else type(history).__name__}")
        for i, record in enumerate(history):
            if not isinstance(record, dict) or record.get("step") != i:
                raise ValueError(f"{state_path(path, 'history')}[{i}]: expected the record of step {i}")
        _check_module_state(state["policy"], state_path(path, "policy"), self.policy)
        if "reference" in state:
            _check_module_state(state["reference"], state_path(path, "reference"), self.reference)
        _check_optimizer_state(state["optimizer"], state_path(path, "optimizer"), self.optimizer)
        check_state_keys(state["streams"], state_path(path, "streams"), OBJECTIVES)
        for o in OBJECTIVES:
            check_integer(state_path(state_path(path, "streams"), o), state["streams"][o], low=0)
        self.schedule.check_state_dict(state, path)
        check_state_generator(state["torch_rng"], state_path(path, "torch_rng"), torch.default_generator)
        if "cuda_rng" in state:
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            check_state_generator(state["cuda_rng"], state_path(path, "cuda_rng"), torch.cuda.default_generators[index])

    def load_state_dict(self, state: dict) -> None:
        """Restores a state_dict() of a trainer built the same way, all of it or nothing: the state
        is checked whole first (check_state_dict; MoCo's part by MoCoState.load_state_dict, which
        checks before it writes and runs before anything else is written), then applied."""
        self.check_state_dict(state)
        if self.method == "moco":
            try:
                self.moco_state.load_state_dict(state["moco"])
            except (TypeError, ValueError) as error:  # its keys named from the trainer's state down
                message = str(error)
                nested = message[len("state"):] if message.startswith("state") else f": {message}"
                raise type(error)(f"{state_path('state', 'moco')}{nested}") from None
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        if "reference" in state:
            self.reference.load_state_dict(state["reference"])
        self.step_count = int(state["step"])
        self.schedule.load_state_dict(state)
        for o in OBJECTIVES:
            self.streams[o].position = int(state["streams"][o])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.history = copy.deepcopy(state["history"])


def _check_module_state(saved, path: str, module: torch.nn.Module) -> None:
    """A module's state_dict(): exactly its keys, each tensor of its shape and dtype."""
    current = module.state_dict()
    check_state_keys(saved, path, list(current))
    for key, value in current.items():
        if isinstance(value, torch.Tensor):
            check_state_tensor(saved[key], state_path(path, key), value)
            _check_sharding(saved[key], state_path(path, key), value)


def _check_sharding(value: torch.Tensor, path: str, like: torch.Tensor) -> None:
    """A saved tensor is sharded as the live one: a DTensor (FSDP2) with the same placements and
    this rank's local shape where `like` is one (a rank's own state_dict() of a run over the same
    ranks), a plain tensor where it is not."""
    if is_dtensor(like):
        if not is_dtensor(value):
            raise TypeError(f"{path}: a plain tensor, the FSDP2 policy holds a DTensor shard; load the state_dict() "
                            "that this rank saved in an FSDP2 run over the same ranks")
        local_differs = value.shape == like.shape and value.to_local().shape != like.to_local().shape
        if tuple(value.placements) != tuple(like.placements) or local_differs:
            raise ValueError(f"{path}: sharded as {tuple(value.placements)} with local shape "
                             f"{tuple(value.to_local().shape)}, this rank's is {tuple(like.placements)} with "
                             f"{tuple(like.to_local().shape)}")
    elif is_dtensor(value):
        raise TypeError(f"{path}: a DTensor (saved from an FSDP2 run), this policy's tensor is not sharded")


def _check_optimizer_state(saved, path: str, optimizer: torch.optim.Optimizer) -> None:
    """An optimizer's state_dict() for this optimizer's parameter groups: the same groups with the
    same keys and parameter indices, and per-parameter state whose tensors fit the parameter (the
    parameter's shape with some dimensions 1, as factored second moments have, or one element, as
    step counts have), in its dtype when floating and not a count, finite; a "step" entry >= 0 and
    whole."""
    current = optimizer.state_dict()
    check_state_keys(saved, path, list(current))
    groups, mine = saved["param_groups"], current["param_groups"]
    groups_path = state_path(path, "param_groups")
    if not isinstance(groups, list) or len(groups) != len(mine):
        raise ValueError(f"{groups_path}: expected a list of {len(mine)} parameter groups, got "
                         f"{len(groups) if isinstance(groups, list) else type(groups).__name__}")
    parameters = {}
    for i, (group, my_group, live) in enumerate(zip(groups, mine, optimizer.param_groups)):
        group_path = f"{groups_path}[{i}]"
        check_state_keys(group, group_path, list(my_group))
        if group["params"] != my_group["params"]:
            raise ValueError(f"{state_path(group_path, 'params')}: {group['params']!r}, expected {my_group['params']!r}")
        parameters.update(zip(my_group["params"], live["params"]))
    entries = saved["state"]
    if not isinstance(entries, dict):
        raise TypeError(f"{state_path(path, 'state')}: expected a dict, got {type(entries).__name__}")
    for index, entry in entries.items():
        entry_path = f"{state_path(path, 'state')}[{index!r}]"
        if index not in parameters:
            raise ValueError(f"{entry_path}: no parameter {index!r} in the optimizer's groups")
        if not isinstance(entry, dict):
            raise TypeError(f"{entry_path}: expected a dict, got {type(entry).__name__}")
        p = parameters[index]
        for name, value in entry.items():
            value_path = state_path(entry_path, name)
            if name == "step" and not isinstance(value, torch.Tensor):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
                        or value != math.floor(value):
                    raise ValueError(f"{value_path}: a step count >= 0, got {value!r}")
                continue
            if not isinstance(value, torch.Tensor):
                continue
            scalar = value.numel() == 1 and value.dim() <= 1
            fits = value.dim() == p.dim() and all(v in (1, q) for v, q in zip(value.shape, p.shape))
            if not (scalar or fits):
                raise ValueError(f"{value_path}: shape {tuple(value.shape)} does not fit the parameter's "
                                 f"{tuple(p.shape)}")
            if value.is_floating_point() and not scalar and value.dtype != p.dtype:
                raise TypeError(f"{value_path}: dtype {value.dtype}, the parameter's is {p.dtype}")
            if not scalar:
                _check_sharding(value, value_path, p)
            if value.is_floating_point() or value.is_complex():
                check_state_values(value, value_path, finite=True)
            if name == "step" and (not bool((value >= 0).all()) or not torch.equal(value, value.floor())):
                raise ValueError(f"{value_path}: a step count >= 0, got {value.tolist()}")
