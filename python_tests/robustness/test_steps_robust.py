"""Robustness of molkernels.moco_step, modo_step, mgda_step and their states (issue 14, items 5, 6,
7, 9, 10, 11, 12 and 14): bad arguments raise ValueError/TypeError naming the argument before any
kernel runs, with the state, the parameters and p.grad bitwise unchanged; parameters listed twice
or overlapping, and gradients aliasing what the step writes, are rejected; one tensor is one
parameter; in-place updates are visible to autograd; non-positive losses are rejected;
check_finite=True leaves everything unchanged on failure; load_state_dict checks everything
before it applies anything."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import molkernels as mk
from molkernels import _checks, _ops
from stacks import backend_params

K = 3
SHAPES = [(3, 5), (7,), (1,), (2, 2, 3)]
NAN, INF = float("nan"), float("inf")
STEPS = ("moco", "modo", "mgda")


def make_params(dtype=torch.float32, device="cpu"):
    return [torch.randn(s, dtype=dtype, device=device) for s in SHAPES]


def make_grads(params, K=K):
    return [torch.randn(K, *p.shape, dtype=p.dtype, device=p.device) for p in params]


def new_state(step: str, params, **kwargs):
    return {"moco": mk.MoCoState, "modo": mk.MoDoState, "mgda": lambda *a, **k: None}[step](params, K, **kwargs)


def run_step(step: str, params, grads, state, **kwargs):
    """One step of the named kind; MoDo takes `grads` as all three samples unless given."""
    if step == "moco":
        return mk.moco_step(params, grads, state, **kwargs)
    if step == "modo":
        samples = kwargs.pop("samples", (grads, grads, grads))
        return mk.modo_step(params, *samples, state, **kwargs)
    return mk.mgda_step(params, grads, **kwargs)


def snapshot(params, state):
    """Everything a step may change, copied: parameters, p.grad, and the state's tensors and count."""
    taken = {"params": [p.detach().clone() for p in params],
             "grads": [None if p.grad is None else p.grad.clone() for p in params]}
    if state is not None:
        taken["state"] = copy.deepcopy(state.state_dict())
    return taken


def assert_unchanged(params, state, before):
    after = snapshot(params, state)
    for j, (a, b) in enumerate(zip(after["params"], before["params"])):
        assert torch.equal(a, b), f"params[{j}] changed"
    for j, (a, b) in enumerate(zip(after["grads"], before["grads"])):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f"params[{j}].grad changed"
    if state is not None:
        for key, value in before["state"].items():
            got = after["state"][key]
            same = torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value
            assert same, f"state[{key!r}] changed: {got} vs {value}"


@pytest.fixture
def no_kernel(monkeypatch):
    """Fails the test if any kernel is reached."""

    def forbidden(name, backend):
        raise AssertionError(f"kernel {name!r} on {backend!r} was reached with a bad argument")

    monkeypatch.setattr(_ops, "op", forbidden)


# --------------------------------------------------------------------------------------------------
# Item 10 (and 14): every bad argument is named before any kernel runs; nothing changes


