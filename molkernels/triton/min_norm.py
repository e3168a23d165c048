"""The min-norm weights λ = argmin_{λ ∈ simplex} λᵀ G λ of each [K, K] matrix of gram [..., K, K].

One program per matrix, in float64 on a [BLOCK_K, BLOCK_K] register tile, the same decisions as
csrc/core/min_norm.h: a non-finite G gives NaN, K = 1 gives 1, an all-zero G the uniform weights,
K = 2 a closed form, and K >= 3 Wolfe's minimum-norm-point algorithm in barycentric coordinates on
G normalised by its largest diagonal entry.

Wolfe's algorithm keeps a corral S of affinely independent gradients (here a mask over the K
indices) and the current point x = Σ_k λ_k g_k, with (Gλ)_i = <x, g_i>:
- major cycle: the gradient i minimising <x, g_i> enters S unless the Frank-Wolfe gap
  f − min_i <x, g_i> (f = λᵀGλ = |x|²), which bounds (f − f*)/2, is within tolerance;
- minor cycle: α = argmin αᵀ G_SS α subject to Σ α = 1. When α > 0 it is the new λ; otherwise λ
  steps towards α as far as the simplex allows and the members that reach zero leave S.
The affine minimiser solves the bordered system [[G_SS, 1], [1ᵀ, 0]]; eliminating the border gives
A_SS a = 1 with A = G + 11ᵀ, and α = a / Σa (on the simplex αᵀ11ᵀα = 1 is constant, so the shift
leaves the minimiser unchanged). A_SS is positive definite exactly when S is affinely independent.

Rather than solving A_SS a = 1 afresh in every minor cycle, the kernel keeps T, the tile A swept on
the indices of S (the sweep operator, i.e. Gauss-Jordan elimination of A on those pivots, in
place): then T_SS = −A_SS⁻¹, so a = −T_SS 1, and for i outside S, T_ii is the Schur complement
A_ii − A_iS A_SS⁻¹ A_Si, the pivot i would bring. A gradient enters S by one sweep on its index and
leaves by undoing that sweep: O(K²) per change instead of O(|S| K²) per solve. A pivot that is not
positive means the newcomer is affinely dependent on S, as a vanishing pivot of the bordered
system does in csrc/core/min_norm.h: the search keeps its current point and ends. Undoing sweeps
can let rounding drift, so each minor cycle checks the residual of A_SS a = 1 and, when it is not
at rounding level, sweeps S afresh from A.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Wolfe's stopping rule, as in csrc/core/min_norm.h: the gap f − min_i <x, g_i> within
# GAP_REL_TOL · f + GAP_ABS_TOL (G normalised, so max_i |g_i|² = 1).
GAP_REL_TOL = tl.constexpr(1e-10)
GAP_ABS_TOL = tl.constexpr(1e-13)
# Barycentric coordinates at or below this count as zero.
ZERO_WEIGHT = tl.constexpr(1e-14)
# A pivot of A = G + 11ᵀ at or below this is not positive: the corral would be affinely dependent.
PIVOT_TOL = tl.constexpr(1e-300)
# |1 − A_SS a| above this times Σ|a| (entries of A are at most 2) is beyond the rounding of a fresh
# elimination: the swept tile has drifted.
RESIDUAL_TOL = tl.constexpr(1e-12)
# K = 2: |g0 − g1|² at or below this (relative to max |g_i|²) counts as g0 = g1.
COLLINEAR_TOL = tl.constexpr(1e-15)


@triton.jit
def _sweep(T, k, idx, SIGN: tl.constexpr):
    """The symmetric tile T swept on index k (SIGN = 1.0), or with its sweep on k undone
    (SIGN = -1.0): sweeping A on every index of S, in any order, turns A_SS into −A_SS⁻¹."""
    at_k = idx == k
    col = tl.sum(tl.where(at_k[None, :], T, 0.0), axis=1)
    pivot = tl.sum(tl.where(at_k, col, 0.0), axis=0)
    scaled = col / pivot
    T = T - col[:, None] * scaled[None, :]
    T = tl.where(at_k[:, None], scaled[None, :] * SIGN, T)
    T = tl.where(at_k[None, :], scaled[:, None] * SIGN, T)
    return tl.where(at_k[:, None] & at_k[None, :], -1.0 / pivot, T)


@triton.jit
def _wolfe(G, diag, valid, idx, K, BLOCK_K: tl.constexpr, SUM_AXIS: tl.constexpr):
    """λ minimising λᵀGλ on the simplex, for G normalised to max diagonal 1 and K >= 3. Products
    of the symmetric tiles with vectors sum over the tile axis SUM_AXIS (see min_norm)."""
    start = tl.argmin(tl.where(valid, diag, float("inf")), axis=0)  # the shortest gradient
    lam = tl.where(idx == start, 1.0, 0.0).to(tl.float64)
    in_corral = idx == start
    T = _sweep(G + 1.0, start, idx, 1.0)  # A = G + 11ᵀ, not kept: its pivot G_ss + 1 >= 1
    previous_lam = lam
    previous_f = tl.full((), 2.0, dtype=tl.float64)  # above any f, since f <= max_i G_ii = 1
    major = 0
    running = tl.full((), 1, dtype=tl.int1)
    # Wolfe's algorithm is finite; the bound on major cycles only guards against rounding.
    while running & (major < 8 * K + 16):
        g_lam = tl.sum(G * tl.expand_dims(lam, 1 - SUM_AXIS), axis=SUM_AXIS)
        f = tl.sum(lam * g_lam, axis=0)
        scores = tl.where(valid, g_lam, float("inf"))
        entering = tl.argmin(scores, axis=0)
        gap = f - tl.min(scores, axis=0)
        improved = f < previous_f
        # A minor cycle that rounding made worse is undone.
        lam = tl.where(improved, lam, previous_lam)
        newcomer = idx == entering
        stop = (
            (gap <= f * GAP_REL_TOL + GAP_ABS_TOL)
            | ~improved
            | (tl.max((in_corral & newcomer).to(tl.int32), axis=0) > 0)  # only rounding gets here
            | (tl.sum(in_corral.to(tl.int32), axis=0) == K)
        )
        independent = tl.sum(tl.where(newcomer[:, None] & newcomer[None, :], T, 0.0)) > PIVOT_TOL
        if ~stop & independent:
            previous_f = f
            previous_lam = lam
            T = _sweep(T, entering, idx, 1.0)
            in_corral = in_corral | newcomer
            minor = 0
            cycling = tl.full((), 1, dtype=tl.int1)
            while cycling & (minor < K):
                within = in_corral[:, None] & in_corral[None, :]
                a = -tl.sum(tl.where(within, T, 0.0), axis=SUM_AXIS)
                A_a = tl.sum(tl.where(within, G + 1.0, 0.0) * tl.expand_dims(a, 1 - SUM_AXIS), axis=SUM_AXIS)
                residual = tl.where(in_corral, 1.0 - A_a, 0.0)
                solved = tl.full((), 1, dtype=tl.int1)
                if tl.max(tl.abs(residual), axis=0) > tl.sum(tl.abs(a), axis=0) * RESIDUAL_TOL:
                    T = G + 1.0
                    for c in range(BLOCK_K):
                        at_c = idx == c
                        if tl.max((at_c & in_corral).to(tl.int32), axis=0) > 0:
                            solved = solved & (tl.sum(tl.where(at_c[:, None] & at_c[None, :], T, 0.0)) > PIVOT_TOL)
                            T = _sweep(T, c, idx, 1.0)
                    a = -tl.sum(tl.where(within, T, 0.0), axis=SUM_AXIS)
                alpha = tl.where(in_corral, a / tl.sum(tl.where(in_corral, a, 0.0), axis=0), 0.0)
                leaving = in_corral & (alpha <= ZERO_WEIGHT)
                interior = tl.max(leaving.to(tl.int32), axis=0) == 0
                # The largest step from λ towards α that stays in the simplex.
                blocking = leaving & (lam - alpha > 0.0)
                theta = tl.minimum(tl.min(tl.where(blocking, lam / tl.where(blocking, lam - alpha, 1.0), 1.0), axis=0), 1.0)
                stepped = tl.where(in_corral, (1.0 - theta) * lam + theta * alpha, 0.0)
                # Members at zero leave, at least the one that limited the step.
                weakest = tl.argmin(tl.where(in_corral, stepped, float("inf")), axis=0)
                kept = in_corral & (stepped > ZERO_WEIGHT) & (idx != weakest)
                # A dependent corral keeps the current (feasible) point and ends the search.
                lam = tl.where(solved, tl.where(interior, alpha, tl.where(kept, stepped, 0.0)), lam)
                dropped = in_corral & ~kept & solved & ~interior
                while tl.max(dropped.to(tl.int32), axis=0) > 0:
                    gone = tl.argmax(dropped.to(tl.int32), axis=0)
                    T = _sweep(T, gone, idx, -1.0)
                    dropped = dropped & (idx != gone)
                in_corral = tl.where(solved & ~interior, kept, in_corral)
                running = running & solved
                cycling = solved & ~interior
                minor += 1
        running = running & ~stop & independent
        major += 1
    lam = tl.maximum(lam, 0.0)
    return lam / tl.sum(lam, axis=0)


@triton.jit
def _min_norm_kernel(
    gram_ptr, lam_ptr, K, batch_stride, row_stride, col_stride, BLOCK_K: tl.constexpr, SUM_AXIS: tl.constexpr,
):
    matrix = tl.program_id(0).to(tl.int64)
    idx = tl.arange(0, BLOCK_K)
    valid = idx < K
    in_tile = valid[:, None] & valid[None, :]
    start = gram_ptr + matrix * batch_stride
    G = tl.load(start + idx[:, None] * row_stride + idx[None, :] * col_stride, mask=in_tile, other=0.0).to(tl.float64)
    G_t = tl.load(start + idx[:, None] * col_stride + idx[None, :] * row_stride, mask=in_tile, other=0.0).to(tl.float64)
    finite = tl.max(((G - G) != 0.0).to(tl.int32)) == 0  # NaN and ±Inf give x − x = NaN
    G = tl.where(finite, G, 0.0)
    G_t = tl.where(finite, G_t, 0.0)
    eye = idx[:, None] == idx[None, :]
    scale = tl.maximum(tl.max(tl.sum(tl.where(eye, G, 0.0), axis=1), axis=0), 0.0)
    has_length = scale > 0.0  # else every gradient is zero and every λ is optimal
    # Each half is scaled before they are added: G_ij + G_ji overflows for entries near the largest
    # double, while |G_ij| <= max_i G_ii for a Gram matrix.
    divisor = tl.where(has_length, scale, 1.0)
    G = 0.5 * (G / divisor) + 0.5 * (G_t / divisor)
    diag = tl.sum(tl.where(eye, G, 0.0), axis=SUM_AXIS)

    # K = 2: min over t in [0, 1] of |t g0 + (1 − t) g1|².
    g00 = tl.sum(tl.where(idx == 0, diag, 0.0), axis=0)
    g11 = tl.sum(tl.where(idx == 1, diag, 0.0), axis=0)
    g01 = tl.sum(tl.where((idx[:, None] == 0) & (idx[None, :] == 1), G, 0.0))
    curvature = g00 - 2.0 * g01 + g11
    t = tl.where(curvature > COLLINEAR_TOL, (g11 - g01) / tl.where(curvature > COLLINEAR_TOL, curvature, 1.0), 0.5)
    t = tl.minimum(tl.maximum(t, 0.0), 1.0)
    pair = tl.where(idx == 0, t, 1.0 - t)

    if finite & has_length & (K >= 3):
        lam = _wolfe(G, diag, valid, idx, K, BLOCK_K, SUM_AXIS)
    else:
        lam = tl.where(K == 2, pair, tl.full((), 1.0, dtype=tl.float64) / K)
    lam = tl.where(finite, lam, float("nan"))
    if lam_ptr.dtype.element_ty != tl.float64:
        lam = lam.to(tl.float32)  # the interpreter cannot cast float64 to bfloat16 directly
    tl.store(lam_ptr + matrix * K + idx, lam.to(lam_ptr.dtype.element_ty), mask=valid)


# The vectors (λ, Gλ, a, ...) take the layout of the tile axis they are summed over (G is exactly
# symmetric, the swept T up to rounding, so either axis gives λ). Which one sm_90 keeps in the
# registers of an 8-warp 64 x 64 tile depends on the Triton version (benchmarks/gpu_preflight.py):
# triton 3.8 fits 248 registers summing down columns (axis 0) and spills 548 bytes per thread along
# rows; triton 3.6, the GPU machine's, fits 238 along rows and spills 616 bytes down columns.
# Versions before 3.8 take 3.6's choice. Tiles up to 32 keep axis 1 on both.
LARGE_TILE_SUM_AXIS = 0 if tuple(int(part) for part in triton.__version__.split(".")[:2]) >= (3, 8) else 1


def min_norm(gram: torch.Tensor) -> torch.Tensor:
    """λ [..., K] on the simplex minimising λᵀ G λ for each G of gram [..., K, K], in gram's dtype."""
    K = gram.shape[-1]
    matrices = gram.reshape(-1, K, K)
    lam = torch.empty(gram.shape[:-1], dtype=gram.dtype, device=gram.device)
    if matrices.shape[0] > 0:
        block_k = max(triton.next_power_of_2(K), 2)
        num_warps = 1 if block_k <= 16 else (4 if block_k <= 32 else 8)
        sum_axis = LARGE_TILE_SUM_AXIS if block_k > 32 else 1
        _min_norm_kernel[(matrices.shape[0],)](
            matrices, lam, K, matrices.stride(0), matrices.stride(1), matrices.stride(2),
            BLOCK_K=block_k, SUM_AXIS=sum_axis, num_warps=num_warps,
        )
    return lam
