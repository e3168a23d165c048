"""Robustness of every aggregator in molkernels.mol (issue 14, item 3; item 12 for their loaders;
item 5 for mol.backward's parameters): non-finite input never gives finite numbers, finite input of
any scale gives the method's own answer, the non-finite paths read nothing on the host, a
non-finite input leaves the stateful aggregators visibly NaN, load_state_dict checks everything
before it changes anything, and mol.backward rejects a parameter listed twice or overlapping
another. The contract is stated in molkernels/mol/base.py's docstring."""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import molkernels as mk
import molkernels.mol as mol

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mol"))
from mol_helpers import FACTORIES as MOL_FACTORIES  # noqa: E402
from mol_helpers import NoScalarReads, one_thread, rel_err  # noqa: E402, F401

pytestmark = pytest.mark.usefixtures("one_thread")

NAN, INF = float("nan"), float("inf")

# name -> fresh aggregator for K objectives: mol_helpers' and the two it leaves out, so every
# Aggregator class molkernels.mol exports is here (test_every_exported_aggregator_is_covered).
FACTORIES = dict(MOL_FACTORIES, MoDo=lambda K: mol.MoDo(gamma=0.2, rho=0.01), FAMO=lambda K: mol.FAMO(K))
# The direction is Σ_k w_k g_k with weights that do not depend on the gradients: a non-finite entry
# reaches only its own coordinate.
COORDINATEWISE = ("Mean", "Linear", "FAMO")
# weights(K×K matrix) exists (MoDo's takes G₁G₂ᵀ)
WITH_WEIGHTS = tuple(n for n in FACTORIES if n not in ("MoCo", "FAMO"))
# Weights invariant to the gradients' scale (Nash-MTL's α scales as 1/scale, its direction not at all);
# MoCo's and MoDo's steps are not scale-invariant.
SCALE_INVARIANT = tuple(n for n in WITH_WEIGHTS if n not in ("NashMTL", "MoDo"))


def aggregate(name: str, agg, J):
    """One step of the aggregator on the stack J (the same sample three times for MoDo, unit losses
    for FAMO)."""
    if name == "MoDo":
        return agg.aggregate(J, J, J)
    if name == "FAMO":
        return agg.aggregate(J, losses=torch.ones(J.shape[0]))
    return agg.aggregate(J)