def _bad_calls():
    """(id, step, make_call, error, message start): make_call(params, grads, state) -> call()."""
    meta = torch.device("meta")
    cases = []
    for step in STEPS:
        cases += [
            (f"{step}-mixed-param-dtypes", step,
             lambda p, g, s: ([p[0], p[1].double(), *p[2:]], g, s, {}), TypeError, r"params\[1\]: dtype torch.float64"),
            (f"{step}-param-on-meta", step,
             lambda p, g, s: ([p[0], torch.empty(7, device=meta), *p[2:]], g, s, {}), ValueError, r"params\[1\]: on meta"),
            (f"{step}-non-leaf-param", step,
             lambda p, g, s: ([p[0] * torch.ones((), requires_grad=True), *p[1:]], g, s, {}), ValueError,
             r"params\[0\]: is not a leaf"),
            (f"{step}-non-contiguous-param-with-lr", step,
             lambda p, g, s: ([torch.randn(5, 3).T, *p[1:]], g, s, {"lr": 0.1}), ValueError,
             r"params\[0\]: must be contiguous"),
            (f"{step}-integer-param", step,
             lambda p, g, s: ([p[0].long(), *p[1:]], g, s, {}), TypeError, r"params\[0\]: expected float"),
            (f"{step}-params-None", step, lambda p, g, s: (None, g, s, {}), TypeError, r"params: expected a tensor"),
            (f"{step}-grads-on-meta", step,
             lambda p, g, s: (p, [g[0], g[1].to(meta), *g[2:]], s, {}), ValueError, r"grads\d?\[1\]: on meta"),
            (f"{step}-grads-int", step,
             lambda p, g, s: (p, [b.long() for b in g], s, {}), TypeError, r"grads\d?\[0\]: expected float"),
            (f"{step}-grads-wrong-shape", step,
             lambda p, g, s: (p, [g[0].reshape(K, 5, 3), *g[1:]], s, {}), ValueError, r"grads\d?\[0\]: shape"),
            (f"{step}-grads-sparse", step,
             lambda p, g, s: (p, [g[0].to_sparse(), *g[1:]], s, {}), TypeError, r"grads\d?\[0\]: expected a dense"),
            (f"{step}-lr-nan", step, lambda p, g, s: (p, g, s, {"lr": NAN}), ValueError, r"lr: expected a finite"),
            (f"{step}-lr-negative", step, lambda p, g, s: (p, g, s, {"lr": -1.0}), ValueError, r"lr: expected"),
            (f"{step}-backend", step, lambda p, g, s: (p, g, s, {"backend": "gpu"}), ValueError, r"backend: unknown"),
            (f"{step}-check_finite", step, lambda p, g, s: (p, g, s, {"check_finite": "yes"}), TypeError,
             r"check_finite: expected a bool"),
            # the collective comes after pass 1: an unusable group must be found before it
            (f"{step}-process_group", step, lambda p, g, s: (p, g, s, {"process_group": object()}), RuntimeError,
             r"process_group: torch.distributed is not initialised"),
        ]
    for step in ("moco", "modo"):
        cases += [
            (f"{step}-state-None", step, lambda p, g, s: (p, g, None, {}), TypeError, r"state: expected a Mo"),
            (f"{step}-other-shapes", step, lambda p, g, s: (p[:1] + [torch.randn(8)] + p[2:], g, s, {}), ValueError,
             r"params\[1\]: shape \(8,\), the state was created for \(7,\)"),
            (f"{step}-K", step, lambda p, g, s: (p, [b[:2] for b in g], s, {}), ValueError,
             r"grads\d?\[0\]: has K = 2 objectives"),
            (f"{step}-gamma", step, lambda p, g, s: (p, g, s, {"gamma": -1.0}), ValueError, r"gamma: expected"),
        ]
    cases += [
        ("moco-state-of-modo", "moco", lambda p, g, s: (p, g, mk.MoDoState(p, K), {}), TypeError,
         r"state: expected a MoCoState, got MoDoState"),
        ("modo-state-of-moco", "modo", lambda p, g, s: (p, g, mk.MoCoState(p, K), {}), TypeError,
         r"state: expected a MoDoState, got MoCoState"),
        ("moco-beta", "moco", lambda p, g, s: (p, g, s, {"beta": 1.5}), ValueError, r"beta: expected a value in"),
        ("moco-float64-grads", "moco", lambda p, g, s: (p, [b.double() for b in g], s, {}), TypeError,
         r"grads: torch.float64 gradients need a torch.float64 tracking state"),
        ("modo-grads2-dtype", "modo",
         lambda p, g, s: (p, g, s, {"samples": (g, [b.double() for b in g], g)}), TypeError,
         r"grads2: dtype torch.float64 differs from grads1's torch.float32"),
        ("mgda-grads-None", "mgda", lambda p, g, s: (p, None, s, {}), TypeError, r"grads: expected a tensor"),
    ]
    for step in ("moco", "mgda"):
        cases += [
            (f"{step}-normalize", step, lambda p, g, s: (p, g, s, {"normalize": "max"}), ValueError,
             r"normalize: expected one of"),
            (f"{step}-losses-missing", step, lambda p, g, s: (p, g, s, {"normalize": "loss"}), ValueError,
             r"losses: normalize='loss' needs"),
            (f"{step}-losses-shape", step,
             lambda p, g, s: (p, g, s, {"normalize": "loss+", "losses": torch.ones(K + 1)}), ValueError,
             r"losses: expected 3 values"),
            (f"{step}-loss-zero", step,
             lambda p, g, s: (p, g, s, {"normalize": "loss", "losses": [1.0, 0.0, 2.0]}), ValueError,
             r"losses\[1\]: normalize='loss' needs finite losses > 0"),
            (f"{step}-loss-negative", step,
             lambda p, g, s: (p, g, s, {"normalize": "loss+", "losses": torch.tensor([1.0, 2.0, -0.5])}), ValueError,
             r"losses\[2\]: normalize='loss\+' needs finite losses > 0"),
            (f"{step}-loss-nan", step,
             lambda p, g, s: (p, g, s, {"normalize": "loss+", "losses": torch.tensor([NAN, 2.0, 1.0])}), ValueError,
             r"losses\[0\]: "),
            (f"{step}-loss-inf", step,
             lambda p, g, s: (p, g, s, {"normalize": "loss", "losses": (1.0, INF, 1.0)}), ValueError, r"losses\[1\]: "),
        ]
    return [pytest.param(*case[1:], id=case[0]) for case in cases]


