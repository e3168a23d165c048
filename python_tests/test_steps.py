"""moco_step, modo_step and mgda_step on every backend: against the DESIGN formulas written out
in float64 here, against the reference backend, through checkpoint/resume, and bad input."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

import molkernels as mk
from stacks import backend_params

SHAPES = [(3, 5), (7,), (1,), (2, 2, 3)]


def make_params(dtype, device="cpu"):
    return [torch.randn(s, dtype=dtype, device=device) for s in SHAPES]


def make_grads(params, K, *, scale=1.0):
    return [scale * torch.randn(K, *p.shape, dtype=p.dtype, device=p.device) for p in params]


def flat64(blocks):
    return torch.cat([b.reshape(b.shape[0], -1).double().cpu() for b in blocks], dim=1)


def simplex64(v):
    return mk.reference.project_simplex(v)


def state_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# Tolerances on parameters after a few steps: the kernels round p (and the state) to their dtypes.
# bf16 parameters are rounded at each of the 3 steps (u = 2^-8 each), the float64 trajectory never.
PARAM_TOL = {torch.float32: 2e-5, torch.bfloat16: 4e-2, torch.float64: 1e-12}
LAMBDA_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float64: 1e-12}


@pytest.mark.parametrize("be", backend_params(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("normalize", ["none", "l2", "loss", "loss+"])
def test_moco_matches_formula(be, dtype, normalize):
    """Y ← Y − β_t(Y − SG); λ ← Π(λ − γ_t(YYᵀ + ρI)λ); p ← p − lr·Yᵀλ, in float64 by hand."""
    K, beta, gamma, rho, lr = 3, 0.6, 0.3, 0.05, 0.1
    params = make_params(dtype, be.device)
    state = mk.MoCoState(params, K, dtype=state_dtype(dtype))
    p64 = flat64([p.unsqueeze(0) for p in params])[0]
    y64 = torch.zeros(K, p64.numel(), dtype=torch.float64)
    lam64 = torch.full((K,), 1.0 / K, dtype=torch.float64)
    for t in range(3):
        grads = make_grads(params, K)
        losses = torch.rand(K, device=be.device) + 0.5
        lam = mk.moco_step(params, grads, state, beta=beta, gamma=gamma, rho=rho, lr=lr, beta_decay=0.5,
                           gamma_decay=0.25, normalize=normalize, losses=losses, backend=be.backend)
        g64 = flat64(grads)
        norms = g64.norm(dim=1)
        s = {"none": torch.ones(K, dtype=torch.float64), "l2": 1 / norms, "loss": 1 / losses.double().cpu(),
             "loss+": losses.double().cpu() / norms}[normalize]
        beta_t, gamma_t = beta / (t + 1) ** 0.5, gamma / (t + 1) ** 0.25
        y64 = y64 - beta_t * (y64 - s[:, None] * g64)
        lam64 = simplex64(lam64 - gamma_t * (y64 @ y64.T @ lam64 + rho * lam64))
        p64 = p64 - lr * (y64.T @ lam64)
        assert torch.allclose(lam.double().cpu(), lam64, atol=LAMBDA_TOL[dtype], rtol=0), (t, lam, lam64)
    scale = p64.abs().max().item()
    got = flat64([p.unsqueeze(0) for p in params])[0]
    assert (got - p64).abs().max().item() <= PARAM_TOL[dtype] * max(1.0, scale)
    assert (state.y_flat.double().cpu() - y64).abs().max().item() <= PARAM_TOL[dtype] * max(1.0, y64.abs().max().item())
    assert state.step == 3


@pytest.mark.parametrize("be", backend_params(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moco_writes_grad_and_y_init_first(be, dtype):
    """lr=None overwrites p.grad with d; y_init='first' makes Y the first gradients (β_0 = 1)."""
    K = 2
    params = make_params(dtype, be.device)
    for p in params:
        p.grad = torch.full_like(p, float("nan"))  # overwritten, never read
    before = [p.clone() for p in params]
    state = mk.MoCoState(params, K, y_init="first", dtype=state_dtype(dtype))
    grads = make_grads(params, K)
    lam = mk.moco_step(params, grads, state, beta=0.1, gamma=0.0, backend=be.backend)
    g64 = flat64(grads)
    assert torch.allclose(state.y_flat.double().cpu(), g64, rtol=0, atol=1e-6)
    assert torch.equal(lam.cpu(), torch.full((K,), 0.5, dtype=lam.dtype))  # gamma = 0 keeps λ
    d = flat64([p.grad.unsqueeze(0) for p in params])[0]
    assert torch.allclose(d, 0.5 * g64.sum(0), rtol=1e-5, atol=1e-6)
    for p, b in zip(params, before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_moco_flat_buffer_equals_blocks(be):
    """A flat [K, D] gradient buffer (one launch for the model) gives bitwise the same step as the
    per-parameter blocks."""
    K = 4
    params_a = make_params(torch.float32, be.device)
    params_b = [p.clone() for p in params_a]
    buffer, views = mk.flat_buffer([p.shape for p in params_a], K, device=be.device)
    state_a, state_b = mk.MoCoState(params_a, K), mk.MoCoState(params_b, K)
    for _ in range(2):
        buffer.copy_(torch.randn_like(buffer))
        mk.moco_step(params_a, buffer, state_a, lr=0.1, backend=be.backend)
        mk.moco_step(params_b, [v.clone() for v in views], state_b, lr=0.1, backend=be.backend)
    for a, b in zip(params_a, params_b):
        assert torch.equal(a, b)


TRACK, REDUCE, SIMPLEX, COMBINE = ("_track_gram_kernel", "_reduce_partials_kernel", "_project_simplex_kernel",
                                   "_table_combine_kernel")
#: (tiles, normalize, dtype, K) -> the Triton kernels a first moco_step launches, in order
MOCO_STEP_LAUNCHES = {
    ("interpreter", "none", torch.float32, 3): [TRACK, REDUCE, SIMPLEX, COMBINE],
    ("interpreter", "l2", torch.float32, 3): ["_joint_gram_kernel", REDUCE, SIMPLEX, COMBINE],
    # Two row tiles of 16: the diagonal programs update y, a second launch multiplies tiles 0 and 1.
    ("sm_90", "none", torch.float64, 17): [TRACK, TRACK, REDUCE, SIMPLEX, COMBINE],
    # 64 rows: yy and yg in one read, gg in another.
    ("sm_90", "l2", torch.float32, 40): ["_joint_gram_kernel"] * 2 + [REDUCE, SIMPLEX, COMBINE],
    # float64 above 16 rows: gram(y), cross_gram(y, g), gram(g).
    ("sm_90", "l2", torch.float64, 17): ["_partial_products_kernel", REDUCE] * 3 + [SIMPLEX, COMBINE],
}


@pytest.mark.triton
@pytest.mark.parametrize("case", MOCO_STEP_LAUNCHES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_triton_moco_step_launches_do_not_grow_with_the_blocks(triton_launches, monkeypatch, case):
    """A first moco_step of a model of 100 tensors launches the same few Triton kernels as one of a
    single tensor (it made ≈ 2N + 12 when the passes launched per block), and takes the reference
    backend's step. Tiny blocks: the interpreter, which gives narrow blocks narrow tiles (one launch
    per tile width), gives all of them one width; with a GPU's tiles (`interpreted` patched to False
    in the launchers) there is one width whatever the blocks."""
    from conftest import INTERPRETED

    if not INTERPRETED:
        pytest.skip("runs the Triton kernels on CPU tensors under TRITON_INTERPRET=1")
    tiles, normalize, dtype, K = case
    if tiles == "sm_90":
        for name in ("gram", "moco", "combine"):
            monkeypatch.setattr(importlib.import_module(f"molkernels.triton.{name}"), "interpreted", lambda device: False)
    for n_blocks in (1, 100):
        shapes = [(j % 5 + 1,) if j % 2 else (j % 3 + 1, 2) for j in range(n_blocks)]
        params = [torch.randn(shape, dtype=dtype) for shape in shapes]
        grads = make_grads(params, K)
        expected = [p.clone() for p in params]
        triton_launches.clear()
        lam = mk.moco_step(params, grads, mk.MoCoState(params, K, dtype=dtype), lr=0.1, normalize=normalize,
                           backend="triton")
        assert triton_launches == MOCO_STEP_LAUNCHES[case], f"{n_blocks} blocks"
        lam_expected = mk.moco_step(expected, grads, mk.MoCoState(expected, K, dtype=dtype), lr=0.1,
                                    normalize=normalize, backend="reference")
        assert torch.allclose(lam, lam_expected, atol=LAMBDA_TOL[dtype], rtol=0)
        for got, want in zip(params, expected):
            assert torch.allclose(got, want, atol=PARAM_TOL[dtype], rtol=0)


@pytest.mark.parametrize("be", backend_params(), indirect=True)
@pytest.mark.parametrize("normalize", ["none", "loss+"])
def test_moco_resume_is_bitwise_identical(be, normalize):
    K = 3
    params = make_params(torch.float32, be.device)
    state = mk.MoCoState(params, K)
    grads = [make_grads(params, K) for _ in range(6)]
    losses = [torch.rand(K, device=be.device) + 0.1 for _ in range(6)]
    run = lambda ps, st, i: mk.moco_step(ps, grads[i], st, beta=0.3, gamma=0.2, lr=0.05, beta_decay=0.5,
                                         normalize=normalize, losses=losses[i], backend=be.backend)
    for i in range(3):
        run(params, state, i)
    checkpoint = {"params": [p.clone() for p in params], "state": copy.deepcopy(state.state_dict())}
    for i in range(3, 6):
        run(params, state, i)
    resumed_params = [p.clone() for p in checkpoint["params"]]
    resumed = mk.MoCoState(resumed_params, K)
    resumed.load_state_dict(checkpoint["state"])
    for i in range(3, 6):
        run(resumed_params, resumed, i)
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
    assert torch.equal(state.lam, resumed.lam) and torch.equal(state.y_flat, resumed.y_flat)
    assert resumed.step == state.step == 6


@pytest.mark.parametrize("be", backend_params(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_modo_matches_formula(be, dtype):
    """λ ← Π(λ − γ_t(G₁G₂ᵀ + ρI)λ), p ← p − lr·G₃ᵀλ."""
    K, gamma, rho, lr = 3, 0.4, 0.1, 0.2
    params = make_params(dtype, be.device)
    state = mk.MoDoState(params, K, dtype=state_dtype(dtype))
    p64 = flat64([p.unsqueeze(0) for p in params])[0]
    lam64 = torch.full((K,), 1.0 / K, dtype=torch.float64)
    for t in range(3):
        g1, g2, g3 = (make_grads(params, K) for _ in range(3))
        lam = mk.modo_step(params, g1, g2, g3, state, gamma=gamma, rho=rho, lr=lr, gamma_decay=0.5,
                           backend=be.backend)
        lam64 = simplex64(lam64 - gamma / (t + 1) ** 0.5 * (flat64(g1) @ flat64(g2).T @ lam64 + rho * lam64))
        p64 = p64 - lr * (flat64(g3).T @ lam64)
        assert torch.allclose(lam.double().cpu(), lam64, atol=LAMBDA_TOL[dtype], rtol=0)
    got = flat64([p.unsqueeze(0) for p in params])[0]
    assert (got - p64).abs().max().item() <= PARAM_TOL[dtype] * max(1.0, p64.abs().max().item())


@pytest.mark.parametrize("be", backend_params(), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_mgda_step_is_min_norm_direction(be, dtype):
    K = 5
    params = make_params(dtype, be.device)
    grads = make_grads(params, K)
    lam = mk.mgda_step(params, grads, backend=be.backend)
    g64 = flat64(grads)
    lam_ref = mk.reference.min_norm(g64 @ g64.T)
    f = lambda l: (l @ (g64 @ g64.T) @ l).item()
    assert f(lam.double().cpu()) <= f(lam_ref) * (1 + 1e-5) + 1e-9
    d = flat64([p.grad.unsqueeze(0) for p in params])[0]
    expected = g64.T @ lam.double().cpu()
    assert (d - expected).abs().max().item() <= PARAM_TOL[dtype] * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("be", backend_params(), indirect=True)
@pytest.mark.parametrize("normalize", ["l2", "loss", "loss+"])
def test_mgda_step_normalized(be, normalize):
    K = 3
    params = make_params(torch.float32, be.device)
    grads = make_grads(params, K)
    grads[0] = 100 * grads[0]          # one long gradient: without normalisation it gets no weight
    losses = torch.tensor([0.5, 2.0, 1.5], device=be.device)
    lam = mk.mgda_step(params, grads, normalize=normalize, losses=losses, backend=be.backend)
    g64 = flat64(grads)
    norms = g64.norm(dim=1)
    f64 = losses.double().cpu()
    scale = {"l2": 1 / norms, "loss": 1 / f64, "loss+": f64 / norms}[normalize]
    scaled = scale[:, None] * g64
    lam_ref = mk.reference.min_norm(scaled @ scaled.T)
    assert torch.allclose(lam.double().cpu(), lam_ref, atol=2e-5)
    d = flat64([p.grad.unsqueeze(0) for p in params])[0]
    expected = scaled.T @ lam_ref
    assert (d - expected).abs().max().item() <= 1e-4 * max(1.0, expected.abs().max().item())


def test_steps_with_every_optimizer_step_after_grad():
    """lr=None leaves p.grad for any torch optimizer."""
    K = 2
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.Adam(params, lr=0.01)
    state = mk.MoCoState(params, K)
    before = [p.detach().clone() for p in params]
    mk.moco_step(params, make_grads(params, K), state)
    opt.step()
    assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before))


def test_check_finite_raises_on_nan():
    K = 2
    params = make_params(torch.float32)
    grads = make_grads(params, K)
    grads[1][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="Gram"):
        mk.mgda_step(params, grads, check_finite=True)
    with pytest.raises(FloatingPointError):
        mk.moco_step(params, grads, mk.MoCoState(params, K), check_finite=True)
    # Without the check NaN propagates into the direction, never silently zeroed.
    mk.mgda_step(params, grads)
    assert torch.isnan(params[1].grad).any()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p, g, s: mk.moco_step(p, [x[:2] for x in g], s), "K = 2 objectives, the state has 3"),
        (lambda p, g, s: mk.moco_step(p, g[:-1], s), "3 blocks for 4 parameters"),
        (lambda p, g, s: mk.moco_step(p, [g[0].reshape(3, 5, 3)] + g[1:], s), r"grads\[0\]: shape"),
        (lambda p, g, s: mk.moco_step(p, g, s, lr=-1.0), "lr: expected a finite number >= 0"),
        (lambda p, g, s: mk.moco_step(p, g, s, lr=float("nan")), "lr: expected a finite number"),
        (lambda p, g, s: mk.moco_step(p, g, s, beta=-0.1), "beta: expected"),
        (lambda p, g, s: mk.moco_step(p, g, s, beta=1.5), "beta: expected a value in"),
        (lambda p, g, s: mk.moco_step(p, g, s, gamma=float("inf")), "gamma: expected"),
        (lambda p, g, s: mk.moco_step(p, g, s, normalize="max"), "normalize: expected one of"),
        (lambda p, g, s: mk.moco_step(p, g, s, normalize="loss"), "losses: normalize='loss' needs"),
        (lambda p, g, s: mk.moco_step(p, [x.double() for x in g], s), "need a torch.float64 tracking state"),
        (lambda p, g, s: mk.modo_step(p, g, g, None, mk.MoDoState(p, 3)), "grads3: MoDo needs three"),
        (lambda p, g, s: mk.modo_step(p, g, g, g, mk.MoDoState(p, 3), gamma=-1), "gamma: expected"),
        (lambda p, g, s: mk.MoCoState(p, 0), "num_objectives: expected an integer >= 1"),
        (lambda p, g, s: mk.MoCoState(p, 3, y_init="ones"), "y_init: expected"),
        (lambda p, g, s: mk.mgda_step([], g), "params: expected at least one parameter"),
        (lambda p, g, s: mk.mgda_step(p, g, normalize="max"), "normalize: expected one of"),
        (lambda p, g, s: mk.mgda_step(p, g, normalize="loss+"), "losses: normalize='loss\\+' needs"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    params = make_params(torch.float32)
    grads = make_grads(params, 3)
    state = mk.MoCoState(params, 3)
    snapshot = [p.clone() for p in params]
    with pytest.raises((ValueError, TypeError), match=match):
        call(params, grads, state)
    assert all(torch.equal(p, s) for p, s in zip(params, snapshot))  # nothing ran
    assert state.step == 0 and torch.equal(state.y_flat, torch.zeros_like(state.y_flat))


def test_load_state_dict_rejects_other_shapes():
    params = make_params(torch.float32)
    state = mk.MoCoState(params, 3)
    other = mk.MoCoState(params[:2], 3)
    with pytest.raises(ValueError, match="y has shape"):
        other.load_state_dict(state.state_dict())
    with pytest.raises(ValueError, match="objectives"):
        mk.MoCoState(params, 2).load_state_dict(state.state_dict())
