"""The federated learning kernels in Triton (the CPU/CUDA ones are in csrc/core/fl_*): client-stacked
[C, D] Adam and SGD steps in place, and the masked weighted mean. They take the already checked
arguments of molkernels.federated.

The element math follows csrc/core/federated.h (torch.optim's CPU order of operations, with fma
where torch fuses a multiply-add); the kernels are compiled without fp fusion and with IEEE sqrt
and division, so that no other rounding changes. The per-client bias corrections are computed on
the device with torch from the step counts, in float64 as torch.optim computes them, before the
launch. Inactive rows are masked out of every load and store: never read, never written.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._stack import accum_dtype
from ._launch import interpreted, scalar_argument

MEAN_GROUP = 32  # federated.h's kMeanGroup: the clients of one partial sum


def _acc_tl(dtype: torch.dtype):
    return tl.float64 if accum_dtype(dtype) == torch.float64 else tl.float32


def _block(device: torch.device) -> int:
    # The interpreter pays per operation, so it gets long blocks; a GPU gets a register-sized one.
    return 4096 if interpreted(device) else 1024


def _row_programs(D: int, block: int, device: torch.device) -> int:
    """Programs per client row (each loops over its share of the row's blocks)."""
    if interpreted(device):
        return 1
    return min(triton.cdiv(D, block), 65535)


@triton.jit
def _sqrt(x, IS_FP64: tl.constexpr):
    # float32 sqrt and division are approximate by default on a GPU; float64 ones are IEEE.
    # if/else, not an early return: the compiler (unlike the interpreter) also generates the
    # statements after a constexpr branch's return, and sqrt_rn/div_rn take float32 only.
    if IS_FP64:
        result = tl.sqrt(x)
    else:
        result = tl.sqrt_rn(x)
    return result


@triton.jit
def _div(a, b, IS_FP64: tl.constexpr):
    if IS_FP64:
        result = a / b
    else:
        result = tl.div_rn(a, b)
    return result


@triton.jit
def _adam_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, active_ptr, neg_step_size_ptr, bc2_sqrt_ptr, D, span,
    wd_ptr, lerp_weight_ptr, beta2_ptr, one_minus_beta2_ptr, eps_ptr,
    HAS_WD: tl.constexpr, LERP_FROM_START: tl.constexpr, ACC: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    active = tl.load(active_ptr + c) != 0
    neg_step_size = tl.load(neg_step_size_ptr + c)
    bc2_sqrt = tl.load(bc2_sqrt_ptr + c)
    wd = tl.load(wd_ptr)
    lerp_weight = tl.load(lerp_weight_ptr)
    beta2 = tl.load(beta2_ptr)
    one_minus_beta2 = tl.load(one_minus_beta2_ptr)
    eps = tl.load(eps_ptr)
    start = tl.program_id(1).to(tl.int64) * span
    for offset in range(0, span, BLOCK):
        col = start + offset + tl.arange(0, BLOCK)
        mask = (col < D) & active
        at = c * D + col
        p = tl.load(p_ptr + at, mask=mask).to(ACC)
        g = tl.load(g_ptr + at, mask=mask).to(ACC)
        m = tl.load(m_ptr + at, mask=mask)
        v = tl.load(v_ptr + at, mask=mask)
        if HAS_WD:
            g = tl.fma(p, wd, g)
        if LERP_FROM_START:
            m = tl.fma(lerp_weight, g - m, m)
        else:
            m = tl.fma(lerp_weight - 1, g - m, g)
        v = tl.fma(one_minus_beta2 * g, g, v * beta2)
        denom = _div(_sqrt(v, IS_FP64), bc2_sqrt, IS_FP64) + eps
        p = p + _div(neg_step_size * m, denom, IS_FP64)
        tl.store(p_ptr + at, p.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + at, m, mask=mask)
        tl.store(v_ptr + at, v, mask=mask)


def fl_adam_step(params: torch.Tensor, grads: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 step: torch.Tensor, active: torch.Tensor, lr: float, beta1: float, beta2: float, eps: float,
                 weight_decay: float) -> None:
    C = params.shape[0]
    D = params.numel() // C
    acc = accum_dtype(params.dtype)
    # Bias corrections at each client's next step, in float64 as torch.optim computes them.
    t = (step + 1).to(torch.float64)
    neg_step_size = (-(lr / (1.0 - torch.pow(beta1, t)))).to(acc)
    bc2_sqrt = (1.0 - torch.pow(beta2, t)).sqrt().to(acc)
    lerp_weight = float(torch.tensor(1.0 - beta1, dtype=acc))
    block = _block(params.device)
    programs = _row_programs(D, block, params.device)
    span = triton.cdiv(triton.cdiv(D, block), programs) * block
    if D > 0:
        _adam_kernel[(C, programs)](
            params, grads, exp_avg, exp_avg_sq, active, neg_step_size, bc2_sqrt, D, span,
            scalar_argument(weight_decay, params), scalar_argument(1.0 - beta1, params), scalar_argument(beta2, params),
            scalar_argument(1.0 - beta2, params), scalar_argument(eps, params),
            HAS_WD=weight_decay != 0, LERP_FROM_START=abs(lerp_weight) < 0.5, ACC=_acc_tl(params.dtype),
            IS_FP64=acc == torch.float64, BLOCK=block,
            enable_fp_fusion=False,
        )
    step.add_(active)


@triton.jit
def _sgd_kernel(
    p_ptr, g_ptr, buf_ptr, active_ptr, D, span, wd_ptr, momentum_ptr, neg_lr_ptr,
    HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    active = tl.load(active_ptr + c) != 0
    wd = tl.load(wd_ptr)
    momentum = tl.load(momentum_ptr)
    neg_lr = tl.load(neg_lr_ptr)
    start = tl.program_id(1).to(tl.int64) * span
    for offset in range(0, span, BLOCK):
        col = start + offset + tl.arange(0, BLOCK)
        mask = (col < D) & active
        at = c * D + col
        p = tl.load(p_ptr + at, mask=mask).to(ACC)
        g = tl.load(g_ptr + at, mask=mask).to(ACC)
        if HAS_WD:
            g = tl.fma(p, wd, g)
        if HAS_MOMENTUM:
            g = tl.load(buf_ptr + at, mask=mask) * momentum + g
            tl.store(buf_ptr + at, g, mask=mask)
        p = tl.fma(g, neg_lr, p)
        tl.store(p_ptr + at, p.to(p_ptr.dtype.element_ty), mask=mask)


def fl_sgd_step(params: torch.Tensor, grads: torch.Tensor, momentum_buffer: Optional[torch.Tensor],
                active: torch.Tensor, lr: float, momentum: float, weight_decay: float) -> None:
    C = params.shape[0]
    D = params.numel() // C
    if D == 0:
        return
    block = _block(params.device)
    programs = _row_programs(D, block, params.device)
    span = triton.cdiv(triton.cdiv(D, block), programs) * block
    has_momentum = momentum != 0
    _sgd_kernel[(C, programs)](
        params, grads, momentum_buffer if has_momentum else params, active, D, span,
        scalar_argument(weight_decay, params), scalar_argument(momentum, params), scalar_argument(-lr, params),
        HAS_WD=weight_decay != 0, HAS_MOMENTUM=has_momentum, ACC=_acc_tl(params.dtype), BLOCK=block,
        enable_fp_fusion=False,
    )


@triton.jit
def _total_weight_kernel(w_ptr, active_ptr, total_ptr, C, GROUP: tl.constexpr, ACC: tl.constexpr):
    """*total = the active weights in federated.h's order: each group's share summed in client
    order, the shares in group order (one program; each step issues a group's loads together)."""
    total = tl.zeros((), dtype=ACC)
    client0 = tl.zeros((), dtype=tl.int64)
    for first in range(0, C, GROUP):
        share = tl.zeros((), dtype=ACC)
        for i in tl.static_range(GROUP):
            c = client0 + first + i
            active = (tl.load(active_ptr + c, mask=c < C, other=0) != 0) & (c < C)
            share = tl.where(active, share + tl.load(w_ptr + c, mask=active, other=0.0), share)
        total += share
    tl.store(total_ptr, total)


@triton.jit
def _mean_partials_kernel(
    x_ptr, w_ptr, active_ptr, partial_ptr, C, D, GROUP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (column block, group): the weighted sum of the group's GROUP clients over its
    columns, into partials[group]. The clients' loads are unrolled, so they are in flight together."""
    col = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    group = tl.program_id(1).to(tl.int64)
    in_row = col < D
    partial = tl.zeros((BLOCK,), dtype=ACC)
    for i in tl.static_range(GROUP):
        c = group * GROUP + i  # int64: c * D may pass 2^31
        active = (tl.load(active_ptr + c, mask=c < C, other=0) != 0) & (c < C)
        w = tl.load(w_ptr + c, mask=active, other=0.0)
        x = tl.load(x_ptr + c * D + col, mask=in_row & active, other=0.0).to(ACC)
        # where, not a zero term: an inactive client leaves a -0 partial as it is.
        partial = tl.where(active, tl.fma(w, x, partial), partial)
    tl.store(partial_ptr + group * D + col, partial, mask=in_row)


@triton.jit
def _mean_finish_kernel(partial_ptr, total_ptr, out_ptr, groups, D, ACC: tl.constexpr, IS_FP64: tl.constexpr,
                        BLOCK: tl.constexpr):
    """out = (Σ_groups partials, in group order) / total, or NaN where no weight is active."""
    col = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_row = col < D
    group_sums = tl.zeros((BLOCK,), dtype=ACC)
    at = partial_ptr + col
    for _ in range(groups):
        group_sums += tl.load(at, mask=in_row, other=0.0)
        at += D
    total = tl.load(total_ptr)
    nan = tl.full((BLOCK,), float("nan"), dtype=ACC)
    mean = tl.where(total != 0, _div(group_sums, tl.where(total != 0, total, 1.0), IS_FP64), nan)
    tl.store(out_ptr + col, mean.to(out_ptr.dtype.element_ty), mask=in_row)


def fl_weighted_mean(x: torch.Tensor, weights: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Three launches, as the CUDA kernels: the total weight (one program), the group partial sums
    on a (column block, group) grid, and their sum in group order with the division."""
    C = x.shape[0]
    D = x.numel() // C
    out = torch.empty(x.shape[1:], dtype=x.dtype, device=x.device)
    if D == 0:
        return out
    block = 1024 if interpreted(x.device) else 256
    acc, groups = _acc_tl(x.dtype), triton.cdiv(C, MEAN_GROUP)
    workspace = torch.empty(groups * D + 1, dtype=accum_dtype(x.dtype), device=x.device)
    partials, total = workspace[:groups * D], workspace[groups * D:]
    _total_weight_kernel[(1,)](weights, active, total, C, GROUP=MEAN_GROUP, ACC=acc, enable_fp_fusion=False)
    _mean_partials_kernel[(triton.cdiv(D, block), groups)](
        x, weights, active, partials, C, D, GROUP=MEAN_GROUP, ACC=acc, BLOCK=block, enable_fp_fusion=False,
    )
    _mean_finish_kernel[(triton.cdiv(D, block),)](
        partials, total, out, groups, D, ACC=acc, IS_FP64=x.dtype == torch.float64, BLOCK=block,
        enable_fp_fusion=False,
    )
    return out
