"""Shared pieces of the op tests: the (backend, device) pairs, parameter matrices, random gradient
stacks of every layout, and the checks of each op's result against the float64 reference."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, List, Sequence

import pytest
import torch

import tolerances as tol
from molkernels import reference

# --------------------------------------------------------------------------------------------------
# Backends


@dataclass(frozen=True)
class BackendSpec:
    backend: str  # "reference", "cpu", "triton" or "cuda"
    device: str  # the device of the input tensors: "cpu" or "cuda"

    @property
    def id(self) -> str:
        return f"{self.backend}@{self.device}"

    @property
    def interpreted(self) -> bool:
        """Triton on CPU tensors, under TRITON_INTERPRET=1: slow, so tests keep sizes small."""
        return self.backend == "triton" and self.device == "cpu"

    def __str__(self) -> str:
        return self.id


BACKENDS = (
    BackendSpec("reference", "cpu"),
    BackendSpec("cpu", "cpu"),
    BackendSpec("triton", "cpu"),
    BackendSpec("cuda", "cuda"),
    BackendSpec("triton", "cuda"),
)


def _marks(spec: BackendSpec):
    marks = []
    if spec.device == "cuda":
        marks.append(pytest.mark.gpu)
    if spec.backend == "triton":
        marks.append(pytest.mark.triton)
    return marks


def backend_params(exclude: Sequence[str] = ()) -> list:
    """One pytest.param per (backend, device) pair, for indirect parametrization of `be`."""
    return [pytest.param(s, id=s.id, marks=_marks(s)) for s in BACKENDS if s.backend not in exclude]


def cases(axes: Callable[[BackendSpec], Sequence[tuple]], exclude: Sequence[str] = ()) -> list:
    """pytest.params (spec, *values) for every pair and every tuple axes(spec) yields; axes can
    give the interpreted Triton backend smaller sizes."""
    params = []
    for spec in BACKENDS:
        if spec.backend in exclude:
            continue
        for values in axes(spec):
            ident = "-".join([spec.id] + [_ident(v) for v in values])
            params.append(pytest.param(spec, *values, id=ident, marks=_marks(spec)))
    return params


def _ident(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return str(value)


# The size matrix. Under Triton's interpreter (CPU tensors) d = 100003 costs seconds per
# call, so it runs there for one (K, dtype) only; the other large-d cases use INTERPRETED_D.
KS = (1, 2, 3, 7, 16, 33)
# K above one 64-row tile (the Triton Gram's largest): the output is a grid of tiles, each summed
# from several partials (python_tests/robustness/test_ops_robust.py).
LARGE_KS = (65, 100, 128, 200)
DS = (1, 17, 100003)
LARGE_D = 100003
INTERPRETED_D = 2053
INTERPRETED_LARGE = (3, torch.float32)  # the one (K, dtype) that runs d = 100003 interpreted


def size_matrix(spec: BackendSpec, dtypes=tol.DTYPES, Ks=KS, ds=DS):
    """(K, d, dtype) cases of the size matrix for one backend."""
    out = []
    for K, d, dtype in itertools.product(Ks, ds, dtypes):
        if spec.interpreted and d > 20000:
            if (K, dtype) != INTERPRETED_LARGE:
                d = INTERPRETED_D
        out.append((K, d, dtype))
    return out


def layout_matrix(spec: BackendSpec):
    """(layout, K, dtype) cases: every layout with K = 1, 3, 7 (K = 3 only under the interpreter,
    where each block is a launch that costs ~0.1 s; K = 1 and 7 run there in the size matrix)."""
    Ks = (3,) if spec.interpreted else (1, 3, 7)
    return [(layout, K, dtype) for layout in LAYOUTS for K in Ks for dtype in tol.DTYPES]


# --------------------------------------------------------------------------------------------------
# Random inputs (drawn in float64 on the CPU, then rounded and moved, so every backend sees the same
# values for the same seed)


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype).to(device)


def randint(*shape, low=-2, high=3, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Small integers: products and sums of them are exact in every accumulation dtype."""
    return torch.randint(low, high, shape, dtype=torch.int64).to(dtype).to(device)


