"""JointDPOTrainer: TRL's DPOTrainer that trains SFT and DPO together with the methods of
molkernels.posttrain (their schedule is molkernels.posttrain.schedule, shared with JointTrainer).

A drop-in for `trl.DPOTrainer`: it takes everything DPOTrainer takes, plus `sft_dataset` (TRL's SFT
records: {"prompt", "completion"} as strings or message lists, or {"messages"} with the loss on the
assistant turns only) and `method` with its options. Each optimizer step trains what the schedule
says (sequential, mix, alright, maxright: an SFT and/or a DPO loss through the Trainer's own backward,
gradient clipping, scheduler, callbacks, logging and checkpoints; mgda, moco: both gradients into one
flat [2, D] buffer, combined by molkernels' fused mgda_step / moco_step before the optimizer step).

The losses are molkernels' sft_loss, sequence_logps and dpo_loss on the model's logits; they equal
TRL's own on the same batch (sigmoid, hinge, and ipo with ipo_length_normalize; see the tests). With gradient accumulation the SFT
loss is the token mean over all micro-batches of the step (across ranks too). The preference
dataloader is the Trainer's and advances every step; a step that trains only SFT leaves its
preference batch unused. SFT batches come from their own stream (per_device_train_batch_size
records per rank, rank r taking the r-th slice of each global batch, order fixed by args.seed).
Resuming from a Trainer checkpoint continues the schedule (ALRIGHT's draws, MAXRIGHT's gaps), the
SFT stream and MoCo's state: they are saved next to the checkpoint as molkernels_joint_state.pt.
"""

from __future__ import annotations

import contextlib
import os
from typing import Dict, List, Optional

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import DPOConfig, DPOTrainer

from .._stack import flat_buffer
from ..steps import NORMALIZATIONS, MoCoState, mgda_step, moco_step
from .data import IGNORE_INDEX, BatchStream, chat_labels, collate, common_prefix
from .losses import dpo_loss, response_tokens, sequence_logps, sft_loss
from .schedule import OBJECTIVES, MethodSchedule

STATE_FILE = "molkernels_joint_state.pt"
LOSS_TYPES = ("sigmoid", "hinge", "ipo")


