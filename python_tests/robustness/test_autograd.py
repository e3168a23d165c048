"""Autograd through the core ops (issue 14, item 8), on every backend.

gram, cross_gram and combine have backward formulas: torch.autograd.gradcheck in float64 on tensor
stacks and lists of odd, strided and non-contiguous blocks (and gradgradcheck), and the float32 and
16-bit gradients against the float64 formulas under the tolerance tables. min_norm and
project_simplex raise on backward instead of cutting the graph. The internal in-place ops refuse
tensors that require grad. The custom ops pass torch.library.opcheck with inputs that require
grad, and a compiled (fullgraph=True) loss through gram and combine backpropagates like eager.
"""

import re

import pytest
import torch

import molkernels
import tolerances as tol
from molkernels import _ops
from stacks import as_list, backend_params, cases, make_stack, randn

needs_c = pytest.mark.skipif(_ops._C is None, reason=f"the extension is not built: {_ops._C_ERROR}")

# --------------------------------------------------------------------------------------------------
# Inputs


def _layouts(spec):
    """(layout, K) pairs: a tensor stack (d = 17, odd) and the mixed list (views into one flat
    buffer, a transposed and a strided block, odd shapes, a [K] scalar block), K = 1 and 3; under
    the interpreter, where each block is a launch, the non-contiguous pair of blocks for the list."""
    lists = "noncontiguous" if spec.interpreted else "mixed"
    return [(layout, K) for layout in ("tensor", lists) for K in (1, 3)]


def _leaf_stack(layout, K, dtype, device):
    """make_stack's blocks as leaves that require grad (views keep their strides)."""
    return [b.requires_grad_() for b in as_list(make_stack(layout, K, dtype, device))]


def _gradcheck(fn, inputs):
    """gradcheck in float64, in fast mode: uᵀ J v for random u, v against finite differences, two
    evaluations per input instead of two per input element (the elementwise comparison of the
    gradients with their formulas is below, in every dtype)."""
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def _stack_arg(layout, blocks):
    """The stack as the user passes it: one tensor for the tensor layout, else the list."""
    return blocks[0] if layout == "tensor" else list(blocks)


# --------------------------------------------------------------------------------------------------
# gradcheck (float64)


@pytest.mark.parametrize("be,layout,K", cases(_layouts), indirect=["be"])
def test_gradcheck_gram(be, layout, K):
    blocks = _leaf_stack(layout, K, torch.float64, be.device)
    _gradcheck(lambda *g: molkernels.gram(_stack_arg(layout, g), backend=be.backend), blocks)


@pytest.mark.parametrize("be,layout,K", cases(_layouts), indirect=["be"])
def test_gradcheck_cross_gram(be, layout, K):
    a = _leaf_stack(layout, K, torch.float64, be.device)
    b = _leaf_stack(layout, K, torch.float64, be.device)
    n = len(a)

    def cross(*blocks):
        return molkernels.cross_gram(_stack_arg(layout, blocks[:n]), _stack_arg(layout, blocks[n:]), backend=be.backend)

    _gradcheck(cross, a + b)


