"""mol.backward on small models: p.grad equals the aggregator applied to the per-objective
gradients computed independently (one torch.autograd.grad per loss), for every aggregator and
both gradient strategies; any torch optimizer steps on it; shared-representation mode; MoDo's
three samples; FAMO; bad input."""

from __future__ import annotations

import pytest
import torch

import molkernels as mk
import molkernels.mol as mol
from mol_helpers import FACTORIES, flatten, one_thread, rel_err  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(torch.nn.Module):
    """A shared trunk (with a parameter only task 0 uses) and K linear heads."""

    def __init__(self, K: int, dtype=torch.float32):
        super().__init__()
        self.trunk = torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 7), torch.nn.Tanh())
        self.heads = torch.nn.ModuleList(torch.nn.Linear(7, 1) for _ in range(K))
        self.extra = torch.nn.Parameter(torch.randn(3))       # used by task 0 only
        self.unused = torch.nn.Parameter(torch.randn(2, 2))   # used by no task
        self.to(dtype)

    def features(self, x):
        return self.trunk(x)

    def losses(self, x, y, features=None):
        h = self.features(x) if features is None else features
        out = torch.cat([head(h) for head in self.heads], dim=1)
        losses = ((out - y) ** 2).mean(0)
        return torch.cat([losses[:1] + (self.extra ** 2).sum() * 0.1, losses[1:]])


def data(K, dtype=torch.float32, n=16):
    return torch.randn(n, 5, dtype=dtype), torch.randn(n, K, dtype=dtype)


def per_objective_grads(losses, params):
    """The reference: one torch.autograd.grad per loss, zeros where a parameter is unused."""
    rows = []
    for k in range(len(losses)):
        gs = torch.autograd.grad(losses[k], params, retain_graph=True, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)])
    return [torch.stack([rows[k][j] for k in range(len(losses))]) for j in range(len(params))]


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("K", (2, 3))
@pytest.mark.parametrize("strategy", ("batched", "loop"))
def test_backward_equals_aggregator_on_independent_gradients(name, K, strategy):
    model = Net(K)
    params = list(model.parameters())
    x, y = data(K)
    blocks = per_objective_grads(model.losses(x, y), params)
    expected = FACTORIES[name](K).aggregate(blocks)
    for p in params:
        p.grad = torch.full_like(p, 123.0)                  # overwritten, not accumulated
    mol.backward(model.losses(x, y), params, FACTORIES[name](K), strategy=strategy)
    got = [p.grad for p in params]
    assert all(g.shape == p.shape and g.dtype == p.dtype for g, p in zip(got, params))
    assert rel_err(flatten(got), flatten(expected), 1e-6) < 2e-5, name
    assert torch.equal(model.unused.grad, torch.zeros_like(model.unused))


def test_strategies_agree_and_fill_zeros_for_unused_parameters():
    K = 3
    model = Net(K, torch.float64)
    params = list(model.parameters())
    x, y = data(K, torch.float64)
    flat_b, views_b = mol.objective_gradients(model.losses(x, y), params, strategy="batched")
    flat_l, views_l = mol.objective_gradients(model.losses(x, y), params, strategy="loop")
    reference = per_objective_grads(model.losses(x, y), params)
    assert flat_b.shape == (K, sum(p.numel() for p in params))
    for vb, vl, r in zip(views_b, views_l, reference):
        assert torch.allclose(vb, r, rtol=1e-12, atol=1e-14) and torch.allclose(vl, r, rtol=1e-12, atol=1e-14)
    extra = [j for j, p in enumerate(params) if p is model.extra][0]
    unused = [j for j, p in enumerate(params) if p is model.unused][0]
    assert views_b[extra][0].abs().sum() > 0 and torch.equal(views_b[extra][1:], torch.zeros_like(views_b[extra][1:]))
    assert torch.equal(views_b[unused], torch.zeros_like(views_b[unused]))
    # the buffer is molkernels.flat_buffer's: views of one [K, D] tensor
    assert all(v.data_ptr() >= flat_b.data_ptr() for v in views_b)


