"""Stage 2 of `make gpu-check`: every op on the kernel backends against molkernels.reference, with
the test suite's tolerance tables and checks (python_tests/tolerances.py, stacks.py and the test
modules' helpers, loaded by path), in one process instead of the ~2,400-test suite.

Each case is isolated: an exception is recorded and the next case runs. A sticky CUDA error (an
illegal address poisons the context) ends the script with exit code 4 and what it has; the shell
then reruns it with --resume, which skips the cases already recorded. Every finished case is a line
of $BENCH_OUT/correct.json (JSON lines: case, status, max relative error and its tolerance, ms);
the log on stdout names each failure.

Groups: gram and cross_gram (bitwise symmetric, two-call deterministic, exact on small integers),
combine, odd layouts, project_simplex, min_norm (KKT on degenerate Grams, the float64 reference
for small K), the three steps against the float64 formulas, CUDA-graph capture and replay, host
synchronisation (set_sync_debug_mode("error") around every call) and side streams, the FL
kernels, and one K·d > 2^31 case.

Exit code: 0 all passed (or known defects), 3 some failed, 4 stopped by a sticky CUDA error,
5 stopped by the stage deadline.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, List, Optional

import common
from common import DEVICE, DRY, Sizes, stacks, tol
from records import JsonLines, read_json_lines

import pytest  # noqa: E402  (the test helpers raise pytest.skip)
import torch  # noqa: E402

import molkernels as mk  # noqa: E402
from molkernels import reference  # noqa: E402
from molkernels.federated import batched_adam_step, batched_sgd_step, masked_weighted_mean  # noqa: E402

test_steps = common.load_module("test_steps", "python_tests/test_steps.py")
test_min_norm = common.load_module("test_min_norm", "python_tests/test_min_norm.py")
test_fl = common.load_module("test_kernels", "python_tests/federated/test_kernels.py")

DTYPES = tol.DTYPES
STEP_DTYPES = tuple(test_steps.PARAM_TOL)  # the dtypes test_steps has tolerances for
STEPS = 3  # steps per stateful case (the decayed rates change at every one)
TINY = 1e-300


@dataclass
class Check:
    name: str
    ok: bool
    err: Optional[float] = None  # the largest error, relative to the data's scale
    tol: Optional[float] = None  # the tolerance on that scale
    detail: str = ""


@dataclass
class Case:
    """prepare() makes the inputs (outside any timing or host-sync check), call(inputs) runs the
    ops under test (timed, and under set_sync_debug_mode("error") when sync_free), and
    check(inputs, outputs) compares, returning Checks."""

    id: str
    group: str
    backend: str
    prepare: Callable[[], object]
    call: Callable[[object], object]
    check: Callable[[object, object], List[Check]]
    fields: dict = field(default_factory=dict)
    sync_free: bool = True
    warm: bool = True  # the build stage's Triton warm-up runs it (prepare and call only)
    probe: Optional[str] = None  # runs only if this build-stage probe finished ("ok ...")


def helper_check(name: str, helper: Callable, *args, err=None, tolerance=None, **kwargs) -> Check:
    """A check of the test suite's (it asserts) as a Check."""
    try:
        helper(*args, **kwargs)
        return Check(name, True, err, tolerance)
    except AssertionError as error:
        return Check(name, False, err, tolerance, common.first_line(error))


def cpu64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().cpu().to(torch.float64)


def wanted(backend: str, dtype: torch.dtype) -> bool:
    """Triton under the interpreter (the dry run) is slow: float32 only there."""
    return not common.interpreted(backend) or dtype == torch.float32


def spec(backend: str) -> "stacks.BackendSpec":
    return stacks.BackendSpec(backend, DEVICE.type)


# --------------------------------------------------------------------------------------------------
# Inputs

#: views into one [K, 1 + Σw] buffer starting at columns 1, 4, 21, 22, 4121: every base misaligned
ODD_VIEW_WIDTHS = (3, 17, 1, 4099, 5)
LAYOUTS = ("odd_views", "tiny100", "noncontiguous", "with_empty", "only_empty", "flat_mixed")


def fill_for(kind: str):
    return stacks.randint if kind == "int" else stacks.randn


def make_stack(layout: str, K: int, d: int, dtype, fill):
    """A gradient stack on DEVICE: one [K, d] tensor, or one of the odd layouts."""
    kw = dict(dtype=dtype, device=DEVICE)
    if layout == "tensor":
        return fill(K, d, **kw)
    if layout == "odd_views":
        buffer = fill(K, 1 + sum(ODD_VIEW_WIDTHS), **kw)
        views, offset = [], 1
        for width in ODD_VIEW_WIDTHS:
            views.append(buffer[:, offset:offset + width])
            offset += width
        return views
    if layout == "tiny100":
        return [fill(K, 1 + j % 7, **kw) for j in range(100)]
    if layout == "noncontiguous":
        return stacks.make_stack("noncontiguous", K, dtype, DEVICE, fill=fill)
    if layout == "with_empty":
        return [fill(K, 17, **kw), fill(K, 0, **kw), fill(K, 3, 5, **kw)]
    if layout == "only_empty":
        return [fill(K, 0, **kw)]
    if layout == "flat_mixed":
        return stacks.make_stack("mixed", K, dtype, DEVICE, fill=fill)
    raise ValueError(layout)


# --------------------------------------------------------------------------------------------------
# Errors relative to the scale the tolerance tables use (the verdicts come from the test helpers)


def products_error(out, a, b) -> float:
    """max |G_ij − G*_ij| / (‖a_i‖ ‖b_j‖)."""
    a_cpu = [x.cpu() for x in stacks.as_list(a)]
    b_cpu = a_cpu if b is None else [x.cpu() for x in stacks.as_list(b)]
    expected = reference.cross_gram(a_cpu, b_cpu)
    scale = stacks.row_norms(a_cpu)[:, None] * stacks.row_norms(b_cpu)[None, :]
    return float(((cpu64(out) - expected).abs() / scale.clamp(min=TINY)).max())


