"""Randomised properties of the core ops (issue 14's robustness suite), on every backend available
(Triton under the interpreter on CPU tensors, with fewer and smaller examples).

Hypothesis draws, for gram, cross_gram, combine, project_simplex and min_norm:
- magnitudes: data scaled by 10^e, e from −30 up to 300 (less where the op's result, or the dtype,
  cannot represent it: a Gram squares its data), and rows mixing magnitudes;
- layouts: transposed, column-sliced, row-strided, offset and expanded (stride 0) views;
- one NaN or ±Inf placed anywhere in the underlying storage (so it may also fall outside the view,
  or, in an expanded view, appear many times). Every output that depends on it must be NaN (NaN
  input) or non-finite (Inf input), never a finite number that hides it; every other output must be
  finite and right.
Gram outputs must be symmetric bit for bit. Runs are reproducible: derandomised, no example database.
"""

import pytest
import torch

pytest.importorskip("hypothesis")  # e.g. the GPU machine's image: this file skips, the rest of the suite runs
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import molkernels  # noqa: E402
import tolerances as tol  # noqa: E402
from molkernels import reference  # noqa: E402
from stacks import backend_params, check_combine, check_min_norm_kkt, check_projection  # noqa: E402

# Under the interpreter NumPy warns on Inf · 0 and Inf − Inf, which the poisoned inputs cause by design.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

POISONS = (None, float("nan"), float("inf"), float("-inf"))

# log10 of the data's scale that each op represents, per dtype: (lowest, highest)
STACK_EXPONENTS = {  # gram, cross_gram: squares of the data, accumulated in float32 (float64)
    torch.float64: (-30, 150), torch.float32: (-15, 15), torch.bfloat16: (-15, 15), torch.float16: (-2, 2),
}
COMBINE_EXPONENTS = {  # combine: the data itself, times weights of at most 1 in magnitude
    torch.float64: (-30, 300), torch.float32: (-30, 36), torch.bfloat16: (-30, 36), torch.float16: (-3, 3),
}
VALUE_EXPONENTS = {  # project_simplex, min_norm: values of the dtype
    torch.float64: (-30, 300), torch.float32: (-30, 37), torch.bfloat16: (-30, 37), torch.float16: (-4, 4),
}

BLOCK_LAYOUTS = ("contiguous", "transposed", "sliced", "row-strided", "offset", "expanded-columns", "expanded-rows")


def _run(be, test, examples: int, interpreted_examples: int) -> None:
    """Runs the Hypothesis test `test` with this file's reproducible settings."""
    settings(
        max_examples=interpreted_examples if be.interpreted else examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )(test)()


