"""Tolerances of every op against the float64 reference, one table per op, keyed by input dtype
(in the style of Liger-Kernel's test tolerances).

All are relative to the scale of the data, never bare absolute numbers:

* Gram and cross-Gram: |G_ij − G*_ij| ≤ tol · ‖a_i‖ ‖b_j‖ (Cauchy–Schwarz bounds |G_ij| and the
  sum of |products| by that). The reference is computed in float64 from the very values the kernel
  reads (fp16/bf16 inputs upcast exactly), so for 16-bit inputs the error is that of the fp32
  accumulation, not of 16-bit rounding.
* combine: |c − c*| ≤ rtol · |c*| + (K + 2) · atol · Σ_k |w_k g_k| elementwise: rtol is the
  rounding of the output to the stack's dtype, atol that of one accumulation step.
* project_simplex: |x − x*| ≤ out + K · acc · (1 + max_i |v_i|) elementwise (rounding of the
  output; τ from K terms in at least the accumulation precision); |Σx − 1| ≤ K · that.
* min_norm: |f(λ) − f(λ*)| ≤ objective · max(f(λ*), floor · max_i G_ii); KKT residuals
  ≤ kkt · max_i G_ii; |Σλ − 1| ≤ simplex_sum. The kernels solve in float64 and round λ to the
  Gram's dtype, which is what the 16-bit entries allow for (rounding λ by u moves f by ≈ 2u·f plus
  u²·max G_ii).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: unit roundoff (half an ulp of 1) of each dtype
UNIT_ROUNDOFF = {
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
    torch.float32: 2.0**-24,
    torch.float64: 2.0**-53,
}


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate in at least (and return Gram matrices in)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def u_out(dtype: torch.dtype) -> float:
    return UNIT_ROUNDOFF[dtype]


def u_acc(dtype: torch.dtype) -> float:
    return UNIT_ROUNDOFF[accum_dtype(dtype)]


# gram / cross_gram: relative to ‖a_i‖ ‖b_j‖.
GRAM = {
    torch.float16: 1e-5,
    torch.bfloat16: 1e-5,
    torch.float32: 1e-5,
    torch.float64: 1e-12,
}
CROSS_GRAM = dict(GRAM)


@dataclass(frozen=True)
class CombineTol:
    rtol: float  # rounding of the output to the stack's dtype
    atol: float  # per accumulated term, relative to Σ_k |w_k g_k|


COMBINE = {
    torch.float16: CombineTol(rtol=2 * u_out(torch.float16), atol=2 * u_acc(torch.float16)),
    torch.bfloat16: CombineTol(rtol=2 * u_out(torch.bfloat16), atol=2 * u_acc(torch.bfloat16)),
    torch.float32: CombineTol(rtol=2 * u_out(torch.float32), atol=2 * u_acc(torch.float32)),
    torch.float64: CombineTol(rtol=2 * u_out(torch.float64), atol=2 * u_acc(torch.float64)),
}


@dataclass(frozen=True)
class SimplexTol:
    out: float  # rounding of x to the input dtype
    acc: float  # per term of τ, relative to 1 + max|v|


PROJECT_SIMPLEX = {dtype: SimplexTol(out=2 * u_out(dtype), acc=4 * u_acc(dtype)) for dtype in DTYPES}


@dataclass(frozen=True)
class MinNormTol:
    objective: float  # relative error of λᵀGλ against the reference optimum
    floor: float  # ... relative to max(f*, floor · max_i G_ii)
    kkt: float  # KKT residuals relative to max_i G_ii
    simplex_sum: float  # |Σλ − 1|


MIN_NORM = {
    torch.float16: MinNormTol(objective=4 * u_out(torch.float16), floor=1e-3, kkt=8 * u_out(torch.float16), simplex_sum=2 * u_out(torch.float16)),
    torch.bfloat16: MinNormTol(objective=4 * u_out(torch.bfloat16), floor=1e-2, kkt=8 * u_out(torch.bfloat16), simplex_sum=2 * u_out(torch.bfloat16)),
    torch.float32: MinNormTol(objective=1e-6, floor=1e-6, kkt=1e-6, simplex_sum=2 * u_out(torch.float32)),
    torch.float64: MinNormTol(objective=1e-6, floor=1e-6, kkt=1e-9, simplex_sum=1e-12),
}