@pytest.mark.parametrize("step, make_call, error, message", _bad_calls())
def test_bad_argument_is_named_and_nothing_changes(step, make_call, error, message, no_kernel):
    """A bad argument raises, with a message that starts with its name, before any kernel (the
    kernels are replaced by a failing stub), and the parameters, p.grad and the state are bitwise
    as before. (Before the fix, mixed parameter dtypes failed inside the kernels as 'out[1]: dtype
    differs' with Y already moved, and non-positive losses were accepted.)"""
    params = make_params()
    for p in params:
        p.grad = torch.randn_like(p)
    grads = make_grads(params)
    state = new_state(step, params)
    before = snapshot(params, state)
    p, g, s, kwargs = make_call(params, grads, state)
    with pytest.raises(error, match="^" + message):
        run_step(step, p, g, s, **kwargs)
    assert_unchanged(params, state, before)


@pytest.mark.parametrize("late", [{"backend": "gpu"}, {"normalize": "loss", "losses": [1.0, -1.0, 1.0]}],
                         ids=["backend", "losses"])
def test_bad_argument_after_real_steps_leaves_moved_state_unchanged(late, monkeypatch):
    """With a state that has moved (Y ≠ 0, λ ≠ 1/K, step = 2), an argument checked last still
    changes nothing and reaches no kernel."""
    params = make_params()
    state = mk.MoCoState(params, K)
    for _ in range(2):
        mk.moco_step(params, make_grads(params), state, gamma=0.5, lr=0.1)
    before = snapshot(params, state)
    monkeypatch.setattr(_ops, "op", lambda name, backend: pytest.fail(f"kernel {name!r} was reached"))
    with pytest.raises(ValueError, match=r"^(backend|losses\[1\]): "):
        mk.moco_step(params, make_grads(params), state, lr=0.1, **late)
    assert_unchanged(params, state, before)


def test_raw_messages_are_named():
    params = make_params()
    with pytest.raises(TypeError, match=r"^params: expected a tensor or an iterable of tensors, got NoneType"):
        mk.mgda_step(None, make_grads(params))
    with pytest.raises(TypeError, match=r"^params: expected a tensor or an iterable of tensors, got NoneType"):
        mk.MoCoState(None, K)
    with pytest.raises(TypeError, match=r"^params: expected a tensor or an iterable of tensors, got dict"):
        mk.MoDoState({"w": params[0]}, K)
    with pytest.raises(TypeError, match=r"^params\[0\]: expected a torch.Tensor, got float"):
        mk.mgda_step([1.0], make_grads(params))


# --------------------------------------------------------------------------------------------------
# Item 5: parameters listed twice or overlapping, gradients aliasing what the step writes


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("lr", [None, 0.1])
def test_parameter_listed_twice_is_rejected(step, lr, no_kernel):
    """[w, w] raced between threads (6 different results in 30 runs before the fix)."""
    w = torch.randn(5)
    params = [w, w]
    grads = [torch.randn(K, 5), torch.randn(K, 5)]
    state = None
    if step != "mgda":
        with pytest.raises(ValueError, match=r"^params\[1\]: overlaps params\[0\]"):
            new_state(step, params)
        state = new_state(step, [torch.randn(5), torch.randn(5)])
    before = snapshot(params, state)
    with pytest.raises(ValueError, match=r"^params\[1\]: overlaps params\[0\]"):
        run_step(step, params, grads, state, lr=lr)
    assert_unchanged(params, state, before)


