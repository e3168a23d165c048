"""molkernels.combine: Σ_k w_k g_k against the float64 reference, on every backend, dtype and size."""

import pytest
import torch

import molkernels
import tolerances as tol
from stacks import (
    BLOCK_SHAPES,
    layout_matrix,
    as_list,
    backend_params,
    cases,
    check_combine,
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
    w = randn(K, dtype=torch.float32, device=be.device)
    poison_allocator(d * g.element_size() // 4, device=be.device)
    out = molkernels.combine(g, w, backend=be.backend)
    check_combine(out, g, w)


@pytest.mark.parametrize(
    "be,layout,K,dtype",
    cases(layout_matrix),
    indirect=["be"],
)
def test_layouts(be, layout, K, dtype):
    """A list gives a list of per-block outputs shaped like the blocks without K (a [K] block
    gives a 0-d tensor); a tensor stack gives one tensor of shape g.shape[1:]."""
    g = make_stack(layout, K, dtype, be.device)
    w = molkernels.reference.project_simplex(randn(K, dtype=torch.float64)).to(torch.float32).to(be.device)
    out = molkernels.combine(g, w, backend=be.backend)
    check_combine(out, g, w)
    if layout == "blocks":
        assert [tuple(o.shape) for o in out] == [tuple(s) for s in BLOCK_SHAPES]


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_tensor_stack_keeps_trailing_shape(be):
    g = randn(4, 3, 5, device=be.device)
    w = randn(4, device=be.device)
    out = molkernels.combine(g, w, backend=be.backend)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 5)
    check_combine(out, g, w)
    g_t = randn(4, 5, 3, device=be.device).transpose(1, 2)  # non-contiguous tensor stack
    out = molkernels.combine(g_t, w, backend=be.backend)
    assert out.shape == (3, 5)
    check_combine(out, g_t, w)


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_tuple_gives_list(be):
    g = tuple(make_stack("blocks", 3, torch.float32, be.device))
    w = randn(3, device=be.device)
    out = molkernels.combine(g, w, backend=be.backend)
    check_combine(out, list(g), w)


WEIGHT_DTYPES = [
    (torch.float32, torch.float64),
    (torch.float32, torch.float16),
    (torch.float64, torch.float32),
    (torch.float16, torch.float32),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float64),
    (torch.bfloat16, torch.bfloat16),
]


@pytest.mark.parametrize(
    "be,dtype,weights_dtype",
    cases(lambda spec: WEIGHT_DTYPES),
    indirect=["be"],
)
def test_weights_dtype(be, dtype, weights_dtype):
    """The weights may have any float dtype; the output has g's dtype."""
    K = 5
    g = make_stack("mixed", K, dtype, be.device)
    w = randn(K, dtype=weights_dtype, device=be.device)
    out = molkernels.combine(g, w, backend=be.backend)
    assert all(o.dtype == dtype for o in out)
    check_combine(out, g, w)


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_strided_weights(be):
    K = 6
    g = randn(K, 33, device=be.device)
    w = randn(2 * K, device=be.device)[::2]
    assert not w.is_contiguous()
    out = molkernels.combine(g, w, backend=be.backend)
    check_combine(out, g, w)


@pytest.mark.parametrize("be,K,d,dtype", cases(size_matrix), indirect=["be"])
def test_exact_on_small_integers(be, K, d, dtype):
    """Integer data and weights: every partial sum is exact, and |result| <= 4K fits every dtype
    exactly (bf16 holds integers up to 256), so the output equals the reference bitwise."""
    g = randint(K, d, dtype=dtype, device=be.device)
    w = randint(K, dtype=dtype, device=be.device)
    out = molkernels.combine(g, w, backend=be.backend)
    expected = molkernels.reference.combine(g.cpu(), w.cpu()).to(dtype)
    assert torch.equal(out.cpu(), expected), f"max difference {(out.cpu().double() - expected.double()).abs().max().item()}"


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_unit_weights_select_a_row(be):
    g = make_stack("mixed", 4, torch.float32, be.device)
    for k in range(4):
        w = torch.zeros(4, device=be.device)
        w[k] = 1.0
        out = molkernels.combine(g, w, backend=be.backend)
        for o, block in zip(out, g):
            assert torch.equal(o, block[k]), f"row {k}"


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_zero_weights_give_zeros(be):
    """All-zero weights give exact zeros for finite data."""
    g = make_stack("mixed", 3, torch.float16, be.device)
    out = molkernels.combine(g, torch.zeros(3, device=be.device), backend=be.backend)
    for o in out:
        assert torch.equal(o, torch.zeros_like(o))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("layout", ["tensor", "mixed"])
