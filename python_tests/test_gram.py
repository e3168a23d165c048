"""molkernels.gram: Σ_blocks B Bᵀ against the float64 reference, on every backend, dtype and size."""

import pytest
import torch

import molkernels
import tolerances as tol
from stacks import (
    LARGE_D,
    layout_matrix,
    backend_params,
    cases,
    check_products,
    make_stack,
    poison_allocator,
    randint,
    randn,
    set_last_element,
    size_matrix,
)


@pytest.mark.parametrize("be,K,d,dtype", cases(size_matrix), indirect=["be"])
def test_sizes(be, K, d, dtype):
    g = randn(K, d, dtype=dtype, device=be.device)
    poison_allocator(K * K, device=be.device)
    G = molkernels.gram(g, backend=be.backend)
    check_products(G, g, None, tol.GRAM)


def _symmetry_cases(spec):
    large = size_matrix(spec, Ks=(33,), ds=(LARGE_D,), dtypes=(torch.float32,))[0][1]
    return [(K, d, dtype) for K in (2, 7, 33) for d in (17, large) for dtype in tol.DTYPES]


@pytest.mark.parametrize("be,K,d,dtype", cases(_symmetry_cases), indirect=["be"])
def test_exactly_symmetric(be, K, d, dtype):
    """G == Gᵀ bitwise (the contract: gram is symmetric), also for a list of odd blocks."""
    g = randn(K, d, dtype=dtype, device=be.device)
    G = molkernels.gram(g, backend=be.backend)
    assert torch.equal(G, G.T), f"G − Gᵀ has {(G != G.T).sum().item()} nonzero entries, max {(G - G.T).abs().max().item():.3g}"
    blocks = make_stack("mixed", K, dtype, be.device)
    G = molkernels.gram(blocks, backend=be.backend)
    assert torch.equal(G, G.T), f"G − Gᵀ has {(G != G.T).sum().item()} nonzero entries (mixed layout)"


@pytest.mark.parametrize(
    "be,layout,K,dtype",
    cases(layout_matrix),
    indirect=["be"],
)
def test_layouts(be, layout, K, dtype):
    """Lists of odd-shaped blocks, views of a flat buffer, non-contiguous blocks."""
    g = make_stack(layout, K, dtype, be.device)
    G = molkernels.gram(g, backend=be.backend)
    check_products(G, g, None, tol.GRAM)


@pytest.mark.parametrize("be,K,d,dtype", cases(size_matrix), indirect=["be"])
def test_exact_on_small_integers(be, K, d, dtype):
    """Small integers make every partial sum exact in fp32, so any dropped, repeated or misplaced
    element (a tail, a block boundary) shows as an exact mismatch, even for d = 100003."""
    g = randint(K, d, dtype=dtype, device=be.device)
    G = molkernels.gram(g, backend=be.backend)
    expected = molkernels.reference.gram(g.cpu()).to(tol.accum_dtype(dtype))
    assert torch.equal(G.cpu(), expected), f"max difference {(G.cpu() - expected).abs().max().item()}"


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_exact_on_small_integers_mixed_layout(be):
    g = make_stack("mixed", 5, torch.float32, be.device, fill=randint)
    G = molkernels.gram(g, backend=be.backend)
    expected = molkernels.reference.gram([b.cpu() for b in g]).to(torch.float32)
    assert torch.equal(G.cpu(), expected)


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_fp16_accumulates_in_fp32(be):
    """Squares of 3e4 overflow fp16 and squares of 1e-4 underflow it; fp32 accumulation holds both."""
    big = torch.full((3, 64), 3.0e4, dtype=torch.float16, device=be.device)
    small = torch.full((3, 64), 1.0e-4, dtype=torch.float16, device=be.device)
    for g in (big, small):
        G = molkernels.gram(g, backend=be.backend)
        check_products(G, g, None, tol.GRAM)
        assert (G > 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("layout", ["tensor", "mixed"])
@pytest.mark.parametrize("be", backend_params(), indirect=True)
@pytest.mark.parametrize("dtype", tol.DTYPES, ids=str)
def test_non_finite_propagates(be, dtype, layout, bad):
    """A NaN or Inf in objective 1's gradient poisons row and column 1 of G, and nothing else."""
    K = 5
    g = make_stack(layout, K, dtype, be.device, d=37)
    set_last_element(g, 1, bad)
    G = molkernels.gram(g, backend=be.backend).cpu()
    involved = torch.zeros(K, K, dtype=torch.bool)
    involved[1, :] = True
    involved[:, 1] = True
    assert not torch.isfinite(G[involved]).any(), f"row/column 1 should be non-finite:\n{G}"
    assert torch.isfinite(G[~involved]).all(), f"entries without objective 1 should be finite:\n{G}"
    if bad != bad:  # NaN
        assert torch.isnan(G[involved]).all()
    else:
        assert G[1, 1] == float("inf")


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_zero_stack(be):
    g = torch.zeros(4, 33, device=be.device)
    G = molkernels.gram(g, backend=be.backend)
    assert torch.equal(G.cpu(), torch.zeros(4, 4))


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_tuple_and_list_agree(be):
    g = make_stack("blocks", 3, torch.float32, be.device)
    assert torch.equal(molkernels.gram(tuple(g), backend=be.backend), molkernels.gram(list(g), backend=be.backend))


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_tensor_stack_with_trailing_shape(be):
    """A [K, 3, 5] tensor stack is one block of 15 columns."""
    g = randn(4, 3, 5, device=be.device)
    G = molkernels.gram(g, backend=be.backend)
    check_products(G, g, None, tol.GRAM)