@pytest.mark.parametrize("be,layout,K", cases(_layouts), indirect=["be"])
def test_gradcheck_combine(be, layout, K):
    blocks = _leaf_stack(layout, K, torch.float64, be.device)
    weights = randn(K, dtype=torch.float64, device=be.device).requires_grad_()

    def combine(w, *g):
        out = molkernels.combine(_stack_arg(layout, g), w, backend=be.backend)
        return out if layout == "tensor" else tuple(out)

    _gradcheck(combine, [weights] + blocks)


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_gradcheck_with_some_inputs_not_requiring_grad(be):
    """Only the blocks that require grad get a gradient; the others stay None."""
    trained = randn(3, 5, dtype=torch.float64, device=be.device).requires_grad_()
    frozen = randn(3, 2, 2, dtype=torch.float64, device=be.device)
    other = randn(3, 5, dtype=torch.float64, device=be.device)
    weights = randn(3, dtype=torch.float64, device=be.device).requires_grad_()
    _gradcheck(lambda x: molkernels.gram([x, frozen], backend=be.backend), [trained])
    _gradcheck(lambda x: molkernels.cross_gram([x, frozen], [other, frozen], backend=be.backend), [trained])
    _gradcheck(lambda x: molkernels.cross_gram([other, frozen], [x, frozen], backend=be.backend), [trained])
    _gradcheck(lambda w, x: tuple(molkernels.combine([frozen, x], w, backend=be.backend)), [weights, trained])
    G = molkernels.gram([trained, frozen], backend=be.backend)
    G.sum().backward()
    assert trained.grad is not None and frozen.grad is None


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_gradgradcheck(be):
    """The backward formulas are torch products, so second derivatives come for free."""
    blocks = [randn(3, 4, dtype=torch.float64, device=be.device).requires_grad_(),
              randn(3, 2, 1, dtype=torch.float64, device=be.device).requires_grad_()]
    others = [b.detach().clone().requires_grad_() for b in blocks]
    weights = randn(3, dtype=torch.float64, device=be.device).requires_grad_()
    check = lambda fn, inputs: torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)  # noqa: E731
    assert check(lambda *g: molkernels.gram(list(g), backend=be.backend), blocks)
    assert check(lambda *ab: molkernels.cross_gram(list(ab[:2]), list(ab[2:]), backend=be.backend), blocks + others)
    assert check(lambda w, *g: tuple(molkernels.combine(list(g), w, backend=be.backend)), [weights] + blocks)


# --------------------------------------------------------------------------------------------------
# float32 / 16-bit gradients against the float64 formulas


def _dtype_cases(spec):
    layouts = ("noncontiguous",) if spec.interpreted else ("tensor", "mixed")
    return [(layout, dtype) for layout in layouts for dtype in tol.DTYPES]


def _cpu64(x):
    return x.detach().cpu().to(torch.float64)


def _check_combine_shaped(grad, expected, magnitude, K, dtype, what):
    """A gradient that is a sum of K products per element (M @ B, w ⊗ c̄) against its float64
    value, under the combine tolerance: the fp32 accumulation, then rounding to dtype."""
    assert grad is not None, f"{what}: no gradient"
    assert grad.dtype == dtype, f"{what}: gradient in {grad.dtype}, the input is {dtype}"
    assert grad.shape == expected.shape, f"{what}: gradient of shape {tuple(grad.shape)}"
    t = tol.COMBINE[dtype]
    tiny = torch.finfo(dtype).smallest_normal * 2**-10
    bound = t.rtol * expected.abs() + (K + 2) * t.atol * magnitude + tiny
    error = (_cpu64(grad) - expected).abs()
    assert torch.isfinite(_cpu64(grad)).all(), f"{what}: non-finite gradient for finite input"
    assert (error <= bound).all(), f"{what}: worst excess {(error - bound).max().item():.3g}"


def _rows64(block):
    return _cpu64(block).reshape(block.shape[0], -1)


@pytest.mark.parametrize("be,layout,dtype", cases(_dtype_cases), indirect=["be"])
def test_gram_and_cross_gram_gradients_in_every_dtype(be, layout, dtype):
    """∂L/∂B_j = (Ḡ + Ḡᵀ) B_j for gram and C̄ B_j, C̄ᵀ A_j for cross_gram, in each block's dtype
    (bf16 blocks get bf16 gradients of their float32 Gram)."""
    K = 3
    a = _leaf_stack(layout, K, dtype, be.device)
    b = _leaf_stack(layout, K, dtype, be.device)
    upstream = randn(K, K, dtype=tol.accum_dtype(dtype), device=be.device)
    U = _cpu64(upstream)

    G = molkernels.gram(a, backend=be.backend)
    assert G.dtype == tol.accum_dtype(dtype)
    grads = torch.autograd.grad(G, a, upstream)
    S = U + U.T
    for j, (x, g) in enumerate(zip(a, grads)):
        B = _rows64(x)
        _check_combine_shaped(g, (S @ B).reshape(x.shape), (S.abs() @ B.abs()).reshape(x.shape), K, dtype,
                              f"gram: block {j}")

    C = molkernels.cross_gram(a, b, backend=be.backend)
    grads = torch.autograd.grad(C, a + b, upstream)
    for j, (x, y) in enumerate(zip(a, b)):
        A, B = _rows64(x), _rows64(y)
        _check_combine_shaped(grads[j], (U @ B).reshape(x.shape), (U.abs() @ B.abs()).reshape(x.shape), K, dtype,
                              f"cross_gram: a[{j}]")
        _check_combine_shaped(grads[len(a) + j], (U.T @ A).reshape(y.shape), (U.abs().T @ A.abs()).reshape(y.shape),
                              K, dtype, f"cross_gram: b[{j}]")