@pytest.mark.parametrize("step", STEPS)
def test_overlapping_views_are_rejected_disjoint_views_accepted(step):
    """Views of one buffer: overlapping ranges are rejected, naming both positions; a model whose
    parameters are disjoint views of one flat buffer steps as usual."""
    buffer = torch.randn(12)
    overlapping = [buffer[:3], buffer[3:8], buffer[6:12]]
    with pytest.raises(ValueError, match=r"^params\[2\]: overlaps params\[1\]"):
        run_step(step, overlapping, [torch.randn(K, 3), torch.randn(K, 5), torch.randn(K, 6)],
                 new_state(step, [torch.randn(3), torch.randn(5), torch.randn(6)]), lr=0.1)
    disjoint = [buffer[:3], buffer[3:8], buffer[8:12]]
    grads = [torch.randn(K, 3), torch.randn(K, 5), torch.randn(K, 4)]
    run_step(step, disjoint, grads, new_state(step, disjoint), lr=0.1)


@pytest.mark.parametrize("step", STEPS)
def test_gradients_aliasing_the_parameters_are_rejected_with_lr(step, no_kernel):
    """With lr the step writes the parameters while reading the gradients: a gradient block in the
    parameters' memory is rejected; with lr=None the parameters are not written, so it is fine."""
    memory = torch.randn(K + 1, 4)
    param = memory[0]  # a contiguous leaf view
    grads = [memory[:K]]  # rows 0..K-1: row 0 is the parameter itself
    state = new_state(step, [param])
    before = snapshot([param], state)
    with pytest.raises(ValueError, match=r"^grads\d?\[0\]: overlaps params\[0\]"):
        run_step(step, [param], grads, state, lr=0.1)
    assert_unchanged([param], state, before)


@pytest.mark.parametrize("step", STEPS)
def test_gradients_aliasing_p_grad_are_rejected(step, no_kernel):
    """With lr=None the step overwrites p.grad while reading the gradients."""
    param = torch.randn(4)
    grads = torch.randn(K, 4)
    param.grad = grads[1]
    state = new_state(step, [param])
    before = snapshot([param], state)
    with pytest.raises(ValueError, match=r"^grads\d?\[0\]: overlaps params\[0\].grad"):
        run_step(step, [param], [grads], state)
    assert_unchanged([param], state, before)


def test_gradients_aliasing_the_tracking_state_are_rejected(no_kernel):
    params = make_params()
    state = mk.MoCoState(params, K)
    with pytest.raises(ValueError, match=r"^grads\[0\]: overlaps state.y"):
        mk.moco_step(params, state.y, state)
    assert state.step == 0


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 12)), min_size=1, max_size=12))
def test_overlap_check_matches_pairwise_ranges(ranges):
    """check_disjoint (sorted by address) against the pairwise definition: parameters that are
    1-D views [start, start + length) of one buffer are rejected exactly when two of the non-empty
    ones intersect, and the error names such a pair, the later position first."""
    buffer = torch.zeros(60)
    views = [buffer[start:start + length] for start, length in ranges]
    pairs = [(i, j) for j in range(len(ranges)) for i in range(j)
             if ranges[i][1] and ranges[j][1]
             and max(ranges[i][0], ranges[j][0]) < min(sum(ranges[i]), sum(ranges[j]))]
    labelled = [(f"params[{j}]", v) for j, v in enumerate(views)]
    if not pairs:
        _checks.check_disjoint(labelled)
        return
    with pytest.raises(ValueError) as error:
        _checks.check_disjoint(labelled)
    named = [int(part.split("]")[0]) for part in str(error.value).split("params[")[1:]]
    assert len(named) == 2 and (named[1], named[0]) in pairs, (str(error.value), pairs)