def _values(generator: torch.Generator, shape, exponent: float, mixed_from=None) -> torch.Tensor:
    """Random float64 values around 10^exponent (signs random, |x| in [0.5, 1] · 10^exponent); with
    `mixed_from`, each entry's magnitude drawn anywhere from 10^mixed_from up to 10^exponent."""
    signs = torch.where(torch.rand(shape, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0)
    if mixed_from is not None:
        uniform = torch.rand(shape, generator=generator, dtype=torch.float64)
        return signs * torch.pow(10.0, mixed_from + (exponent - mixed_from) * uniform)
    return signs * (0.5 + 0.5 * torch.rand(shape, generator=generator, dtype=torch.float64)) * 10.0**exponent


def _poisoned(base: torch.Tensor, poison, where: float) -> torch.Tensor:
    """`base` with one element of its storage (at fraction `where` of it) set to `poison`."""
    if poison is not None:
        base.view(-1)[min(int(where * base.numel()), base.numel() - 1)] = poison
    return base


def _block(layout: str, K: int, n: int, fill) -> torch.Tensor:
    """A [K, ...] block of about n columns in `layout`, a view of a base tensor from fill(shape)."""
    if layout == "contiguous":
        return fill((K, n))
    if layout == "transposed":
        return fill((K, 3, n)).transpose(1, 2)  # [K, n, 3]
    if layout == "sliced":
        return fill((K, 2 * n))[:, 1::2]
    if layout == "row-strided":
        return fill((2 * K, n))[::2]
    if layout == "offset":
        return fill((K + 1, n + 3))[1:, 2:2 + n]
    if layout == "expanded-columns":
        return fill((K, 1)).expand(K, n)
    if layout == "expanded-rows":  # every objective's gradient is the same storage
        return fill((1, n)).expand(K, n)
    raise ValueError(layout)


@st.composite
def _stacks(draw, exponents, count: int, small: bool):
    """`count` gradient stacks of the same structure (lists of one or two blocks of drawn layouts),
    each with at most one poisoned element, and the dtype; float64 values rounded to the dtype."""
    dtype = draw(st.sampled_from(tol.DTYPES))
    low, high = exponents[dtype]
    exponent = draw(st.floats(low, high))
    mixed_from = low if draw(st.booleans()) else None
    K = draw(st.integers(1, 4 if small else 9))
    layouts = draw(st.lists(st.sampled_from(BLOCK_LAYOUTS), min_size=1, max_size=2))
    widths = [draw(st.integers(1, 9 if small else 40)) for _ in layouts]
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    poisons = [(draw(st.sampled_from(POISONS)), draw(st.floats(0, 1))) for _ in range(count)]
    stacks = []
    for poison, where in poisons:
        bases = []

        def fill(shape):
            bases.append(_values(generator, shape, exponent, mixed_from).to(dtype))
            return bases[-1]

        blocks = [_block(layout, K, n, fill) for layout, n in zip(layouts, widths)]
        _poisoned(bases[draw(st.integers(0, len(bases) - 1))], poison, where)
        stacks.append(blocks)
    return dtype, stacks


def _rows_with(blocks, test) -> torch.Tensor:
    """[K] bool: the objectives with an entry for which test(entries) holds, in some block."""
    return torch.stack([test(b.cpu().reshape(b.shape[0], -1)).any(1) for b in blocks]).any(0)


def _non_finite(x: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(x)


def _check_products(out, a, b, table) -> None:
    """A [K, K] gram/cross_gram result: entry (i, j) non-finite (NaN for a NaN input) when row i of a
    or row j of b is, else within table's tolerance of the float64 reference."""
    out64 = out.detach().cpu().to(torch.float64)
    affected = _rows_with(a, _non_finite)[:, None] | _rows_with(b, _non_finite)[None, :]
    assert not torch.isfinite(out64[affected]).any(), f"finite entries that depend on a non-finite input:\n{out64}"
    nan_affected = _rows_with(a, torch.isnan)[:, None] | _rows_with(b, torch.isnan)[None, :]
    assert torch.isnan(out64[nan_affected]).all(), f"entries that depend on a NaN input must be NaN:\n{out64}"
    assert torch.isfinite(out64[~affected]).all(), f"non-finite entries without a non-finite input:\n{out64}"
    a_rows = reference.stack_blocks([x.cpu() for x in a])
    b_rows = reference.stack_blocks([x.cpu() for x in b])
    clean = ~affected
    expected = torch.where(clean, a_rows.nan_to_num(0, 0, 0) @ b_rows.nan_to_num(0, 0, 0).T, 0.0)
    scale = a_rows.nan_to_num(0, 0, 0).norm(dim=1)[:, None] * b_rows.nan_to_num(0, 0, 0).norm(dim=1)[None, :]
    error = torch.where(clean, (out64 - expected).abs(), 0.0)
    bound = table[a[0].dtype] * scale
    assert (error <= bound).all(), f"worst error / scale {(error / scale.clamp(min=1e-300)).max().item():.3g}"


def _check_bitwise_symmetric(G: torch.Tensor) -> None:
    bits = G.view(torch.int64 if G.dtype == torch.float64 else torch.int32)
    assert torch.equal(bits, bits.T), f"G and Gᵀ differ in {int((bits != bits.T).sum())} entries"


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_gram_properties(be):
    @given(_stacks(STACK_EXPONENTS, 1, be.interpreted))
    def run(drawn):
        dtype, (g,) = drawn
        g = [b.to(be.device) for b in g]
        G = molkernels.gram(g, backend=be.backend)
        _check_bitwise_symmetric(G)
        _check_products(G, g, g, tol.GRAM)

    _run(be, run, 60, 20)


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_cross_gram_properties(be):
    @given(_stacks(STACK_EXPONENTS, 2, be.interpreted))
    def run(drawn):
        dtype, (a, b) = drawn
        a, b = [x.to(be.device) for x in a], [x.to(be.device) for x in b]
        C = molkernels.cross_gram(a, b, backend=be.backend)
        _check_products(C, a, b, tol.CROSS_GRAM)

    _run(be, run, 60, 20)


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_combine_properties(be):
    @given(
        _stacks(COMBINE_EXPONENTS, 1, be.interpreted),
        st.sampled_from(["simplex", "signed", "with-zeros"]),
        st.sampled_from(POISONS),
        st.floats(0, 1),
        st.integers(0, 2**31 - 1),
    )
    def run(drawn, weights_kind, weight_poison, weight_where, seed):
        dtype, (g,) = drawn
        K = g[0].shape[0]
        generator = torch.Generator().manual_seed(seed)
        w = torch.rand(K, generator=generator, dtype=torch.float64)
        if weights_kind == "simplex":
            w = w / w.sum()
        elif weights_kind == "signed":
            w = 2 * w - 1
        else:  # 0 · NaN and 0 · Inf are NaN: a zero weight must not hide a non-finite gradient
            w = torch.where(w < 0.5, 0.0, w)
        w = _poisoned(w, weight_poison, weight_where)
        weights = w.to(tol.accum_dtype(dtype)).to(be.device)
        g = [b.to(be.device) for b in g]
        out = molkernels.combine(g, weights, backend=be.backend)
        bad_rows = ~torch.isfinite(w)
        finite = True
        for block, o in zip(g, out):
            rows = block.cpu().reshape(K, -1)
            affected = (~torch.isfinite(rows) | bad_rows[:, None]).any(0).reshape(o.shape)
            o = o.cpu()
            assert not torch.isfinite(o[affected]).any(), "finite outputs that depend on a non-finite input"
            if torch.isnan(rows).any() or torch.isnan(w).any():
                nan_cols = (torch.isnan(rows) | torch.isnan(w)[:, None]).any(0).reshape(o.shape)
                assert torch.isnan(o[nan_cols]).all(), "a NaN input must give NaN"
            assert torch.isfinite(o[~affected]).all(), "non-finite outputs without a non-finite input"
            finite = finite and not affected.any()
        if finite:
            check_combine(out, g, weights)

    _run(be, run, 60, 20)


@pytest.mark.filterwarnings("ignore:overflow encountered in subtract:RuntimeWarning")  # v − max(v) → −inf
@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_project_simplex_properties(be):
    @given(
        st.sampled_from(tol.DTYPES),
        st.sampled_from(["contiguous", "transposed", "sliced", "offset", "expanded-rows", "expanded-columns", "batched"]),
        st.integers(1, 4 if be.interpreted else 12),
        st.integers(1, 5 if be.interpreted else 20),
        st.floats(0, 1),
        st.booleans(),
        st.sampled_from(POISONS),
        st.floats(0, 1),
        st.integers(0, 2**31 - 1),
    )
    def run(dtype, layout, rows, K, height, mixed, poison, where, seed):
        low, high = VALUE_EXPONENTS[dtype]
        exponent = low + (high - low) * height
        generator = torch.Generator().manual_seed(seed)
        top = float(torch.finfo(dtype).max)

        def fill(shape):
            values = _values(generator, shape, exponent, -30 if mixed else None)
            return _poisoned(values.clamp(-top, top).to(dtype), poison, where)

        v = {
            "contiguous": lambda: fill((rows, K)),
            "transposed": lambda: fill((K, rows)).T,
            "sliced": lambda: fill((rows, 2 * K))[:, ::2],
            "offset": lambda: fill((rows + 1, K + 2))[1:, 1:K + 1],
            "expanded-rows": lambda: fill((1, K)).expand(rows, K),
            "expanded-columns": lambda: fill((rows, 1)).expand(rows, K),  # ties: x = 1/K
            "batched": lambda: fill((2, rows, K)),
        }[layout]().to(be.device)
        x = molkernels.project_simplex(v, backend=be.backend)
        bad = ~torch.isfinite(v.cpu()).all(-1)
        assert torch.isnan(x.cpu()[bad]).all(), "a row with a non-finite entry must come back all NaN"
        if (~bad).any():
            check_projection(x[~bad.to(x.device)], v[~bad.to(v.device)])

    _run(be, run, 80, 25)


# The reference backend is FISTA with 20000 iterations, seconds per call: too slow for Hypothesis
# (test_min_norm.py tests it on its own).
@pytest.mark.parametrize("be", backend_params(exclude=("reference",)), indirect=True)
def test_min_norm_properties(be):
    @given(
        st.sampled_from(tol.DTYPES),
        st.sampled_from(["contiguous", "transposed", "sliced", "offset", "expanded-batch"]),
        st.integers(1, 4 if be.interpreted else 8),
        st.integers(1, 9),
        st.integers(1, 1 if be.interpreted else 3),
        st.floats(0, 1),
        st.sampled_from(POISONS),
        st.floats(0, 1),
        st.integers(0, 2**31 - 1),
    )
    def run(dtype, layout, K, rank, batch, height, poison, where, seed):
        low, high = VALUE_EXPONENTS[dtype]
        generator = torch.Generator().manual_seed(seed)
        A = torch.randn(batch, K, rank, generator=generator, dtype=torch.float64)
        G = A @ A.mT
        # largest diagonal entry 10^e (at most the dtype's largest value, with room for rounding)
        scale = min(10.0 ** (low + (high - low) * height), float(torch.finfo(dtype).max) / 2)
        G = (G / torch.diagonal(G, dim1=-2, dim2=-1).amax(-1)[:, None, None].clamp(min=1e-300) * scale).to(dtype)
        G = _poisoned(G, poison, where)
        if layout == "transposed":
            gram = G.mT
        elif layout == "sliced":
            gram = torch.zeros(batch, K, 2 * K, dtype=dtype)[..., ::2]
            gram.copy_(G)
        elif layout == "offset":
            gram = torch.zeros(batch, K + 1, K + 1, dtype=dtype)[:, 1:, 1:]
            gram.copy_(G)
        elif layout == "expanded-batch":
            gram = G[:1].expand(3, K, K)
        else:
            gram = G
        lam = molkernels.min_norm(gram.to(be.device), backend=be.backend).cpu()
        bad = ~torch.isfinite(gram).flatten(-2).all(-1)
        assert torch.isnan(lam[bad]).all(), "a non-finite Gram must give NaN weights"
        if (~bad).any():
            check_min_norm_kkt(lam[~bad], gram[~bad])

    _run(be, run, 60, 10)