def gradients(K: int, d: int = 9, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(K, d, dtype=torch.float64).to(dtype)


def test_every_exported_aggregator_is_covered():
    exported = {getattr(mol, n) for n in mol.__all__}
    classes = {c for c in exported if isinstance(c, type) and issubclass(c, mol.Aggregator)}
    classes -= {mol.Aggregator, mol.GramWeighting}
    assert classes == {type(f(3)) for f in FACTORIES.values()}


# --------------------------------------------------------------------------------------------------
# Non-finite input


@pytest.mark.parametrize("value", (NAN, INF, -INF), ids=("nan", "inf", "-inf"))
@pytest.mark.parametrize("K", (1, 3, 33))
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_one_nonfinite_gradient_entry(name, K, value):
    """One NaN/±Inf in one gradient: the whole direction is NaN (coordinatewise aggregators: that
    coordinate is non-finite and the others are the combination of the rest); the weights are NaN."""
    J = gradients(K)
    bad = J.clone()
    bad[K // 2, 4] = value
    d = aggregate(name, FACTORIES[name](K), bad)
    if name in COORDINATEWISE:
        clean = aggregate(name, FACTORIES[name](K), J)
        others = torch.arange(J.shape[1]) != 4
        assert not torch.isfinite(d[4]), d
        assert rel_err(d[others], clean[others], 1e-12) < 1e-14, d
    else:
        assert torch.isnan(d).all(), d
    if name in WITH_WEIGHTS:
        w = FACTORIES[name](K).weights(bad @ bad.T)
        assert w.shape == (K,) and torch.isnan(w).all(), w


@pytest.mark.parametrize("value", (NAN, INF), ids=("nan", "inf"))
@pytest.mark.parametrize("K", (1, 3, 33))
@pytest.mark.parametrize("name", WITH_WEIGHTS)
def test_one_nonfinite_gram_entry(name, K, value):
    """weights(G) with one non-finite entry (not even mirrored) is NaN, never an exception."""
    J = gradients(K)
    G = J @ J.T
    G[0, K - 1] = value
    w = FACTORIES[name](K).weights(G)
    assert w.shape == (K,) and w.dtype == G.dtype and torch.isnan(w).all(), w


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_fp32_gram_overflow_is_nan_or_the_float64_answer(name):
    """Finite float32 gradients of norm ~1e21 whose Gram overflows float32: the direction is the one
    float64 gives, or NaN, never another method's (CAGrad was Mean, PCGrad the sum)."""
    K = 3
    J = gradients(K) * 1e20
    d32 = aggregate(name, FACTORIES[name](K), J.float())
    d64 = aggregate(name, FACTORIES[name](K), J.float().double())
    assert torch.isnan(d32).all() or rel_err(d32, d64, 0.0) < 1e-5, (d32, d64)
    if name in COORDINATEWISE:
        assert rel_err(d32, d64, 0.0) < 1e-5
    if name in WITH_WEIGHTS:
        G = mk.gram(J.float())
        assert torch.isinf(G).any()
        assert torch.isnan(FACTORIES[name](K).weights(G)).all()


@pytest.mark.parametrize("K", (1, 3, 33))
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_nonfinite_gradient_through_backward(name, K):
    """mol.backward on a two-parameter model whose objective K // 2 has a finite loss but an Inf
    gradient entry (√x at x = 0): p.grad is NaN everywhere and so are the returned weights
    (coordinatewise aggregators: p.grad is non-finite exactly there, the weights are the fixed ones)."""
    W = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    X = torch.randn(K, 4, 2, dtype=torch.float64)
    C = torch.randn(K, 2, dtype=torch.float64)

    def losses():
        kink = (W[0, 0] - W[0, 0].detach()).sqrt()          # value 0, gradient +Inf
        return torch.stack([(W * X[k]).sum() + (b * C[k]).sum() + (W ** 2).sum() + (kink if k == K // 2 else 0)
                            for k in range(K)]) + 10.0

    agg = FACTORIES[name](K)
    batch = [losses() for _ in range(3)] if name == "MoDo" else losses()
    lam = mol.backward(batch, [W, b], agg)
    if name in COORDINATEWISE:
        bad_at = torch.zeros(4, 2, dtype=torch.bool)
        bad_at[0, 0] = True
        assert torch.equal(~torch.isfinite(W.grad), bad_at), W.grad
        assert torch.isfinite(b.grad).all(), b.grad
        assert torch.isfinite(lam).all()
    else:
        assert torch.isnan(W.grad).all() and torch.isnan(b.grad).all(), (W.grad, b.grad)
        assert torch.isnan(lam).all(), lam


@pytest.mark.parametrize("value", (NAN, INF), ids=("nan", "inf"))
def test_famo_nonfinite_loss_gives_nan(value):
    """An Inf loss used to get the weight 0 and drop out of a finite direction."""
    K = 3
    famo = mol.FAMO(K)
    losses = torch.tensor([1.0, value, 2.0])
    assert torch.isnan(famo.loss_weights(losses)).all()
    assert torch.isnan(famo.aggregate(gradients(K), losses=losses)).all()
    p = torch.randn(5, requires_grad=True)
    mol.backward(torch.stack([p.sum(), (p ** 2).sum() * losses[1], (p ** 3).sum()]), [p], famo)
    assert torch.isnan(p.grad).all(), p.grad


@pytest.mark.parametrize("name", WITH_WEIGHTS)
def test_nonfinite_weights_read_nothing_on_the_host(name):
    """The non-finite path adds no host synchronisation: NaN comes from arithmetic, not a check."""
    K = 4
    J = gradients(K)
    G = J @ J.T
    G[1, 2] = NAN
    agg = mol.NashMTL(tol=0.0) if name == "NashMTL" else FACTORIES[name](K)
    with NoScalarReads() as mode:
        w = agg.weights(G)
    assert torch.isnan(w).all()
    assert not mode.reads, f"{name}: {len(mode.reads)} host reads of tensor values"


# --------------------------------------------------------------------------------------------------
# Finite input of any scale


@pytest.mark.parametrize("scale", (1e-30, 1e-10, 1e10, 1e30))
@pytest.mark.parametrize("K", (1, 3, 33))
@pytest.mark.parametrize("name", sorted(set(FACTORIES) - {"MoCo", "MoDo"}))
def test_scaled_gradients(name, K, scale):
    """aggregate(s·J) = s·aggregate(J) for every method whose weights are scale-invariant (and for
    the fixed weights), aggregate(s·J) = aggregate(J) for Nash-MTL (its α scales as 1/s)."""
    J = gradients(K)
    d = aggregate(name, FACTORIES[name](K), J)
    scaled = aggregate(name, FACTORIES[name](K), J * scale)
    expected, size = (d, 1.0) if name == "NashMTL" else (d * scale, scale * J.norm().item())
    # relative to the gradients' size: with K > d the min-norm point is 0 up to rounding
    assert rel_err(scaled, expected, size) < 1e-9, (scaled, expected)


@pytest.mark.parametrize("name", WITH_WEIGHTS)
def test_gram_near_the_float64_limit(name):
    """A finite float64 Gram with entries up to 1.5e308 gives the weights of the unit-scale Gram
    (Nash-MTL: divided by √scale; MoDo is not scale-invariant: NaN or on the simplex):
    nothing in the K×K work overflows (the symmetrisation 0.5·(G + Gᵀ) did)."""
    K = 4
    J = gradients(K)
    G = J @ J.T
    s = 1.5e308 / G.abs().max().item()
    w = FACTORIES[name](K).weights(G)
    big = FACTORIES[name](K).weights(G * s)
    if name == "MoDo":
        assert torch.isnan(big).all() or ((big >= 0).all() and abs(big.sum().item() - 1) < 1e-12), big
    elif name == "NashMTL":
        assert rel_err(big * s ** 0.5, w, 0.0) < 1e-9, (big, w)
    else:
        assert rel_err(big, w, 0.0) < 1e-9, (big, w)


@pytest.mark.parametrize("name", SCALE_INVARIANT)
def test_fp32_gram_near_the_float32_limit(name):
    """A float32 Gram just below float32's largest value gives the float64 weights."""
    K = 3
    J = gradients(K, d=64)
    J = J / J.norm(dim=1, keepdim=True) * 1.5e19         # ‖g_k‖² = 2.25e38 < 3.4e38
    G = mk.gram(J.float())
    assert torch.isfinite(G).all() and G.abs().max() > 1e38
    w = FACTORIES[name](K).weights(G)
    assert rel_err(w, FACTORIES[name](K).weights(G.double()), 1e-12) < 1e-6


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # one_thread: no per-example state
@given(name=st.sampled_from(sorted(set(FACTORIES) - {"MoCo", "MoDo"})), K=st.integers(1, 6),
       exponent=st.integers(-30, 30), bad=st.sampled_from([None, NAN, INF, -INF]), where=st.integers(0, 10 ** 6))
def test_property_scale_and_nonfinite_placement(name, K, exponent, bad, where):
    """Random K, scale 10^±30 and NaN/Inf placement: finite input gives the unit-scale answer, any
    non-finite entry gives a non-finite direction (NaN everywhere unless coordinatewise)."""
    J = torch.randn(K, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(where))
    scale = 10.0 ** exponent
    d = aggregate(name, FACTORIES[name](K), J)
    X = J * scale
    if bad is None:
        out = aggregate(name, FACTORIES[name](K), X)
        expected, size = (d, 1.0) if name == "NashMTL" else (d * scale, scale * J.norm().item())
        assert rel_err(out, expected, size) < 1e-9
        return
    X[where % K, where % 7] = bad
    out = aggregate(name, FACTORIES[name](K), X)
    if name in COORDINATEWISE:
        assert not torch.isfinite(out[where % 7])
    else:
        assert torch.isnan(out).all()


# --------------------------------------------------------------------------------------------------
# State after a non-finite input


@pytest.mark.parametrize("name", ("MoCo", "MoDo", "NashMTL"))
def test_state_after_a_nonfinite_gradient_stays_visibly_nan(name):
    """After one non-finite step the state is NaN: later steps on clean gradients give NaN (never
    finite-but-wrong), reset() gives a fresh aggregator's results, and the NaN state cannot be
    loaded as a good one."""
    K = 3
    J = gradients(K)
    bad = J.clone()
    bad[0, 1] = NAN
    agg = FACTORIES[name](K)
    aggregate(name, agg, J)
    assert torch.isnan(aggregate(name, agg, bad)).all()
    for _ in range(2):
        assert torch.isnan(aggregate(name, agg, J)).all()
    dead = copy.deepcopy(agg.state_dict())
    agg.reset()
    assert torch.equal(aggregate(name, agg, J), aggregate(name, FACTORIES[name](K), J))
    if name != "MoCo":  # MoCoState's loader is molkernels.steps' (python_tests/robustness/ for steps)
        with pytest.raises(ValueError, match=r"^state\['(lam|alpha)'\]: has non-finite"):
            FACTORIES[name](K).load_state_dict(dead)


def test_famo_state_after_a_nonfinite_loss_stays_visibly_nan():
    K = 3
    famo = mol.FAMO(K)
    famo.weighted_loss(torch.ones(K, requires_grad=True))
    famo.update(torch.tensor([0.5, INF, 0.5]))
    assert torch.isnan(famo.logits).all()
    assert torch.isnan(famo.loss_weights(torch.ones(K))).all()
    with pytest.raises(ValueError, match=r"^state\['logits'\]: has non-finite"):
        mol.FAMO(K).load_state_dict(copy.deepcopy(famo.state_dict()))
    famo.reset()
    assert torch.equal(famo.loss_weights(torch.ones(K)), mol.FAMO(K).loss_weights(torch.ones(K)))


def test_pcgrad_generator_advances_as_on_a_clean_step():
    K = 4
    J = gradients(K)
    G = J @ J.T
    bad = G.clone()
    bad[0, 0] = NAN
    a, b = mol.PCGrad(seed=3), mol.PCGrad(seed=3)
    assert torch.isnan(a.weights(bad)).all()
    b.weights(G)
    assert torch.equal(a.weights(G), b.weights(G))


# --------------------------------------------------------------------------------------------------
# load_state_dict: everything checked first, then all of it applied or nothing


def _snapshot(agg):
    return copy.deepcopy(agg.state_dict())


def assert_same(a, b):
    """Bitwise equality of nested state dicts."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def _trained(name: str, K: int = 3):
    agg = FACTORIES[name](K)
    for _ in range(2):
        if name == "FAMO":
            agg.weighted_loss(torch.rand(K, requires_grad=True) + 0.5)
            agg.update(torch.rand(K) + 0.5)
        else:
            aggregate(name, agg, gradients(K))
    return agg


def _replaced(state: dict, key: str, value) -> dict:
    out = copy.deepcopy(state)
    out[key] = value
    return out


def _without(state: dict, key: str) -> dict:
    out = copy.deepcopy(state)
    del out[key]
    return out


def _corruptions(name: str, good: dict):
    """(label, corrupted dict, the key the error must name) for each aggregator's state."""
    other = {"MoDo": "NashMTL"}.get(name, "MoDo")
    cases = [("missing", _without(good, list(good)[0]), list(good)[0]),
             ("extra", _replaced(good, "extra", 1), "extra"),
             ("other class", copy.deepcopy(_trained(other).state_dict()), None)]
    if name in ("MoDo", "NashMTL"):
        key = "lam" if name == "MoDo" else "alpha"
        v = good[key]
        cases += [("shape", _replaced(good, key, v[:2]), key), ("2-D", _replaced(good, key, v[None]), key),
                  ("dtype", _replaced(good, key, v.float()), key),
                  ("nan", _replaced(good, key, torch.tensor([NAN, 0.5, 0.5], dtype=torch.float64)), key),
                  ("negative", _replaced(good, key, torch.tensor([-0.5, 0.75, 0.75], dtype=torch.float64)), key),
                  ("list", _replaced(good, key, v.tolist()), key),
                  ("step<0", _replaced(good, "step", -1), "step"), ("step float", _replaced(good, "step", 2.5), "step"),
                  ("step bool", _replaced(good, "step", True), "step")]
        if name == "MoDo":
            cases.append(("off simplex", _replaced(good, "lam", torch.tensor([0.7, 0.7, 0.7], dtype=torch.float64)),
                          "lam"))
    if name == "PCGrad":
        cases += [("seed", _replaced(good, "seed", 1.5), "seed"),
                  ("generator shape", _replaced(good, "generator", good["generator"][:10]), "generator"),
                  ("generator dtype", _replaced(good, "generator", good["generator"].float()), "generator"),
                  ("generator content", _replaced(good, "generator", torch.zeros_like(good["generator"])),
                   "generator")]
    if name == "FAMO":
        for key in ("logits", "min_losses", "prev_losses"):
            v = good[key]
            cases += [(f"{key} shape", _replaced(good, key, v[:2]), key),
                      (f"{key} dtype", _replaced(good, key, v.double()), key),
                      (f"{key} nan", _replaced(good, key, torch.full_like(v, NAN)), key)]
        opt = good["optimizer"]
        for label, edit in (("lr", lambda o: o["param_groups"][0].update(lr=1.0)),
                            ("weight_decay", lambda o: o["param_groups"][0].update(weight_decay=0.5)),
                            ("params", lambda o: o["param_groups"][0].update(params=[0, 1])),
                            ("exp_avg shape", lambda o: o["state"][0].update(exp_avg=o["state"][0]["exp_avg"][:1])),
                            ("exp_avg dtype", lambda o: o["state"][0].update(exp_avg=o["state"][0]["exp_avg"].double())),
                            ("exp_avg_sq<0", lambda o: o["state"][0].update(exp_avg_sq=-o["state"][0]["exp_avg_sq"] - 1)),
                            ("step", lambda o: o["state"][0].update(step=torch.tensor(-1.0))),
                            ("moment missing", lambda o: o["state"][0].pop("exp_avg"))):
            bad = copy.deepcopy(opt)
            edit(bad)
            cases.append((f"optimizer {label}", _replaced(good, "optimizer", bad), "optimizer"))
    if name == "MoCo":
        cases += [("inner not a dict", _replaced(good, "state", [1, 2]), "state"),
                  ("inner of MoDo", _replaced(good, "state", copy.deepcopy(_trained("MoDo").state_dict())), None)]
    return cases


@pytest.mark.parametrize("name", ("MoCo", "MoDo", "NashMTL", "FAMO", "PCGrad"))
def test_corrupted_state_raises_and_changes_nothing(name):
    agg = _trained(name)
    good = _snapshot(agg)
    for label, bad, key in _corruptions(name, good):
        pattern = r"^state" if key is None else rf"^state\['{key}'\]"
        with pytest.raises((ValueError, TypeError), match=pattern):
            agg.load_state_dict(bad)
        assert_same(_snapshot(agg), good)
    fresh = FACTORIES[name](3)
    fresh.load_state_dict(copy.deepcopy(good))      # the good state still loads, and resumes bitwise
    if name == "FAMO":
        fresh.weighted_loss(torch.ones(3, requires_grad=True))
        agg.weighted_loss(torch.ones(3, requires_grad=True))
        fresh.update(torch.full((3,), 0.5))
        agg.update(torch.full((3,), 0.5))
        assert torch.equal(fresh.logits, agg.logits)
    else:
        J = gradients(3)
        assert torch.equal(aggregate(name, fresh, J), aggregate(name, agg, J))


@pytest.mark.parametrize("name", ("Mean", "UPGrad", "CAGrad"))
def test_stateless_aggregators_accept_only_an_empty_state(name):
    agg = FACTORIES[name](3)
    agg.load_state_dict({})
    with pytest.raises(ValueError, match=r"^state\['lam'\]: unknown key"):
        agg.load_state_dict(_trained("MoDo").state_dict())
    with pytest.raises(TypeError, match="^state: expected a dict"):
        agg.load_state_dict(None)


def test_moco_pending_state_is_checked_before_it_is_kept():
    """A MoCo restored before its first step builds its state at that step; a bad pending state
    raises there and leaves no half-built state behind."""
    good = _snapshot(_trained("MoCo"))
    bad = copy.deepcopy(good)
    bad["state"]["y"] = bad["state"]["y"][:, :4]
    moco = FACTORIES["MoCo"](3)
    moco.load_state_dict(bad)
    with pytest.raises(ValueError, match=r"state.*\by\b"):
        moco.aggregate(gradients(3))
    assert moco.state is None
    moco.load_state_dict(good)
    J = gradients(3)
    other = FACTORIES["MoCo"](3)
    other.load_state_dict(copy.deepcopy(good))
    assert torch.equal(moco.aggregate(J), other.aggregate(J))


# --------------------------------------------------------------------------------------------------
# mol.backward: a parameter listed twice, or overlapping another


def test_backward_rejects_a_parameter_listed_twice_before_any_backward_pass():
    w = torch.randn(3, requires_grad=True)
    v = torch.randn(2, requires_grad=True)
    losses = torch.stack([(w ** 2).sum() + v.sum(), w.sum()])
    with pytest.raises(ValueError, match=r"^params\[2\]: overlaps params\[0\]"):
        mol.backward(losses, [w, v, w], mol.UPGrad())
    assert w.grad is None and v.grad is None
    losses.sum().backward()                          # the graph was not consumed by a backward pass
    assert w.grad is not None


def test_backward_rejects_overlapping_parameters():
    base = torch.randn(10, requires_grad=True)
    other = torch.randn(3, requires_grad=True)
    a, b = base[:6], base[4:]
    losses = torch.stack([a.sum() + other.sum(), (b ** 2).sum()])
    with pytest.raises(ValueError, match=r"^params\[2\]: overlaps params\[0\]"):
        mol.backward(losses, [a, other, b], mol.MGDA())
    with pytest.raises(ValueError, match=r"^shared\[1\]: overlaps shared\[0\]"):
        mol.backward(losses, [other], mol.MGDA(), shared=[a, a])
    # Views that do not overlap are separate parameters.
    a, b = base[:5], base[5:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)      # .grad of a non-leaf view
        mol.backward(torch.stack([a.sum(), (b ** 2).sum()]), [a, b], mol.Mean())
        assert torch.equal(a.grad, torch.full((5,), 0.5)) and torch.allclose(b.grad, base[5:].detach())