# --------------------------------------------------------------------------------------------------
# Item 6: one tensor is one parameter


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("flat_grads", [False, True])
def test_a_bare_tensor_is_one_parameter(step, flat_grads):
    """mgda_step(p, g) and MoCoState(p, K) took p's rows as parameters and left p.grad None; now
    they equal the one-element list."""
    p = torch.randn(4, 3)
    q = p.clone()
    g = torch.randn(K, 12) if flat_grads else torch.randn(K, 4, 3)
    state_p, state_q = new_state(step, p), new_state(step, [q])
    if state_p is not None:
        assert state_p.shapes == [torch.Size([4, 3])]
    lam_p = run_step(step, p, g, state_p, gamma=0.3) if step != "mgda" else run_step(step, p, g, None)
    lam_q = run_step(step, [q], g, state_q, gamma=0.3) if step != "mgda" else run_step(step, [q], g, None)
    assert p.grad is not None and torch.equal(p.grad, q.grad)
    assert torch.equal(lam_p, lam_q)


# --------------------------------------------------------------------------------------------------
# Item 7: the in-place updates are visible to autograd


@pytest.mark.parametrize("be", backend_params(), indirect=True)
@pytest.mark.parametrize("step", STEPS)
def test_update_with_lr_invalidates_older_graphs(be, step):
    """A graph that saved p, then a step with lr: backward raises autograd's usual error (as after
    torch.optim's step), instead of using the new weights with the old graph."""
    p = torch.nn.Parameter(torch.randn(6, device=be.device))
    state = new_state(step, [p])
    loss = (p ** 2).sum()  # saves p for backward
    version = p._version
    run_step(step, [p], torch.randn(K, 6, device=be.device), state, lr=0.1, backend=be.backend)
    assert p._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    if step == "moco":
        y_version = state.y_flat._version
        run_step(step, [p], torch.randn(K, 6, device=be.device), state, backend=be.backend)
        assert state.y_flat._version > y_version and state.y[0]._version > y_version


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_p_grad_written_in_place_bumps_its_version(be):
    p = torch.nn.Parameter(torch.randn(6, device=be.device))
    p.grad = torch.zeros(6, device=be.device)
    grad, version = p.grad, p.grad._version
    g = torch.randn(K, 6, device=be.device)
    mk.modo_step([p], g, g, g, mk.MoDoState([p], K), backend=be.backend)
    assert p.grad is grad and grad._version > version


@pytest.mark.parametrize("be", backend_params(), indirect=True)
@pytest.mark.parametrize("aggregator", [mk.mol.UPGrad, lambda: mk.mol.Linear([1.0, 2.0, 3.0])], ids=["UPGrad", "Linear"])
def test_mol_backward_bumps_the_version_of_the_p_grad_it_reuses(be, aggregator):
    """mol.backward writes the direction into an existing p.grad (base.write_direction) through the
    kernels' raw pointers: its version counter moves, as after the steps."""
    p = torch.nn.Parameter(torch.randn(6, device=be.device))
    p.grad = torch.zeros(6, device=be.device)
    grad, version = p.grad, p.grad._version
    losses = torch.stack([(p ** (k + 1)).sum() for k in range(K)])
    mk.mol.backward(losses, [p], aggregator(), backend=be.backend)
    assert p.grad is grad and grad._version > version


def test_steps_accept_gradients_that_require_grad():
    """The steps take no part in autograd (they run under no_grad): gradients that carry a graph
    (autograd.grad(create_graph=True)) are read like any others, the direction has no graph."""
    params = make_params()
    grads = [b.requires_grad_() for b in make_grads(params)]
    mk.mgda_step(params, grads)
    assert all(p.grad is not None and not p.grad.requires_grad for p in params)


# --------------------------------------------------------------------------------------------------
# Item 9: non-positive losses on the device (no host read): NaN, or an error with check_finite


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CPU losses are checked eagerly")
@pytest.mark.parametrize("step", ["moco", "mgda"])
def test_device_losses_that_are_not_positive_give_nan(step):
    params = make_params(device="cuda")
    state = new_state(step, params)
    losses = torch.tensor([1.0, -1.0, 2.0], device="cuda")
    lam = run_step(step, params, make_grads(params), state, normalize="loss", losses=losses)
    assert torch.isnan(lam).all() and all(torch.isnan(p.grad).all() for p in params)
    with pytest.raises(ValueError, match=r"^losses\[1\]: "):
        run_step(step, params, make_grads(params), new_state(step, params), normalize="loss", losses=losses,
                 check_finite=True)