def test_backward_returns_the_weights_of_gram_weightings():
    K = 3
    model = Net(K)
    params = list(model.parameters())
    x, y = data(K)
    blocks = per_objective_grads(model.losses(x, y), params)
    lam = mol.backward(model.losses(x, y), params, mol.MGDA())
    assert torch.allclose(lam.double(), mol.MGDA().weights(mk.gram(blocks)).double(), atol=1e-6)


@pytest.mark.parametrize("make_opt", [lambda ps: torch.optim.SGD(ps, lr=0.05),
                                      lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
                                      lambda ps: torch.optim.Adam(ps, lr=0.01),
                                      lambda ps: torch.optim.AdamW(ps, lr=0.01, foreach=False),
                                      lambda ps: torch.optim.RMSprop(ps, lr=0.01)])
def test_any_optimizer_steps_on_it(make_opt):
    K = 2
    model = Net(K)
    params = list(model.parameters())
    opt = make_opt(params)
    x, y = data(K, n=64)
    start = model.losses(x, y).detach()
    agg = mol.UPGrad()
    for _ in range(40):
        opt.zero_grad()
        mol.backward(model.losses(x, y), params, agg)
        opt.step()
    end = model.losses(x, y).detach()
    assert (end < start).all(), (start, end)


def test_sgd_step_is_minus_lr_times_the_direction():
    K = 3
    model = Net(K, torch.float64)
    params = list(model.parameters())
    x, y = data(K, torch.float64)
    blocks = per_objective_grads(model.losses(x, y), params)
    d = mol.CAGrad(0.4).aggregate(blocks)
    before = [p.detach().clone() for p in params]
    mol.backward(model.losses(x, y), params, mol.CAGrad(0.4))
    torch.optim.SGD(params, lr=0.1).step()
    for p, b, dj in zip(params, before, d):
        assert torch.allclose(p.detach(), b - 0.1 * dj, rtol=0, atol=1e-12)


def test_upgrad_steps_decrease_every_loss():
    """UPGrad's direction is non-conflicting (⟨g_k, d⟩ ≥ 0): small steps decrease all losses."""
    K = 3
    model = Net(K, torch.float64)
    params = list(model.parameters())
    x, y = data(K, torch.float64, n=64)
    for _ in range(5):
        before = model.losses(x, y).detach()
        mol.backward(model.losses(x, y), params, mol.UPGrad())
        with torch.no_grad():
            for p in params:
                p -= 1e-3 * p.grad
        assert (model.losses(x, y).detach() <= before + 1e-12).all()


@pytest.mark.parametrize("name", ["MGDA", "UPGrad", "CAGrad", "Mean", "NashMTL", "PCGrad"])
def test_shared_representation_mode(name):
    """MGDA-UB: λ from the Gram of ∂ℓ_k/∂z (z the shared features), p.grad = ∂(Σ λ_k ℓ_k)/∂p."""
    K = 3
    model = Net(K, torch.float64)
    params = list(model.parameters())
    x, y = data(K, torch.float64)
    z = model.features(x)
    losses = model.losses(x, y, features=z)
    Z = torch.stack([torch.autograd.grad(losses[k], z, retain_graph=True)[0] for k in range(K)])
    lam = FACTORIES[name](K).weights(mk.gram(Z))
    expected = torch.autograd.grad((lam.detach() * losses).sum(), params, allow_unused=True)
    z = model.features(x)
    got_lam = mol.backward(model.losses(x, y, features=z), params, FACTORIES[name](K), shared=z)
    assert torch.allclose(got_lam, lam, atol=1e-12, rtol=0)
    for p, e in zip(params, expected):
        e = torch.zeros_like(p) if e is None else e
        assert torch.allclose(p.grad, e, atol=1e-12, rtol=1e-10)


def test_modo_takes_three_loss_vectors():
    K = 2
    model = Net(K, torch.float64)
    params = list(model.parameters())
    batches = [data(K, torch.float64) for _ in range(3)]
    g1, g2, g3 = (per_objective_grads(model.losses(x, y), params) for x, y in batches)
    expected = mol.MoDo(gamma=0.3).aggregate(g1, g2, g3)
    agg = mol.MoDo(gamma=0.3)
    lam = mol.backward([model.losses(x, y) for x, y in batches], params, agg)
    assert torch.allclose(lam, agg.lam)
    assert rel_err(flatten([p.grad for p in params]), flatten(expected), 1e-12) < 1e-10
    with pytest.raises(ValueError, match="losses"):
        mol.backward(model.losses(*batches[0]), params, mol.MoDo())
    with pytest.raises(ValueError, match=r"losses\[2\]"):
        mol.backward([model.losses(x, y) for x, y in batches[:2]] + [model.losses(*batches[2])[:1]], params, mol.MoDo())