class JointDPOTrainer(DPOTrainer):
    """trl.DPOTrainer with joint SFT + DPO training (see the module docstring).

    sft_dataset: a datasets.Dataset or a list of SFT records. method: sequential, mix, alright,
    maxright, mgda or moco; lam: the weight λ of DPO (1 − λ of SFT); sft_opt / dpo_opt /
    max_eval_steps: MAXRIGHT's optima and refresh period; moco_beta / moco_gamma / normalize: the
    options of moco_step and mgda_step; ipo_length_normalize: with loss_type ipo, divide each
    log-ratio by its completion's length as TRL does (True, the default) or follow the IPO paper
    (False). `sequential` needs args.max_steps (the budget it splits).
    DPOConfig options that molkernels' losses do not have (loss types other than sigmoid, hinge, ipo,
    several loss types, label smoothing, ld_alpha, f-divergences, weighting) are refused here, naming
    the option. Log entries per logged step: sft_loss and dpo_loss (of the objectives trained),
    dpo_trained (the fraction of steps that trained DPO), objective (sft, dpo or both) and, for mgda
    and moco, weights.
    """

    def __init__(self, model, ref_model=None, args: Optional[DPOConfig] = None, *, sft_dataset=None,
                 method: str = "alright", lam: float = 0.5, sft_opt: Optional[float] = None,
                 dpo_opt: Optional[float] = None, max_eval_steps: int = 10, moco_beta: float = 0.5,
                 moco_gamma: float = 0.1, normalize: str = "none", ipo_length_normalize: bool = True, **kwargs):
        if sft_dataset is None:
            raise ValueError("sft_dataset: required (TRL SFT records: prompt/completion or messages)")
        if args is not None:
            _check_dpo_config(args)
        max_steps = args.max_steps if args is not None and args.max_steps > 0 else None
        seed = args.seed if args is not None else 42  # TrainingArguments' default seed
        self.schedule = MethodSchedule(method, lam, total_steps=max_steps, sft_opt=sft_opt, dpo_opt=dpo_opt,
                                       max_eval_steps=max_eval_steps, seed=seed)
        if not isinstance(normalize, str) or normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize: expected one of {NORMALIZATIONS}, got {normalize!r}")
        if normalize != "none" and method not in ("mgda", "moco"):
            raise ValueError(f"normalize: applies to the mgda and moco methods, not {method!r}")
        if not isinstance(ipo_length_normalize, bool):
            raise ValueError(f"ipo_length_normalize: expected True or False, got {ipo_length_normalize!r}")
        self.method, self.normalize, self.moco_beta, self.moco_gamma = method, normalize, moco_beta, moco_gamma
        self.ipo_length_normalize = ipo_length_normalize
        super().__init__(model, ref_model=ref_model, args=args, **kwargs)
        if args is None:
            _check_dpo_config(self.args)
        self._sft_records = [_tokenize_sft(self._tokenizer, record, i, self.args.max_length)
                             for i, record in enumerate(sft_dataset)]
        if not self._sft_records:
            raise ValueError("sft_dataset: is empty")
        world = self.accelerator.num_processes
        self._sft_stream = BatchStream(len(self._sft_records), self.args.per_device_train_batch_size * world,
                                       self.args.seed + 3)
        self._plan: Optional[dict] = None
        self._last_objective: Optional[str] = None
        self._last_weights: Optional[List[float]] = None
        params = [p for p in self.model.parameters() if p.requires_grad]
        self._params = params
        if method in ("mgda", "moco"):
            dtypes = {p.dtype for p in params}
            if len(dtypes) != 1:
                raise ValueError(f"model: mgda/moco need one dtype for all trainable parameters, got {sorted(map(str, dtypes))}")
            self._grads_flat, self._grads = flat_buffer([p.shape for p in params], 2, dtype=params[0].dtype,
                                                        device=params[0].device)
            state_dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
            self._moco_state = MoCoState(params, 2, dtype=state_dtype) if method == "moco" else None

    # ------------------------------------------------------------------------------ objectives

    def _sft_batch(self) -> Dict[str, torch.Tensor]:
        """This rank's slice of the next global SFT batch, padded on the right, on the device."""
        indices = self._sft_stream.next_indices()
        per_rank = self.args.per_device_train_batch_size
        rank = self.accelerator.process_index
        rows = [self._sft_records[i] for i in indices[rank * per_rank:(rank + 1) * per_rank]]
        batch = collate([ids for ids, _ in rows], [[t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
                                                   for ids, mask in rows], self._tokenizer.pad_token_id)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    @staticmethod
    def _logits(model, input_ids, attention_mask) -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def sft_objective(self, model, batch, *, num_items=None) -> torch.Tensor:
        """molkernels' sft_loss of `model` on an SFT batch (input_ids, attention_mask, labels)."""
        return sft_loss(self._logits(model, batch["input_ids"], batch["attention_mask"]), batch["labels"],
                        num_items=num_items)

    def dpo_objective(self, model, inputs):
        """molkernels' dpo_loss (a DPOOutput) of `model` on a batch of TRL's preference collator;
        the reference log-probabilities precomputed (precompute_ref_log_probs) or from TRL's
        reference model (ref_model, or the PEFT model with its adapters disabled)."""
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        logps = sequence_logps(self._logits(model, inputs["input_ids"], inputs["attention_mask"]), labels)
        chosen, rejected = logps.chunk(2, dim=0)
        if "ref_chosen_logps" in inputs:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            # TRL scores with the model it is given (the PEFT policy, when there is no ref_model, with its
            # reference adapter or none active).
            ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model or self.model, inputs)
        loss_type = self.args.loss_type[0]
        lengths = None
        if loss_type == "ipo" and self.ipo_length_normalize:
            counts = inputs["completion_mask"].sum(dim=1).clamp(min=1)  # as TRL counts them
            lengths = counts.chunk(2, dim=0)
        return dpo_loss(chosen, rejected, ref_chosen.to(chosen.dtype), ref_rejected.to(chosen.dtype),
                        beta=self.args.beta, loss_type=loss_type, completion_lengths=lengths)

    # ------------------------------------------------------------------------------ steps

    def _start_step(self, model, inputs) -> dict:
        """The plan of the optimizer step that begins with this micro-batch: MAXRIGHT's refresh,
        the objectives and weights, and the SFT micro-batches with their token count."""
        step, micro_batches = self.state.global_step, self.current_gradient_accumulation_steps
        sft_batches = []
        if self.schedule.refresh_due(step):  # the global batch's losses: SFT's token mean, DPO's mean over pairs
            sft_batches.append(self._sft_batch())
            first_tokens = self.accelerator.reduce(response_tokens(sft_batches[0]["labels"]), "sum")
            with torch.no_grad():
                sft_share = self.sft_objective(model, sft_batches[0], num_items=first_tokens)
                dpo_mean = self.dpo_objective(model, inputs).loss
            self.schedule.update_gaps({"sft": self.accelerator.reduce(sft_share, "sum").item(),
                                       "dpo": self.accelerator.reduce(dpo_mean, "mean").item()})
        weights = self.schedule.weights(step)
        tokens = None
        if "sft" in weights:
            sft_batches += [self._sft_batch() for _ in range(micro_batches - len(sft_batches))]
            tokens = sum(response_tokens(b["labels"]) for b in sft_batches)
            tokens = self.accelerator.reduce(tokens.to(self.accelerator.device), "sum")
        if self.method in ("mgda", "moco"):
            self._grads_flat.zero_()
        return {"step": step, "weights": weights, "sft": sft_batches, "tokens": tokens, "micro": 0,
                "micro_batches": micro_batches, "losses": {o: 0.0 for o in weights}, "rewards": []}

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """One micro-batch of the current optimizer step (the Trainer's loop calls it
        gradient_accumulation_steps times per step, then clips and steps the optimizer)."""
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        if self._plan is None or self._plan["step"] != self.state.global_step:
            self._plan = self._start_step(model, inputs)
        plan = self._plan
        micro, weights = plan["micro"], plan["weights"]
        world = self.accelerator.num_processes
        # mgda/moco sum the ranks' per-objective gradients themselves (one all_reduce of the [2, D]
        # buffer), so DDP must not reduce: their forwards run under no_sync. The other methods let
        # DDP average the ranks' gradients, which the SFT share × world turns into the token sum.
        separate = self.method in ("mgda", "moco")
        no_sync = model.no_sync if separate and hasattr(model, "no_sync") else contextlib.nullcontext
        shares = {}
        with self.compute_loss_context_manager(), no_sync():
            if "sft" in weights:  # this rank's tokens over all ranks' tokens of the step
                shares["sft"] = self.sft_objective(model, plan["sft"][micro], num_items=plan["tokens"])
            if "dpo" in weights:
                out = self.dpo_objective(model, inputs)
                shares["dpo"] = out.loss / plan["micro_batches"]
                plan["rewards"].append(out)
        values = {"sft": shares["sft"] * (1 if separate else world)} if "sft" in shares else {}
        if "dpo" in shares:
            values["dpo"] = shares["dpo"] / (world if separate else 1)
        if separate:
            for row, o in enumerate(OBJECTIVES):
                grads = torch.autograd.grad(values[o], self._params, allow_unused=True)
                for view, g in zip(self._grads, grads):
                    if g is not None:
                        view[row].add_(g)
            total = (values["sft"] + values["dpo"]).detach()
        else:
            total = sum(weights[o] * values[o] for o in weights)
            self.accelerator.backward(total)
            total = total.detach()
        for o, v in shares.items():
            plan["losses"][o] += v.detach()
        plan["micro"] += 1
        if plan["micro"] == plan["micro_batches"]:
            self._finish_step(plan)
        return total

    def _finish_step(self, plan: dict) -> None:
        """After the last micro-batch: mgda/moco's fused step into p.grad, MAXRIGHT's gaps from
        the step's losses, and the step's metrics."""
        # Each rank holds its share of the SFT token mean (summed) and the mean of its DPO pairs.
        losses = {o: self.accelerator.reduce(torch.as_tensor(v, device=self.accelerator.device),
                                             "sum" if o == "sft" else "mean").item() for o, v in plan["losses"].items()}
        if self.method in ("mgda", "moco"):
            if self.accelerator.num_processes > 1:
                torch.distributed.all_reduce(self._grads_flat)
            both = torch.tensor([losses["sft"], losses["dpo"]], device=self._grads_flat.device)
            if self.method == "mgda":
                weights = mgda_step(self._params, self._grads_flat, normalize=self.normalize, losses=both)
            else:
                weights = moco_step(self._params, self._grads_flat, self._moco_state, beta=self.moco_beta,
                                    gamma=self.moco_gamma, normalize=self.normalize, losses=both)
            self._last_weights = weights.tolist()
        self.schedule.update_gaps(losses)
        metrics = self._metrics["train"]
        for o, value in losses.items():
            metrics[f"{o}_loss"].append(value)
        metrics["dpo_trained"].append(float("dpo" in plan["weights"]))
        for out in plan["rewards"]:
            metrics["rewards/chosen"].append(out.chosen_rewards.mean().item())
            metrics["rewards/rejected"].append(out.rejected_rewards.mean().item())
            metrics["rewards/accuracies"].append((out.chosen_rewards > out.rejected_rewards).float().mean().item())
        self._last_objective = "both" if len(plan["weights"]) == 2 else next(iter(plan["weights"]))

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        if self.model.training and self._last_objective is not None and "loss" in logs:
            logs["objective"] = self._last_objective
            if self._last_weights is not None:
                logs["weights"] = self._last_weights
        super().log(logs, start_time)

    # ------------------------------------------------------------------------------ checkpoints

    def _joint_state(self) -> dict:
        state = {"method": self.method, **self.schedule.state_dict(), "sft_position": self._sft_stream.position}
        if self.method == "moco":
            state["moco"] = self._moco_state.state_dict()
        return state

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            torch.save(self._joint_state(), os.path.join(folder, STATE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, STATE_FILE)
        if not os.path.exists(path):
            raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint!r} has no {STATE_FILE} (not saved by a "
                             f"JointDPOTrainer)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("method") != self.method:
            raise ValueError(f"resume_from_checkpoint: saved by method {state.get('method')!r}, this trainer runs "
                             f"{self.method!r}")
        self.schedule.check_state_dict(state, "molkernels_joint_state")
        if self.method == "moco":
            self._moco_state.load_state_dict(state["moco"])
        self.schedule.load_state_dict(state)
        self._sft_stream.position = int(state["sft_position"])


def _check_dpo_config(args) -> None:
    """The DPOConfig options molkernels' losses implement; ValueError naming any other."""
    loss_types = list(args.loss_type) if isinstance(args.loss_type, (list, tuple)) else [args.loss_type]
    if len(loss_types) != 1 or loss_types[0] not in LOSS_TYPES:
        raise ValueError(f"args.loss_type: JointDPOTrainer computes one of {LOSS_TYPES}, got {args.loss_type!r}")
    for option, default in (("label_smoothing", 0.0), ("ld_alpha", None), ("f_divergence_type", "reverse_kl"),
                            ("use_weighting", False), ("loss_weights", None)):
        value = getattr(args, option, default)
        if value != default and not (option == "loss_weights" and value in ([1.0], (1.0,))):
            raise ValueError(f"args.{option}: JointDPOTrainer supports only {default!r}, got {value!r}")


def _ids(tokenizer, text_or_messages, **template) -> List[int]:
    if isinstance(text_or_messages, list):
        out = tokenizer.apply_chat_template(text_or_messages, tokenize=True, return_dict=True, **template)
        return list(out["input_ids"])
    return list(tokenizer(text_or_messages)["input_ids"])


def _tokenize_sft(tokenizer, record, index: int, max_length: Optional[int]):
    """(token ids, completion mask) of one SFT record, tokenised as TRL does: the completion is what
    follows the longest common prefix of the rendered prompt and the rendered prompt + completion (an
    EOS appended to string completions); {"messages"}: every assistant turn, located by rendering the
    conversation up to it. Cut to max_length from the end; ValueError naming the record if malformed
    or if no completion token is left."""
    where = f"sft_dataset: record {index}"
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a dict, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError(f"{where}: 'messages' must be a list of {{'role', 'content'}} dicts")
        ids, mask = chat_labels(lambda m, generation: _ids(tokenizer, m, add_generation_prompt=generation),
                                messages, where)
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) != isinstance(completion, list):
            raise ValueError(f"{where}: prompt and completion must both be strings or both message lists")
        if isinstance(prompt, list):
            prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
            ids = _ids(tokenizer, prompt + completion)
        else:
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise ValueError(f"{where}: prompt and completion must be strings or message lists")
            if not completion.endswith(tokenizer.eos_token):
                completion += tokenizer.eos_token
            prompt_ids, ids = _ids(tokenizer, prompt), _ids(tokenizer, prompt + completion)
        start = common_prefix(prompt_ids, ids)
        mask = [0] * start + [1] * (len(ids) - start)
    else:
        raise ValueError(f"{where}: expected 'prompt' and 'completion', or 'messages'; got keys {sorted(record)}")
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask[1:]):
        raise ValueError(f"{where}: no completion token within max_length={max_length}")
    return ids, mask
