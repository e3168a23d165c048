"""The core ops: Gram matrices of gradient stacks, the min-norm weights on the simplex, and the
combined direction. Each checks its arguments (naming the bad one) before any kernel runs, then
calls the chosen backend's kernel.

A gradient stack is a [K, *shape] tensor or a list of blocks [K, *shape_j] (one per parameter),
all of one float dtype and on one device; the blocks are never concatenated.

Autograd: gram, cross_gram and combine are differentiable on every backend (their backward
formulas are registered with the custom ops in _ops.py; each input's gradient comes in its own
dtype). min_norm and project_simplex are not: their outputs stay in the graph and backward through
them raises RuntimeError, so that a gradient is never silently missing.
"""

from __future__ import annotations

from typing import List, Union

import torch

from . import _ops
from ._stack import Stack, as_blocks, check_float_tensor, check_same_structure
from .profiling import nvtx_range


def gram(g: Stack, *, backend: str = "auto") -> torch.Tensor:
    """The Gram matrix G Gᵀ of a gradient stack: Σ_blocks B Bᵀ with B = block.reshape(K, -1).

    Returns a symmetric [K, K] tensor in float32 (float64 for float64 input), accumulated in at
    least float32 in one pass over the stack. Differentiable: ∂L/∂B = (Ḡ + Ḡᵀ) B for each block,
    in the block's dtype (bf16 for a bf16 block, although G is float32).
    """
    blocks = as_blocks(g, "g")
    backend = _ops.resolve_backend(backend, blocks[0].device)
    with nvtx_range("gram"):
        return _ops.op("gram", backend)(blocks)


def cross_gram(a: Stack, b: Stack, *, backend: str = "auto") -> torch.Tensor:
    """Σ_blocks A Bᵀ: the [K, K] matrix of inner products <a_i, b_j> of two stacks with the same
    structure (e.g. MoDo's G₁ G₂ᵀ). float32 (float64 for float64 input). Differentiable:
    ∂L/∂A_j = C̄ B_j and ∂L/∂B_j = C̄ᵀ A_j, in the blocks' dtype."""
    a_blocks = as_blocks(a, "a")
    b_blocks = as_blocks(b, "b")
    check_same_structure(a_blocks, b_blocks, "a", "b")
    backend = _ops.resolve_backend(backend, a_blocks[0].device)
    with nvtx_range("cross_gram"):
        return _ops.op("cross_gram", backend)(a_blocks, b_blocks)


def combine(g: Stack, weights: torch.Tensor, *, backend: str = "auto") -> Union[torch.Tensor, List[torch.Tensor]]:
    """The direction Σ_k w_k g_k in g's dtype (accumulated in float32, float64 for float64 data):
    a tensor of shape g.shape[1:] for a tensor stack, a list of per-block tensors for a list.
    Differentiable in both arguments: ∂L/∂g_k = w_k c̄ in g's dtype and ∂L/∂w_k = Σ_j <g_{k,j}, c̄_j>
    in the weights' dtype."""
    blocks = as_blocks(g, "g")
    check_float_tensor(weights, "weights")
    K = blocks[0].shape[0]
    if weights.shape != (K,):
        raise ValueError(f"weights: expected shape ({K},) to match K of g, got {tuple(weights.shape)}")
    if weights.device != blocks[0].device:
        raise ValueError(f"weights: on {weights.device}, g on {blocks[0].device}")
    backend = _ops.resolve_backend(backend, blocks[0].device)
    with nvtx_range("combine"):
        out = _ops.op("combine", backend)(blocks, weights)
    return out[0] if isinstance(g, torch.Tensor) else list(out)


def project_simplex(v: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Euclidean projection of each row of v [..., K] onto the probability simplex
    {x : x ≥ 0, Σ x = 1}: x = max(v − τ, 0) with τ such that Σ x = 1. Rows with a non-finite
    entry come back all NaN. Not differentiable: for v that requires grad the output stays in the
    graph, and backward through it raises RuntimeError (detach v, or call it under no_grad)."""
    check_float_tensor(v, "v")
    if v.dim() < 1 or v.shape[-1] < 1:
        raise ValueError(f"v: expected a [..., K] tensor with K >= 1, got shape {tuple(v.shape)}")
    backend = _ops.resolve_backend(backend, v.device)
    with nvtx_range("project_simplex"):
        return _ops.op("project_simplex", backend)(v)


def min_norm(gram: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """The min-norm weights λ = argmin_{λ ∈ Δ} λᵀ G λ for each [K, K] matrix of gram [..., K, K].

    Σ_k λ_k g_k is then the minimum-norm point of the convex hull of the gradients (MGDA's common
    descent direction). Exact up to rounding (Wolfe's active-set algorithm in float64, a closed
    form for K = 2), for any rank of G; all gradients zero gives the uniform weights; a non-finite
    G gives NaN weights. Runs on the device without host synchronisation.

    Not differentiable: for a gram that requires grad the output stays in the graph, and backward
    through it raises RuntimeError (detach the gram, or call it under torch.no_grad()).
    """
    check_float_tensor(gram, "gram")
    if gram.dim() < 2 or gram.shape[-1] != gram.shape[-2] or gram.shape[-1] < 1:
        raise ValueError(f"gram: expected a square [..., K, K] tensor with K >= 1, got shape {tuple(gram.shape)}")
    backend = _ops.resolve_backend(backend, gram.device)
    with nvtx_range("min_norm"):
        return _ops.op("min_norm", backend)(gram)