# --------------------------------------------------------------------------------------------------
# Item 11: check_finite=True raises before anything is written


def _nan_grads(params, k, value=NAN):
    grads = make_grads(params)
    grads[1][k, 2] = value
    return grads


@pytest.mark.parametrize("be", backend_params(), indirect=True)
@pytest.mark.parametrize("normalize", ["none", "l2"])
@pytest.mark.parametrize("lr", [None, 0.1])
def test_moco_check_finite_keeps_the_state(be, normalize, lr):
    """Before the fix Y absorbed the NaN before the error, so every later λ was NaN. Now the error
    names the objective, Y, λ, step, the parameters and p.grad are unchanged, and the next clean
    step is bitwise the step of a run that never saw the bad batch."""
    params = make_params(device=be.device)
    for p in params:
        p.grad = torch.randn_like(p)
    state = mk.MoCoState(params, K)
    kwargs = dict(gamma=0.3, lr=lr, normalize=normalize, check_finite=True, backend=be.backend)
    mk.moco_step(params, make_grads(params), state, **kwargs)
    twin_params = [p.detach().clone() for p in params]
    for p, t in zip(params, twin_params):
        t.grad = p.grad.clone()
    twin = mk.MoCoState(twin_params, K)
    twin.load_state_dict(state.state_dict())
    before = snapshot(params, state)
    for value in (NAN, INF):
        with pytest.raises(FloatingPointError, match=r"^grads: objective 2 has a non-finite gradient"):
            mk.moco_step(params, _nan_grads(params, 2, value), state, **kwargs)
        assert_unchanged(params, state, before)
    clean = make_grads(params)
    lam = mk.moco_step(params, clean, state, **kwargs)
    lam_twin = mk.moco_step(twin_params, clean, twin, **kwargs)
    assert torch.isfinite(lam).all() and torch.equal(lam, lam_twin)
    assert torch.equal(state.y_flat, twin.y_flat)
    for p, t in zip(params, twin_params):
        assert torch.equal(p, t) and torch.equal(p.grad, t.grad)


def test_check_finite_names_every_bad_objective_and_overflow():
    params = make_params()
    grads = make_grads(params)
    grads[0][0, 0, 0] = NAN
    grads[3][2, 1, 1, 1] = -INF
    with pytest.raises(FloatingPointError, match=r"^grads: objectives 0, 2 have non-finite gradients"):
        mk.mgda_step(params, grads, check_finite=True)
    huge = [torch.full_like(b, 1e20) for b in make_grads(params)]  # finite, but ‖g‖² > float32's max
    with pytest.raises(FloatingPointError, match=r"^grads: objectives 0, 1, 2 have gradients whose squared norm"):
        mk.mgda_step(params, huge, check_finite=True)
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("be", backend_params(), indirect=True)
@pytest.mark.parametrize("bad", ["grads1", "grads2", "grads3"])
def test_modo_check_finite_writes_nothing(be, bad):
    params = make_params(device=be.device)
    state = mk.MoDoState(params, K)
    samples = {name: make_grads(params) for name in ("grads1", "grads2", "grads3")}
    samples[bad][2][1, 0] = NAN
    before = snapshot(params, state)
    with pytest.raises(FloatingPointError, match=rf"^{bad}: objective 1 has a non-finite gradient"):
        mk.modo_step(params, samples["grads1"], samples["grads2"], samples["grads3"], state, lr=0.1,
                     check_finite=True, backend=be.backend)
    assert_unchanged(params, state, before)


@pytest.mark.parametrize("be", backend_params(), indirect=True)
def test_mgda_check_finite_writes_nothing(be):
    params = make_params(device=be.device)
    params[0].grad = torch.randn_like(params[0])  # kept; the others stay None (no garbage allocated)
    before = snapshot(params, None)
    with pytest.raises(FloatingPointError, match=r"^grads: objective 0 has a non-finite gradient"):
        mk.mgda_step(params, _nan_grads(params, 0), check_finite=True, backend=be.backend)
    assert_unchanged(params, None, before)


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(exponent=st.integers(-30, 30), bad=st.sampled_from([None, NAN, INF, -INF]),
       k=st.integers(0, K - 1), normalize=st.sampled_from(["none", "l2", "loss+"]))