@pytest.mark.parametrize("be", backend_params(), indirect=True)
@pytest.mark.parametrize("dtype", tol.DTYPES, ids=str)
def test_non_finite_data_propagates(be, dtype, layout, bad):
    """A NaN in g_k reaches the output even when w_k = 0 (0·NaN = NaN: nothing is silently
    zeroed); an Inf with w_k ≠ 0 gives ±Inf. Other elements stay finite."""
    K = 4
    g = make_stack(layout, K, dtype, be.device, d=29)
    set_last_element(g, 1, bad)
    w = randn(K, device=be.device)
    if bad != bad:
        w[1] = 0.0
    out = molkernels.combine(g, w, backend=be.backend)
    blocks, outs = as_list(g), as_list(out)
    for j, (o, block) in enumerate(zip(outs, blocks)):
        poisoned = ~torch.isfinite(block[1]).cpu()
        o = o.cpu()
        if bad != bad:
            assert torch.isnan(o[poisoned]).all(), f"block {j}: NaN with weight 0 was dropped"
        else:
            assert torch.isinf(o[poisoned]).all(), f"block {j}"
        assert torch.isfinite(o[~poisoned]).all(), f"block {j}: a non-finite value leaked into other elements"
    assert sum(int((~torch.isfinite(b[1])).sum()) for b in blocks) == 1


@pytest.mark.parametrize("be", backend_params(), indirect=True)
@pytest.mark.parametrize("dtype", tol.DTYPES, ids=str)
def test_nan_weight_poisons_everything(be, dtype):
    K = 3
    g = make_stack("mixed", K, dtype, be.device)
    w = randn(K, device=be.device)
    w[2] = float("nan")
    out = molkernels.combine(g, w, backend=be.backend)
    for o in out:
        assert torch.isnan(o).all()


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_output_is_fresh_memory(be):
    """The outputs are new tensors: writing to them leaves g untouched (K = 1, w = 1 could
    otherwise be answered by a view)."""
    g = make_stack("mixed", 1, torch.float32, be.device)
    before = [b.clone() for b in g]
    out = molkernels.combine(g, torch.ones(1, device=be.device), backend=be.backend)
    for o in out:
        o.fill_(123.0)
    for b, b0 in zip(g, before):
        assert torch.equal(b, b0)


@pytest.mark.triton
def test_triton_combines_every_block_in_one_launch(triton_launches):
    """combine, combine_into and MoCo's second pass are one Triton launch for any number of blocks,
    from a tile table that the next call with the same blocks reuses."""
    from conftest import INTERPRETED

    if not INTERPRETED:
        pytest.skip("runs the Triton kernel on CPU tensors under TRITON_INTERPRET=1")
    import importlib

    combine_module = importlib.import_module("molkernels.triton.combine")
    K = 3
    g = [randn(K, *shape) for shape in [(5,), (0,), (4, 3), (1,), (33,)]]
    w = torch.rand(K)
    out = [torch.empty(b.shape[1:]) for b in g]
    for _ in range(2):
        combine_module.combine_into(g, w, out, 1.0, False)
    assert triton_launches == ["_table_combine_kernel"] * 2, f"{triton_launches} for two calls"
    tables = [table for key, (table, _) in importlib.import_module("molkernels.triton._launch")._TABLES.items()
              if key[0][0] == "combine"]
    assert tables[-1].shape == (4, 7), "one table row per program: four non-empty blocks of one tile each"
    for block, o in zip(g, out):
        torch.testing.assert_close(o, torch.einsum("k,k...->...", w, block))
