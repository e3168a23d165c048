"""molkernels.cross_gram: Σ_blocks A Bᵀ against the float64 reference, on every backend, dtype and size."""

import pytest
import torch

import molkernels
import tolerances as tol
from stacks import (
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
    a = randn(K, d, dtype=dtype, device=be.device)
    b = randn(K, d, dtype=dtype, device=be.device)
    poison_allocator(K * K, device=be.device)
    C = molkernels.cross_gram(a, b, backend=be.backend)
    check_products(C, a, b, tol.CROSS_GRAM)


@pytest.mark.parametrize(
    "be,layout,K,dtype",
    cases(layout_matrix),
    indirect=["be"],
)
def test_layouts(be, layout, K, dtype):
    """a and b with the same structure: odd blocks, flat-buffer views, non-contiguous blocks."""
    a = make_stack(layout, K, dtype, be.device)
    b = make_stack(layout, K, dtype, be.device)
    C = molkernels.cross_gram(a, b, backend=be.backend)
    check_products(C, a, b, tol.CROSS_GRAM)


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_different_layouts_same_structure(be):
    """a in one flat buffer, b as separate (partly non-contiguous) tensors of the same shapes."""
    a = make_stack("flat", 4, torch.float32, be.device)
    b = [randn(*x.shape, device=be.device) for x in a]
    b[0] = randn(4, 5, 3, device=be.device).transpose(1, 2)  # a[0] is [4, 3, 5]
    C = molkernels.cross_gram(a, b, backend=be.backend)
    check_products(C, a, b, tol.CROSS_GRAM)
    C = molkernels.cross_gram(b, a, backend=be.backend)
    check_products(C, b, a, tol.CROSS_GRAM)


@pytest.mark.parametrize("be,K,d,dtype", cases(size_matrix), indirect=["be"])
def test_exact_on_small_integers(be, K, d, dtype):
    a = randint(K, d, dtype=dtype, device=be.device)
    b = randint(K, d, dtype=dtype, device=be.device)
    C = molkernels.cross_gram(a, b, backend=be.backend)
    expected = molkernels.reference.cross_gram(a.cpu(), b.cpu()).to(tol.accum_dtype(dtype))
    assert torch.equal(C.cpu(), expected), f"max difference {(C.cpu() - expected).abs().max().item()}"


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_not_transposed(be):
    """C_ij = <a_i, b_j>, not <b_i, a_j>: with a = e-rows and b arbitrary, C = B's first columns."""
    K = 3
    a = torch.zeros(K, 8, device=be.device)
    a[0, 0] = a[1, 1] = a[2, 2] = 1.0
    b = randint(K, 8, device=be.device)
    C = molkernels.cross_gram(a, b, backend=be.backend).cpu()
    assert torch.equal(C, b.cpu()[:, :K].T)


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_matches_gram_when_a_is_b(be):
    g = make_stack("mixed", 5, torch.float32, be.device)
    C = molkernels.cross_gram(g, g, backend=be.backend)
    check_products(C, g, None, tol.CROSS_GRAM)
    G = molkernels.gram(g, backend=be.backend)
    torch.testing.assert_close(C, G, rtol=1e-5, atol=1e-5 * G.diagonal().max().item())


@pytest.mark.parametrize("side", ["a", "b"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("layout", ["tensor", "mixed"])
@pytest.mark.parametrize("be", backend_params(), indirect=True)
@pytest.mark.parametrize("dtype", tol.DTYPES, ids=str)
def test_non_finite_propagates(be, dtype, layout, bad, side):
    """A NaN/Inf in a_1 poisons row 1 of A Bᵀ; in b_1, column 1; nothing else."""
    K = 4
    a = make_stack(layout, K, dtype, be.device, d=29)
    b = make_stack(layout, K, dtype, be.device, d=29)
    set_last_element(a if side == "a" else b, 1, bad)
    C = molkernels.cross_gram(a, b, backend=be.backend).cpu()
    involved = torch.zeros(K, K, dtype=torch.bool)
    if side == "a":
        involved[1, :] = True
    else:
        involved[:, 1] = True
    assert not torch.isfinite(C[involved]).any(), f"\n{C}"
    assert torch.isfinite(C[~involved]).all(), f"\n{C}"
    if bad != bad:
        assert torch.isnan(C[involved]).all()