def test_moco_check_finite_property(exponent, bad, k, normalize):
    """Over gradient magnitudes 1e-30..1e30 and a non-finite entry anywhere: the step either raises
    FloatingPointError with everything unchanged, or returns finite λ >= 0; a non-finite gradient
    always raises, naming its objective."""
    torch.manual_seed(exponent + 100 * k)
    params = [torch.randn(5), torch.randn(2, 3)]
    grads = [torch.randn(K, 5) * 10.0 ** exponent, torch.randn(K, 2, 3) * 10.0 ** exponent]
    if bad is not None:
        grads[1][k, 1, 2] = bad
    state = mk.MoCoState(params, K)
    mk.moco_step(params, [torch.randn_like(b) for b in grads], state, lr=0.01)
    before = snapshot(params, state)
    try:
        lam = mk.moco_step(params, grads, state, lr=0.01, normalize=normalize, losses=[1.0, 2.0, 0.5],
                           check_finite=True)
    except FloatingPointError as error:
        assert_unchanged(params, state, before)
        if bad is not None:
            assert str(error).startswith(f"grads: objective {k} has a non-finite gradient"), str(error)
        return
    assert bad is None, "a non-finite gradient passed check_finite"
    assert torch.isfinite(lam).all() and (lam >= 0).all()


# --------------------------------------------------------------------------------------------------
# Item 12: load_state_dict checks every entry, then applies all of it or nothing


def _trained_moco_state():
    params = make_params()
    state = mk.MoCoState(params, K)
    for _ in range(2):
        mk.moco_step(params, make_grads(params), state, gamma=0.5, lr=0.1)
    return params, state


def _corruptions():
    """(id, change of a MoCo state_dict, error, message start)."""
    def put(key, value):
        return lambda s: s.__setitem__(key, value)

    return [
        ("lam-float64", lambda s: s.__setitem__("lam", s["lam"].double()), TypeError,
         r"state\['lam'\]: dtype torch.float64, this state's is torch.float32"),
        ("lam-broadcast", put("lam", torch.tensor([1.0])), ValueError, r"state\['lam'\]: lam has shape \(1,\)"),
        ("lam-2d", put("lam", torch.full((1, K), 1 / K)), ValueError, r"state\['lam'\]: lam has shape \(1, 3\)"),
        ("lam-negative", put("lam", torch.tensor([-0.5, 1.0, 0.5])), ValueError, r"state\['lam'\]: λ must be finite and >= 0"),
        ("lam-nan", put("lam", torch.tensor([NAN, 0.5, 0.5])), ValueError, r"state\['lam'\]: λ must be finite"),
        ("lam-sum", put("lam", torch.tensor([0.5, 0.5, 0.5])), ValueError, r"state\['lam'\]: λ must sum to 1"),
        ("lam-list", put("lam", [1 / K] * K), TypeError, r"state\['lam'\]: expected a tensor"),
        ("step-negative", put("step", -1), ValueError, r"state\['step'\]: expected a step count >= 0"),
        ("step-fraction", put("step", 2.5), TypeError, r"state\['step'\]: expected an int"),
        ("step-bool", put("step", True), TypeError, r"state\['step'\]: expected an int"),
        ("step-tensor", put("step", torch.tensor(2)), TypeError, r"state\['step'\]: expected an int"),
        ("y-broadcast", lambda s: s.__setitem__("y", s["y"][:, :1].clone()), ValueError, r"state\['y'\]: y has shape"),
        ("y-float64", lambda s: s.__setitem__("y", s["y"].double()), TypeError, r"state\['y'\]: dtype torch.float64"),
        ("y-nan", lambda s: s["y"].__setitem__((0, 0), NAN), ValueError, r"state\['y'\]: the tracked gradients"),
        ("y_init", put("y_init", "ones"), ValueError, r"state\['y_init'\]: expected 'zero' or 'first'"),
        ("K", put("num_objectives", 2), ValueError, r"state\['num_objectives'\]: saved with 2 objectives"),
        ("shapes", put("shapes", [[5, 3], [7], [1], [2, 2, 3]]), ValueError,
         r"state\['shapes'\]: saved for parameters of shapes \[\(5, 3\)"),
        ("shapes-type", put("shapes", "(3, 5)"), TypeError, r"state\['shapes'\]: expected a list of shapes"),
        ("missing", lambda s: s.pop("y"), ValueError, r"state: missing keys \['y'\]"),
        ("unknown", put("beta", 0.5), ValueError, r"state: unknown keys \['beta'\]"),
        ("modo-dict", lambda s: (s.clear(), s.update(mk.MoDoState(make_params(), K).state_dict())), ValueError,
         r"state: missing keys \['y', 'y_init'\]"),
    ]