@pytest.mark.parametrize("be,layout,dtype", cases(_dtype_cases), indirect=["be"])
def test_combine_gradients_in_every_dtype(be, layout, dtype):
    """∂L/∂g_{k,j} = w_k c̄_j in each block's dtype; ∂L/∂w_k = Σ_j <g_{k,j}, c̄_j> in the weights'
    dtype, within the Gram tolerance (an inner product over all blocks)."""
    K = 3
    blocks = _leaf_stack(layout, K, dtype, be.device)
    weights = randn(K, dtype=torch.float32 if dtype != torch.float64 else dtype, device=be.device).requires_grad_()
    out = as_list(molkernels.combine(_stack_arg(layout, blocks), weights, backend=be.backend))
    upstream = [randn(o.numel(), dtype=dtype, device=be.device).reshape(o.shape) for o in out]
    *grad_g, grad_w = torch.autograd.grad(out, blocks + [weights], upstream)

    w = _cpu64(weights)
    for j, (x, c, g) in enumerate(zip(blocks, upstream, grad_g)):
        expected = torch.outer(w, _cpu64(c).reshape(-1)).reshape(x.shape)
        # one product per element: no accumulation, so K + 2 atol terms are loose here
        _check_combine_shaped(g, expected, expected.abs(), K, dtype, f"combine: g[{j}]")

    assert grad_w.dtype == weights.dtype and grad_w.shape == (K,)
    expected_w = sum(_rows64(x) @ _cpu64(c).reshape(-1) for x, c in zip(blocks, upstream))
    scale = torch.sqrt(sum((_rows64(x) ** 2).sum(1) for x in blocks)) * torch.sqrt(sum((_cpu64(c) ** 2).sum() for c in upstream))
    error = (_cpu64(grad_w) - expected_w).abs()
    bound = tol.GRAM[dtype] * scale + 2 * tol.u_out(weights.dtype) * expected_w.abs()
    assert (error <= bound).all(), f"combine: ∂w off by {error.tolist()}, bound {bound.tolist()}"


# --------------------------------------------------------------------------------------------------
# min_norm and project_simplex: not differentiable, and say so on backward


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_project_simplex_raises_on_backward(be):
    """The output stays in the graph (nothing is silently detached) with the values of the
    detached call, and backward raises naming the op. Before, the compiled ops' grad_fn gave None
    gradients with only a warning, and the reference backend differentiated its sort."""
    v = randn(4, 3, device=be.device).requires_grad_()
    x = molkernels.project_simplex(v, backend=be.backend)
    assert x.requires_grad, "the output was cut from the graph"
    assert torch.equal(x.detach(), molkernels.project_simplex(v.detach(), backend=be.backend))
    with pytest.raises(RuntimeError, match=r"^project_simplex is not differentiable: detach its input "
                                           r"\(project_simplex\(v\.detach\(\)\)\)"):
        x.sum().backward()
    assert v.grad is None


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_min_norm_raises_on_backward_and_detached_weights_backpropagate(be):
    """λ = min_norm(gram(g)) with g requiring grad stays in the graph, and backward through it
    raises naming the op, alone or through combine(g, λ) (before: None gradients with a warning
    on the compiled ops; on the reference backend a graph through thousands of FISTA iterations).
    With λ detached, g gets the gradient of the fixed-weight combination."""
    g = randn(3, 7, dtype=torch.float64, device=be.device).requires_grad_()
    lam = molkernels.min_norm(molkernels.gram(g, backend=be.backend), backend=be.backend)
    assert lam.requires_grad, "the output was cut from the graph"
    message = r"^min_norm is not differentiable: detach its input \(min_norm\(gram\.detach\(\)\)\)"
    with pytest.raises(RuntimeError, match=message):
        lam.sum().backward()
    with pytest.raises(RuntimeError, match=message):
        molkernels.combine(g, lam, backend=be.backend).sum().backward()
    g.grad = None
    lam = lam.detach()
    molkernels.combine(g, lam, backend=be.backend).sum().backward()
    assert torch.equal(g.grad, lam[:, None].expand(3, 7))


