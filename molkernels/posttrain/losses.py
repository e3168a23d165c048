"""Losses of SFT and preference learning for causal LMs, on logits [B, T, V] and labels [B, T].

Labels follow the transformers convention: position t of `labels` is the token at position t of the
input, prompt and padding positions hold `ignore_index`, and the logits at position t predict the
token at t + 1 (the one-token shift happens here). Log-probabilities are computed in float32 (bf16
and fp16 logits are upcast chunk by chunk) as logit − logsumexp(logits), by one autograd function
that never materialises log_softmax or a float32 copy of the logits, forward or backward.

Every argument is checked first, naming it: a label that is neither a token id in [0, V) nor
ignore_index raises ValueError with its position (that check reads the labels on the host: one
synchronisation per call on CUDA, next to the loss's own .item() in a training step).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._checks import check_dense, check_number
from .._stack import accum_dtype

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> None:
    """logits a floating [B, T, V] tensor with V >= 1; labels [B, T] int64/int32 on its device,
    each a token id in [0, V) or ignore_index (one host synchronisation: the range check)."""
    check_dense(logits, "logits")
    if logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"logits: expected a floating [B, T, V] tensor, got {tuple(logits.shape)} {logits.dtype}")
    if logits.shape[2] == 0:
        raise ValueError("logits: the vocabulary dimension V is empty")
    check_dense(labels, "labels")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels: expected shape {tuple(logits.shape[:2])} to match logits [B, T, V], got "
                         f"{tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels: expected an integer tensor of token ids (int64 or int32), got {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"labels: on {labels.device}, logits on {logits.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
    vocab = logits.shape[2]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        b, t = (int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(f"labels: [{b}, {t}] is {int(labels[b, t])}, not a token id in [0, {vocab}) nor "
                         f"ignore_index={ignore_index}")


# Rows of the [B·T, V] logits handled at once: bounds the float32 temporaries at 2^24 elements
# (64 MB) per chunk, whatever the batch, the length and the vocabulary.
CHUNK_ELEMENTS = 1 << 24


class _TargetLogProbs(torch.autograd.Function):
    """log softmax(x_r)[y_r] for every row r of logits viewed as [R, V], computed in float32
    (float64 for float64 logits) chunk by chunk: neither the forward nor the backward materialises a
    float32 (or log_softmax) copy of the logits, and only the [R] log-normalisers are saved (the logits are the model's output, alive
    anyway). Backward: ∂/∂x_r = g_r (onehot(y_r) − softmax(x_r)), written in the logits' dtype."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows = logits.reshape(-1, logits.shape[-1])
        flat_targets = targets.reshape(-1, 1)
        compute = accum_dtype(logits.dtype)
        out = torch.empty(rows.shape[0], dtype=compute, device=logits.device)
        lse = torch.empty_like(out)
        step = max(1, CHUNK_ELEMENTS // rows.shape[1])
        for start in range(0, rows.shape[0], step):
            x = rows[start:start + step].to(compute)
            lse[start:start + step] = torch.logsumexp(x, dim=-1)
            out[start:start + step] = x.gather(-1, flat_targets[start:start + step]).squeeze(-1) - lse[start:start + step]
        ctx.save_for_backward(logits, targets, lse)
        return out.view(targets.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        rows = logits.reshape(-1, logits.shape[-1])
        flat_targets = targets.reshape(-1, 1)
        g = grad_out.reshape(-1, 1).to(lse.dtype)
        grad = torch.empty_like(rows)
        step = max(1, CHUNK_ELEMENTS // rows.shape[1])
        for start in range(0, rows.shape[0], step):
            end = start + step
            chunk = torch.exp(rows[start:end].to(lse.dtype) - lse[start:end, None]).mul_(-g[start:end])
            chunk.scatter_add_(-1, flat_targets[start:end], g[start:end])
            grad[start:end] = chunk
        return grad.view(logits.shape), None


def _token_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    """log p(token_{t+1} | ..t) and the mask of response tokens, both [B, T]; the last position
    predicts nothing and is masked. The shift is applied to the labels, so the (contiguous) logits
    are read in place."""
    targets = torch.full_like(labels, ignore_index)
    targets[:, :-1] = labels[:, 1:]
    mask = targets != ignore_index
    logps = _TargetLogProbs.apply(logits.contiguous(), targets.masked_fill(~mask, 0))
    return logps, mask


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *,
             num_items=None) -> torch.Tensor:
    """Supervised fine-tuning loss: Σ −log p(y_{t+1} | y_{≤t}) over the response tokens of the batch,
    divided by `num_items`: by default the batch's own count of response tokens (a token mean, not
    a mean of per-sequence means). With gradient accumulation pass the count of the whole
    accumulated batch (response_tokens summed over its micro-batches; transformers'
    `num_items_in_batch`), so that the micro-batch losses add up to the token mean of all of them.
    A batch without response tokens gives NaN (the data layer refuses such records). Labels are
    token ids in [0, V) or ignore_index; anything else raises ValueError naming `labels`; a
    num_items that is not a positive count raises ValueError naming it."""
    _check_logits_labels(logits, labels, ignore_index)
    if num_items is not None:
        count = num_items.item() if isinstance(num_items, torch.Tensor) and num_items.numel() == 1 else num_items
        if isinstance(count, bool) or not isinstance(count, numbers.Real) or not count > 0 or not math.isfinite(count):
            raise ValueError(f"num_items: expected a positive count of response tokens, got {num_items!r}")
    logps, mask = _token_logps(logits, labels, ignore_index)
    return -(logps * mask).sum() / (mask.sum() if num_items is None else num_items)


def response_tokens(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The number of tokens sft_loss averages over in a batch (labels other than ignore_index
    after the first position): a 0-d int64 tensor, to sum over micro-batches for num_items."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        raise ValueError(f"labels: expected a [B, T] tensor of token ids, got "
                         f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
    return (labels[:, 1:] != ignore_index).sum()


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Per-sequence log-probability of the response, Σ_t log p(y_{t+1} | y_{≤t}) over response
    tokens: a float32 [B] tensor (float64 for float64 logits). Labels as in sft_loss."""
    _check_logits_labels(logits, labels, ignore_index)
    logps, mask = _token_logps(logits, labels, ignore_index)
    return (logps * mask).sum(-1)


class DPOOutput(NamedTuple):
    """The DPO loss (mean over the batch) and the implicit rewards β(log π − log π_ref) of the
    chosen and rejected responses ([B] each, detached)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float = 0.1,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid",
             completion_lengths=None) -> DPOOutput:
    """Direct preference optimisation (Rafailov et al., 2023) on sequence log-probabilities [B].

    With h = (π_c − π_r) − (ref_c − ref_r), the per-pair losses are
        sigmoid: −(1−ε)·log σ(βh) − ε·log σ(−βh)    (ε = label_smoothing; conservative DPO)
        ipo:     (h − 1/(2β))²                       (Azar et al., 2023, on sequence log-ratios)
        hinge:   max(0, 1 − βh)                      (SLiC)
    and the loss is their mean over the batch. completion_lengths = (chosen, rejected) token counts
    [B] (ipo only): each log-ratio divided by its completion's length first, as TRL's IPO does (TRL
    ≥ 1.16; the paper's form is the default).
    """
    named = {"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
             "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    for name, value in named.items():
        check_dense(value, name)
        if value.dim() != 1 or not value.is_floating_point():
            raise ValueError(f"{name}: expected a floating [B] tensor of sequence log-probabilities, got "
                             f"{tuple(value.shape)} {value.dtype}")
    batch, device = policy_chosen_logps.shape[0], policy_chosen_logps.device
    for name, value in named.items():
        if value.shape[0] != batch:
            raise ValueError(f"{name}: has batch size {value.shape[0]}, policy_chosen_logps has {batch} "
                             f"(chosen and rejected must pair up)")
        if value.device != device:
            raise ValueError(f"{name}: on {value.device}, policy_chosen_logps on {device}")
    if batch == 0:
        raise ValueError("policy_chosen_logps: the batch is empty")
    check_number("beta", beta, 0.0, low_open=True)
    check_number("label_smoothing", label_smoothing, 0.0, 0.5, high_open=True)
    if not isinstance(loss_type, str) or loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing: defined for loss_type='sigmoid' only, got {label_smoothing} with {loss_type!r}")
    if completion_lengths is not None:
        if loss_type != "ipo":
            raise ValueError(f"completion_lengths: length-normalises the ipo loss only, not {loss_type!r}")
        if not isinstance(completion_lengths, (tuple, list)) or len(completion_lengths) != 2:
            raise ValueError("completion_lengths: expected (chosen lengths, rejected lengths), two [B] tensors")
        for side, lengths in zip(("chosen", "rejected"), completion_lengths):
            if not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (batch,) or lengths.device != device:
                raise ValueError(f"completion_lengths: the {side} lengths must be a [{batch}] tensor on {device}")
            if not bool((lengths > 0).all()):
                raise ValueError(f"completion_lengths: the {side} lengths must be positive token counts")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_ratio - rejected_ratio
    if completion_lengths is not None:
        h = chosen_ratio / completion_lengths[0].to(h.dtype) - rejected_ratio / completion_lengths[1].to(h.dtype)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    return DPOOutput(losses.mean(), (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())