def combine_error(out, g, weights) -> float:
    """max |c − c*| / Σ_k |w_k g_k| elementwise."""
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    w64 = cpu64(weights)
    worst = 0.0
    for o, block in zip(outs, stacks.as_list(g)):
        if block.numel() == 0:
            continue
        b64 = cpu64(block)
        expected = torch.tensordot(w64, b64, dims=1)
        magnitude = torch.tensordot(w64.abs(), b64.abs(), dims=1)
        worst = max(worst, float(((cpu64(o) - expected).abs() / magnitude.clamp(min=TINY)).max()))
    return worst


def combine_tolerance(dtype, K) -> float:
    t = tol.COMBINE[dtype]
    return t.rtol + (K + 2) * t.atol


def bitwise_equal(first, second) -> bool:
    firsts = [first] if isinstance(first, torch.Tensor) else list(first)
    seconds = [second] if isinstance(second, torch.Tensor) else list(second)
    return len(firsts) == len(seconds) and all(torch.equal(a, b) for a, b in zip(firsts, seconds))


# --------------------------------------------------------------------------------------------------
# gram and cross_gram


def case_id(op, backend, dtype, K, d, layout, fill_kind) -> str:
    shape = f"d={d}" if layout == "tensor" else layout  # a layout fixes its own columns
    return f"{op}/{backend}/{common.dtype_name(dtype)}/K={K}/{shape}" + ("/int" if fill_kind == "int" else "")


def products_case(op, backend, dtype, K, d, layout="tensor", fill_kind="randn") -> Case:
    fill = fill_for(fill_kind)

    def prepare():
        a = make_stack(layout, K, d, dtype, fill)
        b = make_stack(layout, K, d, dtype, fill) if op == "cross_gram" else None
        return a, b

    def call(inputs):
        a, b = inputs
        if b is None:
            return mk.gram(a, backend=backend), mk.gram(a, backend=backend)
        return mk.cross_gram(a, b, backend=backend), mk.cross_gram(a, b, backend=backend)

    def check(inputs, out):
        a, b = inputs
        first, second = out
        table = tol.GRAM if b is None else tol.CROSS_GRAM
        checks = [helper_check("reference", stacks.check_products, first, a, b, table,
                               err=products_error(first, a, b), tolerance=table[dtype])]
        if b is None:
            checks.append(Check("symmetric_bitwise", torch.equal(first, first.T)))
        checks.append(Check("deterministic", torch.equal(first, second)))
        if fill_kind == "int":
            a_cpu = [x.cpu() for x in stacks.as_list(a)]
            exact = reference.cross_gram(a_cpu, a_cpu if b is None else [x.cpu() for x in stacks.as_list(b)])
            checks.append(Check("exact_on_integers", torch.equal(cpu64(first), exact)))
        return checks

    return Case(case_id(op, backend, dtype, K, d, layout, fill_kind), op if layout == "tensor" else "layouts",
                backend, prepare, call, check, fields=dict(op=op, dtype=common.dtype_name(dtype), K=K,
                                                           d=d if layout == "tensor" else None, layout=layout))


def combine_case(backend, dtype, K, d, layout="tensor", fill_kind="randn") -> Case:
    fill = fill_for(fill_kind)
    accum = tol.accum_dtype(dtype)

    def prepare():
        g = make_stack(layout, K, d, dtype, fill)
        weights = (stacks.randint(K, low=-1, high=2, dtype=accum, device=DEVICE) if fill_kind == "int"
                   else stacks.randn(K, dtype=accum, device=DEVICE))
        return g, weights

    def call(inputs):
        g, weights = inputs
        return mk.combine(g, weights, backend=backend), mk.combine(g, weights, backend=backend)

    def check(inputs, out):
        g, weights = inputs
        first, second = out
        checks = [helper_check("reference", stacks.check_combine, first, g, weights,
                               err=combine_error(first, g, weights), tolerance=combine_tolerance(dtype, K)),
                  Check("deterministic", bitwise_equal(first, second))]
        if fill_kind == "int":
            blocks = [g] if isinstance(g, torch.Tensor) else list(g)
            expected = reference.combine([b.cpu() for b in blocks], weights.cpu())
            outs = [first] if isinstance(first, torch.Tensor) else list(first)
            checks.append(Check("exact_on_integers", all(torch.equal(cpu64(o), e) for o, e in zip(outs, expected))))
        return checks

    return Case(case_id("combine", backend, dtype, K, d, layout, fill_kind), "combine" if layout == "tensor" else "layouts",
                backend, prepare, call, check, fields=dict(op="combine", dtype=common.dtype_name(dtype), K=K,
                                                           d=d if layout == "tensor" else None, layout=layout))


def size_matrix_cases(backends) -> List[Case]:
    cases = []
    for op in ("gram", "cross_gram", "combine"):
        for backend in backends:
            for dtype in DTYPES:
                if not wanted(backend, dtype):
                    continue
                for K in Sizes.KS:
                    for d in Sizes.DS:
                        cases.append(combine_case(backend, dtype, K, d) if op == "combine"
                                     else products_case(op, backend, dtype, K, d))
                    # small integers: products and sums exact in the accumulation dtype
                    d_int = Sizes.DS[-1]
                    cases.append(combine_case(backend, dtype, K, d_int, fill_kind="int") if op == "combine"
                                 else products_case(op, backend, dtype, K, d_int, fill_kind="int"))
    return cases


def layout_cases(backends) -> List[Case]:
    cases = []
    for backend in backends:
        for layout in LAYOUTS:
            if common.interpreted(backend) and layout == "tiny100":
                continue  # 100 interpreted launches per op: seconds each
            for K in Sizes.LAYOUT_KS:
                for dtype in DTYPES:
                    if not wanted(backend, dtype):
                        continue
                    cases.append(products_case("gram", backend, dtype, K, None, layout))
                    cases.append(products_case("cross_gram", backend, dtype, K, None, layout))
                    cases.append(combine_case(backend, dtype, K, None, layout))
    return cases


# --------------------------------------------------------------------------------------------------
# project_simplex and min_norm