def test_moco_normalize_loss_gets_the_losses():
    K = 2
    model = Net(K, torch.float64)
    params = list(model.parameters())
    x, y = data(K, torch.float64)
    losses = model.losses(x, y)
    blocks = per_objective_grads(losses, params)
    expected = mol.MoCo(normalize="loss").aggregate(blocks, losses=losses.detach())
    mol.backward(model.losses(x, y), params, mol.MoCo(normalize="loss"))
    assert rel_err(flatten([p.grad for p in params]), flatten(expected), 1e-12) < 1e-10


def test_famo_backward_and_update():
    K = 3
    model = Net(K, torch.float64)
    params = list(model.parameters())
    x, y = data(K, torch.float64)
    famo = mol.FAMO(K)
    losses = model.losses(x, y)
    blocks = per_objective_grads(losses, params)
    expected = famo.aggregate(blocks, losses=losses.detach())
    w = mol.backward(model.losses(x, y), params, famo)
    assert torch.allclose(w.sum(), torch.tensor(1.0, dtype=w.dtype))
    assert rel_err(flatten([p.grad for p in params]), flatten(expected), 1e-12) < 1e-6
    torch.optim.SGD(params, lr=0.05).step()
    famo.update(model.losses(x, y).detach())
    assert not torch.equal(famo.z, torch.full((K,), 1 / K))
    # without params, FAMO.backward accumulates like loss.backward()
    for p in params:
        p.grad = None
    famo.backward(model.losses(x, y))
    assert all(p.grad is not None for p in params if p is not model.unused)


def test_bad_input_raises_naming_the_argument():
    K = 3
    model = Net(K)
    params = list(model.parameters())
    x, y = data(K)
    with pytest.raises(ValueError, match="losses"):
        mol.backward([], params, mol.Mean())
    with pytest.raises(ValueError, match="losses"):
        mol.backward(torch.zeros(0, requires_grad=True), params, mol.Mean())
    with pytest.raises(ValueError, match="losses"):
        mol.backward(model.losses(x, y), params, mol.Linear([0.5, 0.5]))      # K = 3 losses, 2 weights
    with pytest.raises(ValueError, match=r"losses\[1\]"):
        mol.backward([model.losses(x, y)[0], torch.ones(2, requires_grad=True)], params, mol.Mean())
    with pytest.raises(ValueError, match=r"losses\[0\]"):
        mol.backward([torch.tensor(1.0)], params, mol.Mean())                 # not part of a graph
    with pytest.raises(ValueError, match="params"):
        mol.backward(model.losses(x, y), [], mol.Mean())
    with pytest.raises(ValueError, match=r"params\[0\]"):
        mol.backward(model.losses(x, y), [torch.zeros(3)], mol.Mean())
    with pytest.raises(ValueError, match="strategy"):
        mol.backward(model.losses(x, y), params, mol.Mean(), strategy="fast")
    with pytest.raises(TypeError, match="aggregator"):
        mol.backward(model.losses(x, y), params, "upgrad")
    z = model.features(x)
    with pytest.raises(ValueError, match="shared"):
        mol.backward(model.losses(x, y, features=z), params, mol.MoCo(), shared=z)
    with pytest.raises(ValueError, match="losses"):
        mol.backward(model.losses(x, y)[:2], params, mol.FAMO(3))


def test_k_mismatch_with_a_state_is_caught_before_any_backward():
    model = Net(3)
    params = list(model.parameters())
    x, y = data(3)
    for agg in (mol.MoCo(), mol.NashMTL()):
        mol.backward(model.losses(x, y), params, agg)
        calls = []
        losses = model.losses(x, y)[:2]
        losses.register_hook(lambda g: calls.append(g))
        with pytest.raises(ValueError, match="losses"):
            mol.backward(losses, params, agg)
        assert not calls, "the check must run before any backward pass"