#: odd-shaped per-parameter blocks: [K, 3, 5], [K, 1], [K, 17], [K, 2, 2, 2], a [K] scalar block
BLOCK_SHAPES = ((3, 5), (1,), (17,), (2, 2, 2), ())

LAYOUTS = ("tensor", "blocks", "flat", "noncontiguous", "mixed")


def make_stack(layout: str, K: int, dtype, device, *, fill=randn, d: int = 17):
    """A gradient stack of K objectives in one of the layouts:

    tensor         one [K, d] tensor
    blocks         a list of separate blocks with BLOCK_SHAPES
    flat           per-parameter views [K, *shape_j] into one [K, D] buffer (molkernels.flat_buffer),
                   so every block is strided: rows D elements apart
    noncontiguous  a [K, 5, 3] block that is the transpose of a [K, 3, 5] tensor, and a [K, 4]
                   block taking every other column of a [K, 8] tensor
    mixed          all of the above in one list
    """
    if layout == "tensor":
        return fill(K, d, dtype=dtype, device=device)
    if layout == "blocks":
        return [fill(K, *shape, dtype=dtype, device=device) for shape in BLOCK_SHAPES]
    if layout == "flat":
        import molkernels

        buffer, views = molkernels.flat_buffer(BLOCK_SHAPES, K, dtype=dtype, device=device)
        buffer.copy_(fill(*buffer.shape, dtype=dtype, device=device))
        return views
    if layout == "noncontiguous":
        transposed = fill(K, 3, 5, dtype=dtype, device=device).transpose(1, 2)
        every_other = fill(K, 8, dtype=dtype, device=device)[:, ::2]
        assert not transposed.is_contiguous() and not every_other.is_contiguous()
        return [transposed, every_other]
    if layout == "mixed":
        return (
            make_stack("flat", K, dtype, device, fill=fill)
            + make_stack("noncontiguous", K, dtype, device, fill=fill)
            + make_stack("blocks", K, dtype, device, fill=fill)
        )
    raise ValueError(layout)


def as_list(g) -> List[torch.Tensor]:
    return [g] if isinstance(g, torch.Tensor) else list(g)