# --------------------------------------------------------------------------------------------------
# The internal in-place ops refuse tensors that require grad


def _internal_samples(device):
    """(op, args) for every internal op, float32, K = 3 objectives / C = 3 clients."""
    K, d = 3, 5
    g = lambda: [randn(K, d, device=device), randn(K, 2, 2, device=device)]  # noqa: E731
    outs = lambda: [torch.zeros(d, device=device), torch.zeros(2, 2, device=device)]  # noqa: E731
    weights = torch.rand(K, device=device)
    active = torch.tensor([True, False, True], device=device)
    clients = lambda: randn(3, d, device=device)  # noqa: E731
    return [
        ("combine_into", (g(), weights, outs(), 1.0, False)),
        ("moco_track_gram", (g(), g(), torch.tensor(0.5, device=device))),
        ("joint_gram", (g(), g())),
        ("moco_track_combine", (g(), g(), torch.ones(K, device=device), torch.tensor(0.5, device=device), weights, outs(),
                                -0.1, True)),
        ("fl_adam_step", (clients(), clients(), torch.zeros(3, d, device=device), torch.zeros(3, d, device=device),
                          torch.zeros(3, dtype=torch.int64, device=device), active, 1e-2, 0.9, 0.999, 1e-8, 0.0)),
        ("fl_sgd_step", (clients(), clients(), torch.zeros(3, d, device=device), active, 0.1, 0.9, 0.0)),
        ("fl_weighted_mean", (clients(), torch.rand(3, device=device), active)),
    ]


def _float_tensors(args):
    """(argument position, label suffix, tensor) of every float tensor argument."""
    for i, value in enumerate(args):
        if isinstance(value, list):
            yield from ((i, f"[{j}]", t) for j, t in enumerate(value))
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            yield i, "", value


def _internal_cases(spec):
    return [(name,) for name, _ in _internal_samples("cpu")]


@pytest.mark.parametrize("be,name", cases(_internal_cases), indirect=["be"])
def test_internal_ops_refuse_tensors_that_require_grad(be, name):
    """Each float tensor argument in turn requires grad: RuntimeError naming the op and the
    argument, before anything is written. Before, the compiled ops wrote outputs cut from the
    graph without a word. Under torch.no_grad() the same call runs."""
    run = _ops.op(name, be.backend)
    arguments = [a.name for a in getattr(torch.ops.molkernels, f"triton_{name}").default._schema.arguments]
    count = len(list(_float_tensors(dict(_internal_samples(be.device))[name])))
    for index in range(count):
        args = dict(_internal_samples(be.device))[name]
        tensors = list(_float_tensors(args))
        position, suffix, target = tensors[index]
        target.requires_grad_()
        before = [t.detach().clone() for _, _, t in tensors]
        label = f"{arguments[position]}{suffix}"
        with pytest.raises(RuntimeError, match="^" + re.escape(f"{name}: {label} requires grad")):
            run(*args)
        for (_, _, t), b in zip(tensors, before):
            assert torch.equal(t.detach(), b), f"{name}: a tensor changed before the error ({label} requires grad)"
        with torch.no_grad():
            run(*args)