def simplex_case(backend, dtype, K, rows) -> Case:
    def prepare():
        return stacks.randn(rows, K, dtype=dtype, device=DEVICE)

    def call(v):
        return mk.project_simplex(v, backend=backend), mk.project_simplex(v, backend=backend)

    def check(v, out):
        first, second = out
        t = tol.PROJECT_SIMPLEX[dtype]
        v64 = cpu64(v)
        scale = 1.0 + v64.abs().amax(-1, keepdim=True)
        err = float(((cpu64(first) - reference.project_simplex(v.cpu())).abs() / scale).max())
        return [helper_check("reference", stacks.check_simplex, first, v, err=err, tolerance=t.out + K * t.acc),
                Check("deterministic", torch.equal(first, second))]

    return Case(f"project_simplex/{backend}/{common.dtype_name(dtype)}/K={K}/rows={rows}", "project_simplex",
                backend, prepare, call, check,
                fields=dict(op="project_simplex", dtype=common.dtype_name(dtype), K=K, d=rows))


def min_norm_grams(K: int, dtype) -> torch.Tensor:
    """A batch [B, K, K] in dtype on the CPU: random full-rank gradients, gradients sharing a
    common component (the optimum inside a face; not in 16 bits, where rounding can make G
    indefinite), integer gradients of rank 1 and 2 (exactly singular), duplicated gradients, and
    one zero gradient; each at three power-of-two scales."""
    generator = torch.Generator().manual_seed(2000 + K)
    randn = functools.partial(torch.randn, generator=generator, dtype=torch.float64)
    low_precision = dtype in (torch.float16, torch.bfloat16)
    duplicated = randn(K, K + 4)
    duplicated[-1] = duplicated[0]
    one_zero = randn(K, K + 4)
    one_zero[K // 2] = 0.0
    scenarios = [randn(K, 2 * K + 4),
                 test_min_norm._integer_gradients(K, 1, -3, 4, generator),
                 test_min_norm._integer_gradients(K, 2, -3, 4, generator),
                 duplicated, one_zero]
    if not low_precision:
        scenarios.append(randn(K, K + 2) + 3.0 * randn(1, K + 2))
    scales = (2.0**-4, 1.0, 2.0**4) if low_precision else (2.0**-10, 1.0, 2.0**10)
    return torch.stack([test_min_norm._gram(A) * s for A in scenarios for s in scales]).to(dtype)


@functools.lru_cache(maxsize=None)
def min_norm_reference(K: int) -> dict:
    """{dtype: λ* [B, K]} from the float64 reference on the rounded Grams of every dtype at once,
    on the device (20000 FISTA iterations of tiny kernels: seconds per call)."""
    grams = {dtype: min_norm_grams(K, dtype) for dtype in DTYPES}
    together = torch.cat([G.to(torch.float64) for G in grams.values()]).to(DEVICE)
    lam = reference.min_norm(together).cpu()
    out, start = {}, 0
    for dtype, G in grams.items():
        out[dtype] = lam[start:start + G.shape[0]]
        start += G.shape[0]
    return out


def min_norm_case(backend, dtype, K) -> Case:
    with_reference = K in Sizes.MIN_NORM_REFERENCE_KS

    def prepare():
        return min_norm_grams(K, dtype).to(DEVICE)

    def call(G):
        return mk.min_norm(G, backend=backend), mk.min_norm(G, backend=backend)

    def check(G, out):
        first, second = out
        t = tol.MIN_NORM[dtype]
        lam_ref = min_norm_reference(K)[dtype] if with_reference else None
        G64 = cpu64(G)
        G64 = 0.5 * (G64 + G64.transpose(-1, -2))
        max_diag = torch.diagonal(G64, dim1=-2, dim2=-1).amax(-1).clamp(min=TINY)
        x = cpu64(first)
        Gx = (G64 @ x.unsqueeze(-1)).squeeze(-1)
        f = (x * Gx).sum(-1)
        if lam_ref is not None:
            f_ref = reference.min_norm_objective(G64, lam_ref)
            err = float(((f - f_ref).abs() / torch.maximum(f_ref, t.floor * max_diag).clamp(min=TINY)).max())
            tolerance = t.objective
        else:  # the KKT residual: (Gλ)_i below λᵀGλ, relative to max_i G_ii
            err = float(((f.unsqueeze(-1) - Gx).clamp(min=0) / max_diag.unsqueeze(-1)).max())
            tolerance = t.kkt
        return [helper_check("kkt" + ("+reference" if lam_ref is not None else ""), stacks.check_min_norm_kkt,
                             first, G, reference_lambda=lam_ref, err=err, tolerance=tolerance),
                Check("deterministic", torch.equal(first, second))]

    return Case(f"min_norm/{backend}/{common.dtype_name(dtype)}/K={K}/batch", "min_norm", backend, prepare, call,
                check, fields=dict(op="min_norm", dtype=common.dtype_name(dtype), K=K))


def test_function_case(group: str, name: str, backend: str, test: Callable, *args, fields=None) -> Case:
    """A test of the suite run as it is (it draws its own inputs and asserts)."""

    def call(_):
        try:
            test(spec(backend), *args)
            return None
        except AssertionError as error:
            return error

    def check(_, error):
        return [Check("test", error is None, detail="" if error is None else common.first_line(error))]

    label = "/".join(common.dtype_name(a) if isinstance(a, torch.dtype) else str(a) for a in args)
    described = dict(op=group, test=name)
    described.update({"dtype": common.dtype_name(a) for a in args if isinstance(a, torch.dtype)})
    described.update(fields or {})
    return Case(f"{group}/{backend}/{name}" + (f"/{label}" if label else ""), group, backend, lambda: None, call,
                check, fields=described, sync_free=False)


def min_norm_cases(backends) -> List[Case]:
    cases = []
    degenerate_ks = [K for K in (3, 33, 64) if K in Sizes.MIN_NORM_KS] or [Sizes.MIN_NORM_KS[-1]]
    for backend in backends:
        if backend == "reference":
            continue  # the oracle itself, seconds per call
        for dtype in DTYPES:
            if not wanted(backend, dtype):
                continue
            for K in Sizes.MIN_NORM_KS:
                cases.append(min_norm_case(backend, dtype, K))
            for K in degenerate_ks:
                cases.append(test_function_case("min_norm", "zero_gram", backend,
                                                test_min_norm.test_zero_gram_gives_uniform, K, dtype))
                cases.append(test_function_case("min_norm", "one_zero_gradient", backend,
                                                test_min_norm.test_one_zero_gradient_takes_all_weight, K, dtype))
                cases.append(test_function_case("min_norm", "duplicated", backend,
                                                test_min_norm.test_duplicated_gradients, K, dtype))
                for rank in (1, 2):
                    cases.append(test_function_case("min_norm", f"rank{rank}", backend,
                                                    test_min_norm.test_rank_deficient, rank, K, dtype))
            for bad in (float("nan"), float("inf")):
                cases.append(test_function_case("min_norm", f"non_finite_{bad}", backend,
                                                test_min_norm.test_non_finite_gram_gives_nan, dtype, 3, bad))
            cases.append(test_function_case("min_norm", "collinear", backend, test_min_norm.test_collinear, dtype))
            cases.append(test_function_case("min_norm", "k2_closed_form", backend,
                                            test_min_norm.test_k2_closed_form, dtype))
            cases.append(test_function_case("min_norm", "batched", backend, test_min_norm.test_batched, dtype))
        cases.append(test_function_case("min_norm", "non_contiguous", backend, test_min_norm.test_non_contiguous_gram))
    return cases


def simplex_cases(backends) -> List[Case]:
    return [simplex_case(backend, dtype, K, rows)
            for backend in backends for dtype in DTYPES if wanted(backend, dtype)
            for K in Sizes.KS for rows in Sizes.SIMPLEX_ROWS]


# --------------------------------------------------------------------------------------------------
# The steps against the float64 formulas (test_steps' formulas, at larger K)


def flat_params64(params) -> torch.Tensor:
    return test_steps.flat64([p.unsqueeze(0) for p in params])[0]


def step_inputs(dtype, K, stacks_per_step=1, with_losses=False):
    params = test_steps.make_params(dtype, DEVICE)
    grads = [[test_steps.make_grads(params, K) for _ in range(stacks_per_step)] for _ in range(STEPS)]
    losses = [torch.rand(K, device=DEVICE) + 0.5 for _ in range(STEPS)] if with_losses else None
    return SimpleNamespace(params=params, grads=grads, losses=losses, start=flat_params64(params))


def tolerance_checks(dtype, lam_err, p_err, extra=()) -> List[Check]:
    return [Check("lambda", lam_err <= test_steps.LAMBDA_TOL[dtype], lam_err, test_steps.LAMBDA_TOL[dtype]),
            Check("params", p_err <= test_steps.PARAM_TOL[dtype], p_err, test_steps.PARAM_TOL[dtype]), *extra]


MOCO_HYPER = dict(beta=0.6, gamma=0.3, rho=0.05, lr=0.1, beta_decay=0.5, gamma_decay=0.25)


def moco_case(backend, dtype, K, normalize) -> Case:
    def prepare():
        x = step_inputs(dtype, K, with_losses=True)
        x.state = mk.MoCoState(x.params, K, dtype=test_steps.state_dtype(dtype))
        return x

    def call(x):
        return [mk.moco_step(x.params, x.grads[t][0], x.state, normalize=normalize, losses=x.losses[t],
                             backend=backend, **MOCO_HYPER).clone() for t in range(STEPS)]

    def check(x, lams):
        h = MOCO_HYPER
        p64 = x.start.clone()
        y64 = torch.zeros(K, p64.numel(), dtype=torch.float64)
        lam64 = torch.full((K,), 1.0 / K, dtype=torch.float64)
        lam_err = 0.0
        for t, lam in enumerate(lams):
            g64 = test_steps.flat64(x.grads[t][0])
            norms = g64.norm(dim=1)
            s = torch.ones(K, dtype=torch.float64) if normalize == "none" else 1 / norms
            beta_t = h["beta"] / (t + 1) ** h["beta_decay"]
            gamma_t = h["gamma"] / (t + 1) ** h["gamma_decay"]
            y64 = y64 - beta_t * (y64 - s[:, None] * g64)
            lam64 = test_steps.simplex64(lam64 - gamma_t * (y64 @ y64.T @ lam64 + h["rho"] * lam64))
            p64 = p64 - h["lr"] * (y64.T @ lam64)
            lam_err = max(lam_err, float((cpu64(lam) - lam64).abs().max()))
        p_err = float((flat_params64(x.params) - p64).abs().max()) / max(1.0, float(p64.abs().max()))
        y_err = float((cpu64(x.state.y_flat) - y64).abs().max()) / max(1.0, float(y64.abs().max()))
        return tolerance_checks(dtype, lam_err, p_err, [
            Check("tracked_y", y_err <= test_steps.PARAM_TOL[dtype], y_err, test_steps.PARAM_TOL[dtype]),
            Check("step_count", int(x.state.step) == STEPS, detail=f"state.step = {x.state.step}")])

    probe = "moco_fp64" if backend == "triton" and dtype == torch.float64 and K >= 17 else None
    return Case(f"moco_step/{backend}/{common.dtype_name(dtype)}/K={K}/{normalize}", "steps", backend, prepare, call,
                check, fields=dict(op="moco_step", dtype=common.dtype_name(dtype), K=K, normalize=normalize),
                warm=probe is None, probe=probe)


def modo_case(backend, dtype, K) -> Case:
    gamma, rho, lr, gamma_decay = 0.4, 0.1, 0.2, 0.5

    def prepare():
        x = step_inputs(dtype, K, stacks_per_step=3)
        x.state = mk.MoDoState(x.params, K, dtype=test_steps.state_dtype(dtype))
        return x

    def call(x):
        return [mk.modo_step(x.params, *x.grads[t], x.state, gamma=gamma, rho=rho, lr=lr, gamma_decay=gamma_decay,
                             backend=backend).clone() for t in range(STEPS)]

    def check(x, lams):
        p64 = x.start.clone()
        lam64 = torch.full((K,), 1.0 / K, dtype=torch.float64)
        lam_err = 0.0
        for t, lam in enumerate(lams):
            g1, g2, g3 = (test_steps.flat64(g) for g in x.grads[t])
            lam64 = test_steps.simplex64(lam64 - gamma / (t + 1) ** gamma_decay * (g1 @ g2.T @ lam64 + rho * lam64))
            p64 = p64 - lr * (g3.T @ lam64)
            lam_err = max(lam_err, float((cpu64(lam) - lam64).abs().max()))
        p_err = float((flat_params64(x.params) - p64).abs().max()) / max(1.0, float(p64.abs().max()))
        return tolerance_checks(dtype, lam_err, p_err)

    return Case(f"modo_step/{backend}/{common.dtype_name(dtype)}/K={K}", "steps", backend, prepare, call, check,
                fields=dict(op="modo_step", dtype=common.dtype_name(dtype), K=K))


def mgda_case(backend, dtype, K) -> Case:
    def prepare():
        return step_inputs(dtype, K)

    def call(x):
        lam = mk.mgda_step(x.params, x.grads[0][0], backend=backend)
        return lam, [p.grad.clone() for p in x.params]

    def check(x, out):
        lam, directions = out
        grads = x.grads[0][0]
        # λ optimal (KKT) for the Gram the backend computes (its rounding is gram's, tested above)
        G = mk.gram(grads, backend=backend)
        g64 = test_steps.flat64(grads)
        d64 = test_steps.flat64([d.unsqueeze(0) for d in directions])[0]
        expected = g64.T @ cpu64(lam)
        d_err = float((d64 - expected).abs().max()) / max(1.0, float(expected.abs().max()))
        return [helper_check("kkt", stacks.check_min_norm_kkt, lam, G.to(lam.dtype)),
                Check("direction", d_err <= test_steps.PARAM_TOL[dtype], d_err, test_steps.PARAM_TOL[dtype])]

    return Case(f"mgda_step/{backend}/{common.dtype_name(dtype)}/K={K}", "steps", backend, prepare, call, check,
                fields=dict(op="mgda_step", dtype=common.dtype_name(dtype), K=K))


def step_cases(backends) -> List[Case]:
    cases = []
    for backend in backends:
        for dtype in STEP_DTYPES:
            if not wanted(backend, dtype):
                continue
            for K in Sizes.STEP_KS:
                for normalize in ("none", "l2"):
                    cases.append(moco_case(backend, dtype, K, normalize))
                cases.append(modo_case(backend, dtype, K))
                if backend != "reference":  # the oracle's min_norm costs seconds per call
                    cases.append(mgda_case(backend, dtype, K))
    return cases


# --------------------------------------------------------------------------------------------------
# CUDA graphs, host synchronisation, side streams

def graph_case(backend, step: str, K: int, decay: bool) -> Case:
    """A step captured once and replayed STEPS times against STEPS eager steps on the same inputs:
    params and λ must match bitwise."""
    dtype = torch.float32

    def make_state(params):
        if step == "mgda":
            return None
        if step == "modo":
            return mk.MoDoState(params, K)
        return mk.MoCoState(params, K)

    def run_step(params, grads, state):
        if step == "mgda":
            return mk.mgda_step(params, grads[0], lr=0.1, backend=backend)
        if step == "modo":
            return mk.modo_step(params, *grads, state, gamma=0.4, lr=0.1, gamma_decay=0.5 if decay else 0.0,
                                backend=backend)
        return mk.moco_step(params, grads[0], state, beta=0.6, gamma=0.3, lr=0.1,
                            beta_decay=0.5 if decay else 0.0, gamma_decay=0.25 if decay else 0.0, backend=backend)

    def prepare():
        x = step_inputs(dtype, K, stacks_per_step=3 if step == "modo" else 1)
        x.eager = [p.clone() for p in x.params]
        x.warmup = [p.clone() for p in x.params]
        x.static = [[b.clone() for b in stack] for stack in x.grads[0]]
        return x

    def call(x):
        warm_state = make_state(x.warmup)
        with common.side_stream():  # lazy initialisation and Triton compiles, before the capture
            for _ in range(2):
                run_step(x.warmup, x.static, warm_state)
        common.synchronize()
        graph_state = make_state(x.params)
        replay = common.capture(lambda: run_step(x.params, x.static, graph_state))
        replayed = []
        for t in range(STEPS):
            for static_stack, stack in zip(x.static, x.grads[t]):
                for static_block, block in zip(static_stack, stack):
                    static_block.copy_(block)
            replayed.append((replay().clone(), [p.clone() for p in x.params]))
        eager_state = make_state(x.eager)
        eager = []
        for t in range(STEPS):
            lam = run_step(x.eager, x.grads[t], eager_state)
            eager.append((lam.clone(), [p.clone() for p in x.eager]))
        return replayed, eager

    def check(x, out):
        replayed, eager = out
        worst = 0.0
        first_mismatch = None
        for t, ((lam_g, params_g), (lam_e, params_e)) in enumerate(zip(replayed, eager)):
            diff = max([float((lam_g - lam_e).abs().max())] + [float((a - b).abs().max()) for a, b in zip(params_g, params_e)])
            if diff != 0 and first_mismatch is None:
                first_mismatch = t
            worst = max(worst, diff)
        detail = "" if first_mismatch is None else f"replay {first_mismatch} differs first; max |diff| {worst:.3g}"
        return [Check("replay_matches_eager", first_mismatch is None, worst, 0.0, detail)]

    name = f"{step}_step" + ("/decay" if decay else "")
    return Case(f"graph/{backend}/{name}/K={K}", "graphs", backend, prepare, call, check,
                fields=dict(op=f"{step}_step", K=K, capture=True, decay=decay), sync_free=False)


def graph_cases(backends) -> List[Case]:
    cases = []
    for backend in backends:
        if backend == "reference":
            continue
        for K in Sizes.LAYOUT_KS:
            cases.append(graph_case(backend, "mgda", K, decay=False))
            cases.append(graph_case(backend, "moco", K, decay=False))
            cases.append(graph_case(backend, "moco", K, decay=True))
            cases.append(graph_case(backend, "modo", K, decay=True))
    return cases


def sync_case(backend, name: str, prepare: Callable, call: Callable) -> Case:
    """Only the host-sync check (the values are checked by the other groups)."""
    return Case(f"host_sync/{backend}/{name}", "host_sync", backend, prepare, call, lambda x, out: [],
                fields=dict(op=name))


def fl_inputs(C, D, dtype):
    params, grads, exp_avg, exp_avg_sq, step, active = test_fl._random_clients(C, D, dtype, DEVICE)
    return SimpleNamespace(params=params, grads=grads, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, step=step,
                           active=active, weights=torch.rand(C, device=DEVICE) + 0.5)


def sync_cases(backends) -> List[Case]:
    """The calls not covered by the other groups' host-sync checks: MoCo's other options, MGDA's
    normalisations, the FL kernels."""
    cases = []
    K = Sizes.LAYOUT_KS[-1]
    C, D = Sizes.FL_SIZES[-1]
    for backend in backends:
        def moco_first():
            x = step_inputs(torch.float32, K, with_losses=True)
            x.state = mk.MoCoState(x.params, K, y_init="first")
            return x

        def moco_call(x, normalize, backend=backend):
            for t in range(STEPS):
                mk.moco_step(x.params, x.grads[t][0], x.state, normalize=normalize, losses=x.losses[t],
                             backend=backend, **MOCO_HYPER)

        for normalize in ("none", "loss+"):
            cases.append(sync_case(backend, f"moco_step/y_init=first/{normalize}", moco_first,
                                   functools.partial(moco_call, normalize=normalize)))
        if backend != "reference":  # the oracle's min_norm costs seconds per call
            cases.append(sync_case(backend, "mgda_step/loss+", lambda: step_inputs(torch.float32, K, with_losses=True),
                                   lambda x, backend=backend: mk.mgda_step(x.params, x.grads[0][0], normalize="loss+",
                                                                           losses=x.losses[0], backend=backend)))
        fl = lambda: fl_inputs(C, D, torch.float32)  # noqa: E731
        cases.append(sync_case(backend, "batched_adam_step", fl, lambda x, backend=backend: batched_adam_step(
            x.params, x.grads, x.exp_avg, x.exp_avg_sq, x.step, x.active, lr=1e-3, backend=backend)))
        cases.append(sync_case(backend, "batched_sgd_step", fl, lambda x, backend=backend: batched_sgd_step(
            x.params, x.grads, x.active, lr=1e-3, momentum=0.9, momentum_buffer=x.exp_avg, backend=backend)))
        cases.append(sync_case(backend, "masked_weighted_mean", fl, lambda x, backend=backend: masked_weighted_mean(
            x.params, x.weights, x.active, backend=backend)))
    return cases


def side_stream_case(backend, name: str, make: Callable, run: Callable) -> Case:
    """run(inputs) on the current stream and on a side stream, on two copies of the same inputs
    (drawn twice from one seed): the results must be bitwise equal."""

    def prepare():
        common.seed(f"side/{backend}/{name}")
        first = make()
        common.seed(f"side/{backend}/{name}")
        return first, make()

    def call(inputs):
        on_current = run(inputs[0])
        with common.side_stream():
            on_side = run(inputs[1])
        return on_current, on_side

    def check(_, out):
        on_current, on_side = out
        return [Check("side_stream_matches", bitwise_equal(on_current, on_side))]

    return Case(f"side_stream/{backend}/{name}", "side_stream", backend, prepare, call, check, fields=dict(op=name))


def side_stream_cases(backends) -> List[Case]:
    cases = []
    K, d = Sizes.LAYOUT_KS[-1], Sizes.DS[-1]
    C, D = Sizes.FL_SIZES[-1]
    for backend in backends:
        if backend == "reference":
            continue
        stack = lambda: make_stack("flat_mixed", K, None, torch.float32, stacks.randn)  # noqa: E731
        tensor = lambda: (stacks.randn(K, d, device=DEVICE), stacks.randn(K, device=DEVICE))  # noqa: E731
        cases.append(side_stream_case(backend, "gram", stack, lambda g, b=backend: mk.gram(g, backend=b)))
        cases.append(side_stream_case(backend, "combine", tensor, lambda x, b=backend: mk.combine(*x, backend=b)))
        cases.append(side_stream_case(backend, "min_norm", lambda: min_norm_grams(K, torch.float32).to(DEVICE),
                                      lambda G, b=backend: mk.min_norm(G, backend=b)))

        def moco_inputs():
            x = step_inputs(torch.float32, K)
            x.state = mk.MoCoState(x.params, K)
            return x

        def moco_run(x, b=backend):
            for t in range(STEPS):
                mk.moco_step(x.params, x.grads[t][0], x.state, beta=0.6, gamma=0.3, lr=0.1, backend=b)
            return x.params

        cases.append(side_stream_case(backend, "moco_step", moco_inputs, moco_run))

        def adam_run(x, b=backend):
            batched_adam_step(x.params, x.grads, x.exp_avg, x.exp_avg_sq, x.step, x.active, lr=1e-3, backend=b)
            return [x.params, x.exp_avg, x.exp_avg_sq]

        cases.append(side_stream_case(backend, "batched_adam_step", lambda: fl_inputs(C, D, torch.float32), adam_run))
    return cases


# --------------------------------------------------------------------------------------------------
# Federated kernels


def subnormal_close(name: str, got: torch.Tensor, expected: torch.Tensor, rtol: float) -> Check:
    """test_kernels.assert_close's bound, rtol · (|e| + max |e|), plus 4 units of the smallest
    subnormal: below the normal range an fma or a different order moves a result by a few of
    those units, far more than rtol of it, while a flush to zero moves it by all of it."""
    g, e = cpu64(got), cpu64(expected)
    finfo = torch.finfo(got.dtype)
    bound = rtol * (e.abs() + e.abs().max()) + 4 * finfo.tiny * finfo.eps
    error = (g - e).abs()
    scale = max(float(e.abs().max()), TINY)
    bad = int((error > bound).sum())
    return Check(name, bad == 0, float(error.max()) / scale, float(bound.max()) / scale,
                 f"{bad} of {error.numel()} off, max error {float(error.max()):.3g}" if bad else "")


def subnormal_case(backend, dtype, kernel: str) -> Case:
    """Adam's and SGD's updates with subnormal gradients and second moments, against the reference
    (torch on the CPU keeps subnormals): a kernel that flushes them to zero fails."""
    C, D = Sizes.FL_SIZES[-1][0], min(Sizes.FL_SIZES[-1][1], 4099)
    subnormal = torch.finfo(tol.accum_dtype(dtype)).tiny * 2.0**-6

    def prepare():
        x = fl_inputs(C, D, dtype)
        x.grads = (stacks.randn(C, D, dtype=torch.float64) * subnormal).to(dtype).to(DEVICE)
        x.exp_avg.mul_(subnormal)
        x.exp_avg_sq.copy_(x.exp_avg.abs())
        x.before = [t.cpu().clone() for t in (x.params, x.exp_avg, x.exp_avg_sq, x.step)]
        return x

    def call(x):
        if kernel == "adam":
            batched_adam_step(x.params, x.grads, x.exp_avg, x.exp_avg_sq, x.step, x.active, lr=0.1, backend=backend)
        else:
            batched_sgd_step(x.params, x.grads, x.active, lr=0.1, momentum=0.9, momentum_buffer=x.exp_avg,
                             backend=backend)

    def check(x, _):
        params, exp_avg, exp_avg_sq, step = (t.clone() for t in x.before)
        active, grads = x.active.cpu(), x.grads.cpu()
        on_device = x.active
        if kernel == "adam":
            reference.batched_adam_step(params, grads, exp_avg, exp_avg_sq, step, active, lr=0.1, beta1=0.9,
                                        beta2=0.999, eps=1e-8, weight_decay=0.0)
            pairs = (("params", x.params, params), ("exp_avg", x.exp_avg, exp_avg), ("exp_avg_sq", x.exp_avg_sq, exp_avg_sq))
        else:
            reference.batched_sgd_step(params, grads, exp_avg, active, lr=0.1, momentum=0.9, weight_decay=0.0)
            pairs = (("params", x.params, params), ("momentum_buffer", x.exp_avg, exp_avg))
        rtol = test_fl.OPTIM_RTOL[tol.accum_dtype(dtype)]
        return [subnormal_close(name, got[on_device], expected[active], rtol) for name, got, expected in pairs]

    return Case(f"fl/{backend}/{kernel}/subnormal/{common.dtype_name(dtype)}", "fl", backend, prepare, call, check,
                fields=dict(op=f"batched_{kernel}_step", dtype=common.dtype_name(dtype), C=C, D=D, subnormal=True))


def mean_bitwise_case(backend, dtype) -> Case:
    """masked_weighted_mean sums in one fixed order with fma and IEEE division on every compiled
    backend: the device result equals the cpu backend's bit for bit (subnormal rows included)."""
    C, D = Sizes.FL_SIZES[-1][0], min(Sizes.FL_SIZES[-1][1], 1000)

    def prepare():
        x = stacks.randn(C, D, dtype=dtype)
        x[: C // 2] *= torch.finfo(dtype).tiny * 2.0**-6
        weights, active = torch.rand(C, dtype=dtype), torch.rand(C) < 0.7
        active[0] = True
        return (x, weights, active), (x.to(DEVICE), weights.to(DEVICE), active.to(DEVICE))

    def call(inputs):
        return masked_weighted_mean(*inputs[1], backend=backend)

    def check(inputs, on_device):
        on_cpu = masked_weighted_mean(*inputs[0], backend="cpu")
        return [Check("bitwise_equal_to_cpu", torch.equal(on_device.cpu(), on_cpu))]

    return Case(f"fl/{backend}/mean_bitwise_vs_cpu/{common.dtype_name(dtype)}", "fl", backend, prepare, call, check,
                fields=dict(op="masked_weighted_mean", dtype=common.dtype_name(dtype), C=C, D=D))


def fl_cases(backends) -> List[Case]:
    cases = []
    for backend in backends:
        for C, D in Sizes.FL_SIZES:
            for dtype in DTYPES:
                if not wanted(backend, dtype):
                    continue
                for name, test in (("adam", test_fl.test_adam_step_matches_reference),
                                   ("sgd", test_fl.test_sgd_step_matches_reference),
                                   ("mean", test_fl.test_masked_weighted_mean)):
                    cases.append(test_function_case("fl", name, backend, test, C, D, dtype,
                                                    fields=dict(C=C, D=D, dtype=common.dtype_name(dtype))))
        for dtype in (torch.float32, torch.float64):
            if not wanted(backend, dtype):
                continue
            cases.append(subnormal_case(backend, dtype, "adam"))
            cases.append(subnormal_case(backend, dtype, "sgd"))
            if backend != "reference" and common.unavailable_reason("cpu") is None:
                cases.append(mean_bitwise_case(backend, dtype))
    return cases


# --------------------------------------------------------------------------------------------------
# K·d > 2^31


def large_case(backend, op: str) -> Case:
    """K = 2, d = 1.2e9 float32 (2.4e9 elements, 9.6 GB): gram or combine against a float64
    reference computed in column chunks on the device, with the bounds of stacks.check_products
    and stacks.check_combine."""
    K, d, chunk, dtype = 2, Sizes.LARGE_D, Sizes.LARGE_CHUNK, torch.float32
    needed = K * d * 4 * (1.6 if op == "combine" else 1.1) + 4 * chunk * K * 8

    def prepare():
        if common.free_device_bytes() < needed:
            pytest.skip(f"needs {needed / 1e9:.1f} GB free on the device")
        g = torch.empty(K, d, dtype=dtype, device=DEVICE)
        for start in range(0, d, chunk):
            g[:, start:start + chunk].normal_()
        return g, stacks.randn(K, device=DEVICE)

    def call(inputs):
        g, weights = inputs
        return mk.gram(g, backend=backend) if op == "gram" else mk.combine(g, weights, backend=backend)

    def check(inputs, out):
        g, weights = inputs
        if op == "gram":
            expected = torch.zeros(K, K, dtype=torch.float64, device=DEVICE)
            for start in range(0, d, chunk):
                part = g[:, start:start + chunk].double()
                expected += part @ part.T
            norms = torch.diagonal(expected).sqrt()
            relative = (out.double() - expected).abs() / (norms[:, None] * norms[None, :]).clamp(min=TINY)
            err = float(relative.max())
            return [Check("reference", err <= tol.GRAM[dtype], err, tol.GRAM[dtype])]
        t = tol.COMBINE[dtype]
        w64 = weights.double()
        tiny = torch.finfo(dtype).smallest_normal * 2**-10
        worst, bad = 0.0, 0
        for start in range(0, d, chunk):
            part = g[:, start:start + chunk].double()
            expected = w64 @ part
            magnitude = w64.abs() @ part.abs()
            error = (out[start:start + chunk].double() - expected).abs()
            bad += int((error > t.rtol * expected.abs() + (K + 2) * t.atol * magnitude + tiny).sum())
            worst = max(worst, float((error / magnitude.clamp(min=TINY)).max()))
        return [Check("reference", bad == 0, worst, combine_tolerance(dtype, K), f"{bad} elements off" if bad else "")]

    return Case(f"large/{backend}/{op}/K={K}/d={d}", "large", backend, prepare, call, check,
                fields=dict(op=op, dtype="float32", K=K, d=d), warm=False)


def large_cases(backends) -> List[Case]:
    return [large_case(backend, op) for backend in backends if backend != "reference" for op in ("gram", "combine")]


# --------------------------------------------------------------------------------------------------


GROUPS = (size_matrix_cases, layout_cases, simplex_cases, min_norm_cases, step_cases, graph_cases, sync_cases,
          side_stream_cases, fl_cases, large_cases)


#: the Ks of the first pass over the size matrices; their other Ks run after every group's first
#: pass, so that a stage cut short by its deadline still has an answer from every group
FIRST_PASS_KS = (3, 33)
MATRIX_GROUPS = ("gram", "cross_gram", "combine", "project_simplex", "min_norm", "steps")


def second_pass(case: Case) -> bool:
    return case.group in MATRIX_GROUPS and case.fields.get("K", FIRST_PASS_KS[0]) not in FIRST_PASS_KS


def build_cases(backends) -> List[Case]:
    cases = []
    for group in GROUPS:
        cases.extend(group(backends))
    cases.sort(key=second_pass)  # stable: each pass keeps the groups' order
    if DRY:
        cases = common.one_interpreted_case_per(cases, lambda case: case.group)
    return cases


def run_case(case: Case, log) -> dict:
    record = {"case": case.id, "group": case.group, "backend": case.backend, **case.fields}
    started = time.perf_counter()
    try:
        if case.probe is not None:
            status = common.probe_status(case.probe)
            if not status.startswith("ok"):
                pytest.skip(f"the build stage's {case.probe} probe did not finish ({status}): GPU-NOTES 1.1.3")
        common.seed(case.id)
        inputs = case.prepare()
        common.synchronize()
        sync_error = None
        call_started = time.perf_counter()
        if case.sync_free and DEVICE.type == "cuda":
            try:
                with common.no_host_sync():
                    out = case.call(inputs)
            except RuntimeError as error:
                if not common.is_host_sync_error(error):
                    raise
                sync_error = common.first_line(error)
                common.seed(case.id)  # the interrupted call may have changed its inputs
                inputs = case.prepare()
                call_started = time.perf_counter()
                out = case.call(inputs)
        else:
            out = case.call(inputs)
        common.synchronize()
        record["ms"] = round((time.perf_counter() - call_started) * 1e3, 3)
        checks = case.check(inputs, out)
        if case.sync_free and DEVICE.type == "cuda":
            checks.append(Check("no_host_sync", sync_error is None, detail=sync_error or ""))
        failed = [c for c in checks if not c.ok]
        measured = [c for c in checks if c.err is not None and c.tol is not None]
        if measured:
            worst = max(measured, key=lambda c: c.err / c.tol if c.tol > 0 else (0.0 if c.err == 0 else float("inf")))
            record.update(err=worst.err, tol=worst.tol)
        if failed:
            record["failed"] = [f"{c.name}: {c.detail}" if c.detail else c.name for c in failed]
        record["status"] = "fail" if failed else "pass"
    except pytest.skip.Exception as skip:
        record.update(status="skipped", reason=str(skip.msg if hasattr(skip, "msg") else skip))
    except Exception as error:  # one case's failure must not stop the others
        record.update(status="error", error=common.first_line(error))
        print(f"--- {case.id}\n{traceback.format_exc()}", file=log)
        if common.context_broken():
            record["sticky_cuda_error"] = True
    record["total_ms"] = round((time.perf_counter() - started) * 1e3, 1)
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resume", action="store_true", help="skip the cases already in correct.json")
    parser.add_argument("--only", default=None, help="run only the cases whose id matches this regex")
    parser.add_argument("--list", action="store_true", help="print the case ids and exit")
    parser.add_argument("--out", default=os.path.join(common.OUT_DIR, "correct.json"))
    args = parser.parse_args(argv)

    backends = []
    for backend in common.kernel_backends():
        reason = common.unavailable_reason(backend)
        if reason is None:
            backends.append(backend)
        else:
            print(f"backend {backend} unavailable: {reason}", flush=True)
    cases = build_cases(backends)
    if args.only:
        cases = [c for c in cases if re.search(args.only, c.id)]
    if args.list:
        for case in cases:
            print(case.id)
        return 0

    done = {r["case"] for r in read_json_lines(args.out)} if args.resume else set()
    writer = JsonLines(args.out, append=args.resume)
    if not args.resume:
        for backend in common.kernel_backends():
            if backend not in backends:
                writer.write({"case": f"backend/{backend}", "group": "backends", "backend": backend, "status": "fail",
                              "failed": [f"unavailable: {common.unavailable_reason(backend)}"]})
    todo = [c for c in cases if c.id not in done]
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU tensors (dry run)"
    print(f"# correct.py on {where}: {len(todo)} cases ({', '.join(backends)})"
          + (f", {len(done)} already done" if done else ""), flush=True)
    counts = {}
    for index, case in enumerate(todo):
        if common.seconds_left() <= 0:
            rest = len(todo) - index
            writer.write({"case": "_not_run", "group": "deadline", "status": "not_run", "count": rest,
                          "first": case.id})
            print(f"stage deadline: {rest} cases not run, from {case.id}", flush=True)
            writer.close()
            return 5
        record = run_case(case, sys.stdout)
        writer.write(record)
        counts[record["status"]] = counts.get(record["status"], 0) + 1
        if record["status"] not in ("pass", "skipped"):
            reason = record.get("error") or "; ".join(record.get("failed", []))
            print(f"{record['status'].upper()} {case.id}: {reason} ({record.get('ms', '-')} ms)", flush=True)
        if record.get("sticky_cuda_error"):
            print(f"sticky CUDA error in {case.id}: stopping after {index + 1} of {len(todo)} cases", flush=True)
            writer.close()
            return 4
    writer.close()
    print("done: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())), flush=True)
    return 3 if counts.get("fail") or counts.get("error") else 0


if __name__ == "__main__":
    sys.exit(main())