def set_last_element(g, k: int, value: float) -> None:
    """g_k's last element in a middle block of the stack (a non-contiguous one in the mixed layout)
    := value, in place."""
    blocks = as_list(g)
    block = blocks[len(blocks) // 2]
    block[(k,) + tuple(s - 1 for s in block.shape[1:])] = value


def row_norms(g) -> torch.Tensor:
    """‖g_k‖ over all blocks, float64 on the CPU."""
    return reference.stack_blocks([b.cpu() for b in as_list(g)]).norm(dim=1)


def poison_allocator(*numels: int, device="cpu") -> None:
    """Allocate NaN-filled buffers of about the output sizes and free them, so that an output
    element a kernel forgets to write is likely to read NaN (the allocator reuses freed memory)."""
    keep = [torch.full((max(int(n), 1) + extra,), float("nan"), device=device) for n in numels for extra in (0, 16)]
    del keep


# --------------------------------------------------------------------------------------------------
# Checks against the reference


def _cpu64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().cpu().to(torch.float64)


def check_products(out, a, b, table):
    """A gram (b is None) or cross_gram result against the reference. (Gram's exact symmetry has
    its own test in test_gram.py.)"""
    a_cpu = [x.cpu() for x in as_list(a)]
    b_cpu = a_cpu if b is None else [x.cpu() for x in as_list(b)]
    dtype = a_cpu[0].dtype
    K = a_cpu[0].shape[0]
    assert isinstance(out, torch.Tensor)
    assert out.shape == (K, K)
    assert out.dtype == tol.accum_dtype(dtype)
    assert out.device.type == as_list(a)[0].device.type
    assert torch.isfinite(out).all(), f"non-finite entries for finite input:\n{out}"
    expected = reference.cross_gram(a_cpu, b_cpu)
    scale = row_norms(a_cpu)[:, None] * row_norms(b_cpu)[None, :]
    error = (_cpu64(out) - expected).abs()
    bound = table[dtype] * scale
    bad = error > bound
    assert not bad.any(), (
        f"{int(bad.sum())} entries off; worst error/scale = {(error / scale.clamp(min=1e-300)).max().item():.3g} "
        f"(tolerance {table[dtype]:.3g})\ngot\n{out}\nexpected\n{expected}"
    )


def check_combine(out, g, weights):
    """combine's result (shape, dtype, device, values) against the reference."""
    blocks = as_list(g)
    outs = [out] if isinstance(g, torch.Tensor) else out
    if isinstance(g, torch.Tensor):
        assert isinstance(out, torch.Tensor), f"a tensor stack must give a tensor, got {type(out).__name__}"
    else:
        assert isinstance(out, list), f"a list stack must give a list, got {type(out).__name__}"
        assert len(out) == len(blocks)
    K = blocks[0].shape[0]
    t = tol.COMBINE[blocks[0].dtype]
    w64 = weights.detach().cpu().to(torch.float64)
    for j, (o, block) in enumerate(zip(outs, blocks)):
        assert o.shape == block.shape[1:], f"block {j}: shape {tuple(o.shape)}, expected {tuple(block.shape[1:])}"
        assert o.dtype == block.dtype, f"block {j}: dtype {o.dtype}, expected {block.dtype}"
        assert o.device == block.device
        b64 = _cpu64(block)
        expected = torch.tensordot(w64, b64, dims=1)
        magnitude = torch.tensordot(w64.abs(), b64.abs(), dims=1)
        assert torch.isfinite(o).all(), f"block {j}: non-finite output for finite input"
        tiny = torch.finfo(block.dtype).smallest_normal * 2**-10  # subnormal rounding of the output
        bound = t.rtol * expected.abs() + (K + 2) * t.atol * magnitude + tiny
        error = (_cpu64(o) - expected).abs()
        bad = error > bound
        assert not bad.any(), (
            f"block {j}: {int(bad.sum())} of {o.numel()} elements off; worst excess {(error - bound).max().item():.3g}"
        )


def check_simplex(x, v):
    """project_simplex's result against the sorting reference, plus the exact properties."""
    assert x.shape == v.shape and x.dtype == v.dtype and x.device == v.device
    K = v.shape[-1]
    v64 = _cpu64(v)
    x64 = _cpu64(x)
    t = tol.PROJECT_SIMPLEX[v.dtype]
    assert torch.isfinite(x64).all(), "non-finite output for a finite row"
    assert (x64 >= 0).all(), f"negative entries: {x64.min().item()}"
    scale = 1.0 + v64.abs().amax(-1, keepdim=True)
    elementwise = t.out + K * t.acc * scale
    assert (x64 <= 1 + elementwise).all(), f"entries above 1: {x64.max().item()}"  # 1 + ulps happens
    expected = reference.project_simplex(v.detach().cpu())
    error = (x64 - expected).abs()
    assert (error <= elementwise).all(), f"worst error {error.max().item():.3g} vs the sorting reference"
    sums = x64.sum(-1, keepdim=True)
    assert ((sums - 1).abs() <= K * elementwise).all(), f"row sums {sums.flatten()[:8]}"
    # exact: the projection is x = max(v − τ, 0), a monotone map of each row
    order = torch.argsort(v64, dim=-1, stable=True)
    sorted_x = torch.gather(x64, -1, order)
    assert (sorted_x[..., 1:] >= sorted_x[..., :-1]).all(), "the projection does not preserve the order of v"
    sorted_v = torch.gather(v64, -1, order)
    ties = sorted_v[..., 1:] == sorted_v[..., :-1]
    assert torch.equal(sorted_x[..., 1:][ties], sorted_x[..., :-1][ties]), "equal entries of v got different x"


def simplex_tolerance(dtype, K: int) -> float:
    """Independent of the magnitude of v: the kernels work on v − max(v), whose entries that get mass
    lie within 1 of 0, so τ carries the rounding of K terms of size at most 1."""
    t = tol.PROJECT_SIMPLEX[dtype]
    return t.out + 2 * K * t.acc


def check_projection(x: torch.Tensor, v: torch.Tensor) -> None:
    """x = project_simplex(v) for finite rows of any magnitude: x ≥ 0, Σx = 1, the optimality
    conditions (x = max(w − τ, 0), w = v − max v, one τ on the support, every zero at or below it)
    and the sorting reference, all within a tolerance that does not grow with |v|."""
    assert x.shape == v.shape and x.dtype == v.dtype and x.device == v.device
    K = v.shape[-1]
    bound = simplex_tolerance(v.dtype, K)
    x64 = x.detach().cpu().to(torch.float64)
    v64 = v.detach().cpu().to(torch.float64)
    assert torch.isfinite(x64).all(), f"non-finite output for finite rows:\n{x64}"
    assert (x64 >= 0).all(), f"negative entries: {x64.min().item()}"
    sums = x64.sum(-1)
    assert ((sums - 1).abs() <= K * bound).all(), f"row sums {sums.flatten()[:8].tolist()}"
    w = v64 - v64.amax(-1, keepdim=True)  # may be −inf far below the maximum: it gets no mass
    support = x64 > 0
    tau = torch.where(support, w - x64, torch.inf).amin(-1, keepdim=True)
    spread = torch.where(support, w - x64 - tau, 0.0)
    assert (spread <= 2 * bound).all(), f"τ differs across the support by {spread.max().item():.3g}"
    assert (torch.where(support, -torch.inf, w) <= tau + 2 * bound).all(), "a zero entry lies above τ"
    expected = reference.project_simplex(v.detach().cpu())
    error = (x64 - expected).abs()
    assert (error <= bound).all(), f"worst error {error.max().item():.3g} against the sorting reference"


def check_min_norm_kkt(lam, gram, *, reference_lambda=None):
    """λ on the simplex and optimal (KKT): (Gλ)_i ≥ λᵀGλ − tol for every i, with equality where
    λ_i > 0; with reference_lambda, λᵀGλ within the objective tolerance of the reference's."""
    assert lam.shape == gram.shape[:-1], f"shape {tuple(lam.shape)}, expected {tuple(gram.shape[:-1])}"
    assert lam.dtype == gram.dtype and lam.device == gram.device
    t = tol.MIN_NORM[gram.dtype]
    # divided by a power of two near its largest entry first (exact), so that G_ij + G_ji cannot
    # overflow for entries near the largest double; every tolerance below is relative to the scale
    G = _cpu64(gram)
    largest = G.abs().amax((-2, -1), keepdim=True)
    G = torch.ldexp(G, -torch.frexp(largest).exponent)
    G = 0.5 * (G + G.transpose(-1, -2))
    x = _cpu64(lam)
    K = G.shape[-1]
    assert torch.isfinite(x).all(), "non-finite weights for a finite Gram"
    assert (x >= 0).all(), f"negative weights: min {x.min().item()}"
    sums = x.sum(-1)
    assert ((sums - 1).abs() <= t.simplex_sum + K * 1e-15).all(), f"weights do not sum to 1: {sums.flatten()[:8]}"
    max_diag = torch.diagonal(G, dim1=-2, dim2=-1).amax(-1).clamp(min=0)
    Gx = (G @ x.unsqueeze(-1)).squeeze(-1)
    f = (x * Gx).sum(-1)
    kkt = t.kkt * max_diag
    below = (f.unsqueeze(-1) - Gx) - kkt.unsqueeze(-1)
    assert (below <= 0).all(), f"(Gλ)_i < λᵀGλ − tol: worst {(below.max() / max_diag.max().clamp(min=1e-300)).item():.3g} of max diag"
    support = x > 0
    gap = ((Gx - f.unsqueeze(-1)).abs() - kkt.unsqueeze(-1))[support]
    assert (gap <= 0).all(), f"(Gλ)_i ≠ λᵀGλ on the support: worst excess {gap.max().item():.3g}"
    if reference_lambda is not None:
        f_ref = reference.min_norm_objective(G, reference_lambda.to(torch.float64))
        allowed = t.objective * torch.maximum(f_ref, t.floor * max_diag)
        assert (f <= f_ref + allowed).all(), f"objective above the reference's: {(f - f_ref).max().item():.3g}"
        assert (f >= f_ref - allowed).all(), f"objective below the reference's: {(f - f_ref).min().item():.3g}"