# --------------------------------------------------------------------------------------------------
# opcheck with inputs that require grad, and torch.compile through the backward


def _differentiable_samples():
    K = 3
    a = [randn(K, 5), randn(K, 4, 2).transpose(1, 2)]
    b = [randn(K, 5), randn(K, 2, 4)]
    grad = lambda blocks: [x.detach().clone().requires_grad_() for x in blocks]  # noqa: E731
    A = randn(2, K, 5, dtype=torch.float64)
    return [
        ("gram", (grad(a),), True),
        ("cross_gram", (grad(a), grad(b)), True),
        ("combine", (grad(b), randn(K).requires_grad_()), True),
        ("min_norm", ((A @ A.transpose(-1, -2)).requires_grad_(),), False),
        ("project_simplex", (randn(4, K).requires_grad_(),), False),
    ]


def _opcheck(op, args, differentiable):
    # The non-differentiable ops' backward raises by design; AOT dispatch would backpropagate.
    utils = None if differentiable else ("test_schema", "test_autograd_registration", "test_faketensor")
    if utils is None:
        torch.library.opcheck(op, args)
    else:
        torch.library.opcheck(op, args, test_utils=utils)


@needs_c
@pytest.mark.parametrize("index", range(5), ids=[s[0] for s in _differentiable_samples()])
def test_opcheck_compiled_ops_with_grad(index):
    name, args, differentiable = _differentiable_samples()[index]
    _opcheck(getattr(torch.ops.molkernels, name).default, args, differentiable)


@pytest.mark.triton
@pytest.mark.parametrize("index", range(5), ids=[s[0] for s in _differentiable_samples()])
def test_opcheck_triton_ops_with_grad(index):
    if _ops.unavailable_reason("triton") is not None or torch.cuda.is_available():
        pytest.skip("the Triton ops run on CPU tensors only under the interpreter, without a GPU")
    name, args, differentiable = _differentiable_samples()[index]
    _opcheck(getattr(torch.ops.molkernels, f"triton_{name}").default, args, differentiable)


def _weighted_loss(blocks, weights, backend):
    """A loss through gram and combine: Σ G ⊙ M plus the combined direction's squared norm."""
    G = molkernels.gram(blocks, backend=backend)
    mask = torch.arange(G.numel(), dtype=G.dtype).reshape(G.shape)
    direction = molkernels.combine(blocks, weights, backend=backend)
    return (G * mask).sum() + sum((d.float() ** 2).sum() for d in direction)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_c), pytest.param("triton", marks=pytest.mark.triton)])
def test_compile_fullgraph_backpropagates(backend):
    """torch.compile(fullgraph=True) of a loss through gram and combine, then backward, gives
    eager's loss and gradients. The aot_eager backend traces what matters here (Dynamo, the fake
    implementations, AOTAutograd's joint forward/backward graph through the backward formulas)
    and runs the traced graph eagerly, so the results are bitwise eager's, without the minutes
    of C++ compilation Inductor's CPU code generation costs."""
    if _ops.unavailable_reason(backend) is not None or (backend == "triton" and torch.cuda.is_available()):
        pytest.skip(f"backend {backend!r} does not run on CPU tensors here")
    torch._dynamo.reset()
    blocks = [randn(3, 4, 5), randn(3, 7)]
    weights = torch.rand(3)
    compiled = torch.compile(_weighted_loss, fullgraph=True, dynamic=False, backend="aot_eager")
    results = []
    for fn in (compiled, _weighted_loss):
        leaves = [b.clone().requires_grad_() for b in blocks] + [weights.clone().requires_grad_()]
        loss = fn(leaves[:-1], leaves[-1], backend)
        loss.backward()
        results.append((loss.detach(), [x.grad for x in leaves]))
    (loss_compiled, grads_compiled), (loss_eager, grads_eager) = results
    assert torch.equal(loss_compiled, loss_eager)
    for compiled_grad, eager_grad in zip(grads_compiled, grads_eager):
        assert compiled_grad is not None and torch.equal(compiled_grad, eager_grad)