@pytest.mark.parametrize("change, error, message", [pytest.param(*c[1:], id=c[0]) for c in _corruptions()])
def test_moco_load_state_dict_rejects_and_changes_nothing(change, error, message):
    """Each corruption raises naming the key, and the state is bitwise unchanged: nothing applied
    (before the fix a float64 λ was cast, [1.] broadcast to every entry, step -1 or 2.5 accepted,
    and λ applied before y was found wrong)."""
    params, state = _trained_moco_state()
    saved = copy.deepcopy(state.state_dict())
    saved["lam"] = torch.tensor([0.2, 0.3, 0.5])  # a valid λ that differs from the state's: must not be applied
    change(saved)
    before = snapshot(params, state)
    with pytest.raises(error, match="^" + message):
        state.load_state_dict(saved)
    assert_unchanged(params, state, before)


def test_modo_load_state_dict_rejects_a_moco_dict():
    params = make_params()
    state = mk.MoDoState(params, K)
    with pytest.raises(ValueError, match=r"^state: unknown keys \['y', 'y_init'\]"):
        state.load_state_dict(mk.MoCoState(params, K).state_dict())
    with pytest.raises(TypeError, match=r"^state: expected a dict"):
        state.load_state_dict([("lam", state.lam)])
    assert torch.equal(state.lam, torch.full((K,), 1 / K)) and state.step == 0


def test_load_state_dict_round_trip_and_device_copy():
    """A valid dict loads (values copied, not aliased) and resumes bitwise; the shapes entry is
    plain ints (torch.load(weights_only=True) reads it)."""
    params, state = _trained_moco_state()
    saved = state.state_dict()
    assert saved["shapes"] == [list(s) for s in SHAPES]
    other = mk.MoCoState([p.clone() for p in params], K)
    other.load_state_dict(saved)
    saved["y"].zero_()
    assert not torch.equal(other.y_flat, saved["y"])
    assert torch.equal(other.y_flat, state.y_flat) and torch.equal(other.lam, state.lam) and other.step == 2


@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(st.lists(st.floats(0.0, 10.0, width=32), min_size=K, max_size=K).filter(lambda w: sum(w) > 0),
       st.integers(0, K - 1), st.sampled_from([0.0, 1e-7, -1e-7, 1e-5, 1e-3, -1e-3, 0.5, NAN, INF, -INF]))
def test_lam_is_loaded_exactly_when_on_the_simplex(weights, k, delta):
    """Points of the simplex, one entry moved by delta: loaded exactly when still finite, >= 0 and
    summing to 1 within the documented 256·K·eps."""
    state = mk.MoDoState(make_params(), K)
    saved = state.state_dict()
    lam = torch.tensor(weights, dtype=torch.float32)
    lam = lam / lam.sum()
    lam[k] += delta
    saved["lam"] = lam
    lam64 = lam.double()
    tolerance = 256 * K * torch.finfo(torch.float32).eps
    on_simplex = (bool(torch.isfinite(lam64).all()) and bool((lam64 >= 0).all())
                  and abs(float(lam64.sum()) - 1) <= tolerance)
    if on_simplex:
        state.load_state_dict(saved)
        assert torch.equal(state.lam, lam)
    else:
        with pytest.raises(ValueError, match=r"^state\['lam'\]"):
            state.load_state_dict(saved)
        assert torch.equal(state.lam, torch.full((K,), 1 / K))
