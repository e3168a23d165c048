"""The aggregator interface: directions in the stack's structure (lists of blocks give the flat
tensor's direction), weights on the device in the Gram's dtype, determinism, checkpoint/resume,
scale invariance, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch

import molkernels as mk
import molkernels.mol as mol
from mol_helpers import (FACTORIES, GRAM_FACTORIES, NoScalarReads, flatten, one_thread, random_matrix,  # noqa: F401
                         rel_err, split)

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(3, 5), (1,), (2, 2, 3), (9,)]          # D = 15 + 1 + 12 + 9 = 37 (odd)
D = 37


@pytest.mark.parametrize("name", sorted(FACTORIES))
@pytest.mark.parametrize("K", (2, 3, 5))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_blocks_give_the_flat_direction(name, K, dtype):
    """aggregate(list of blocks) returns a list of per-block tensors equal to aggregate(J) cut
    the same way; separate blocks, views of one flat buffer and non-contiguous blocks alike."""
    J = random_matrix(K, D, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    expected = FACTORIES[name](K).aggregate(J)
    assert isinstance(expected, torch.Tensor) and expected.shape == (D,) and expected.dtype == dtype
    blocks = split(J, SHAPES)
    buffer, views = mk.flat_buffer(SHAPES, K, dtype=dtype)
    buffer.copy_(J)
    noncontiguous = [b.transpose(1, 2) if b.dim() == 3 and b.shape[1] != b.shape[2] else b for b in blocks]
    for stack in (blocks, views):
        out = FACTORIES[name](K).aggregate(stack)
        assert isinstance(out, list) and len(out) == len(SHAPES)
        for o, shape in zip(out, SHAPES):
            assert o.shape == shape and o.dtype == dtype
        assert rel_err(flatten(out), expected, 1e-6) < tol, name
    out = FACTORIES[name](K).aggregate(noncontiguous)
    flat_nc = flatten([o.transpose(0, 1) if b.dim() == 3 and b.shape[1] != b.shape[2] else o
                       for o, b in zip(out, blocks)])
    assert rel_err(flat_nc, expected, 1e-6) < tol, name


@pytest.mark.parametrize("name", sorted(GRAM_FACTORIES))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_weights_shape_dtype_device_and_direction(name, dtype):
    K = 4
    J = random_matrix(K, 11, dtype=dtype)
    G = mk.gram(J)
    w = GRAM_FACTORIES[name](K).weights(G)
    assert w.shape == (K,) and w.dtype == G.dtype and w.device == G.device
    assert torch.isfinite(w).all()
    # aggregate is the combination of the rows with these weights
    d = GRAM_FACTORIES[name](K).aggregate(J)
    assert rel_err(d, w.double() @ J.double(), 1e-6) < (1e-12 if dtype == torch.float64 else 2e-5)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_deterministic_and_resumable(name):
    """Two aggregators built alike give bitwise the same directions step after step; one
    restored from another's state_dict mid-run continues bitwise identically."""
    K = 3
    mats = [random_matrix(K, 13) for _ in range(5)]
    a, b = FACTORIES[name](K), FACTORIES[name](K)
    for J in mats[:2]:
        assert torch.equal(a.aggregate(J), b.aggregate(J))
    state = copy.deepcopy(a.state_dict())
    c = FACTORIES[name](K)
    c.load_state_dict(state)
    for J in mats[2:]:
        da, dc = a.aggregate(J), c.aggregate(J)
        assert torch.equal(da, dc), name


def test_pcgrad_seed_matters_and_reset_restarts():
    J = random_matrix(5, 9)
    J[1] = -J[0] + 0.1 * J[1]
    J[3] = -J[2] + 0.1 * J[3]
    runs = {seed: mol.PCGrad(seed=seed).aggregate(J) for seed in range(6)}
    assert len({tuple(v.tolist()) for v in runs.values()}) > 1, "the random order should matter here"
    agg = mol.PCGrad(seed=4)
    first = [agg.aggregate(J) for _ in range(3)]
    agg.reset()
    assert all(torch.equal(x, agg.aggregate(J)) for x in first)


def test_stateful_aggregators_change_with_history():
    """MoCo and MoDo move their state every step; Nash-MTL with update_weights_every=2 reuses its
    weights on the off steps."""
    J1, J2 = random_matrix(3, 9), random_matrix(3, 9)
    moco = mol.MoCo()
    first = moco.aggregate(J1)
    assert not torch.equal(moco.aggregate(J1), first)      # Y and λ moved
    modo = mol.MoDo(gamma=0.5)
    l1 = modo.weights(J1 @ J2.T).clone()
    assert not torch.equal(modo.weights(J1 @ J2.T), l1)
    nash = mol.NashMTL(update_weights_every=2, max_norm=0.0)
    w1 = nash.weights(J1 @ J1.T)
    assert torch.equal(nash.weights(J2 @ J2.T), w1)       # reused on the off step
    assert not torch.equal(nash.weights(J2 @ J2.T), w1)   # recomputed


@pytest.mark.parametrize("name", ["UPGrad", "DualProj", "IMTLG", "AlignedMTL", "CAGrad", "MGDA", "PCGrad"])
def test_weights_do_not_depend_on_the_gradient_scale(name):
    """Unlike torchjd (which treats a Gram of trace < 1e-4 as zero), tiny and huge gradients get the
    weights of unit-scale ones."""
    J = random_matrix(3, 9)
    G = J @ J.T
    w = GRAM_FACTORIES[name](3).weights(G)
    for s in (1e-8, 1e6):
        assert rel_err(GRAM_FACTORIES[name](3).weights(G * s), w, 1e-12) < 1e-9, s


def test_nash_weights_scale_inversely_with_each_gradient():
    """g_k → s_k g_k maps α_k → α_k / s_k (Gα = 1/α is equivariant)."""
    J = random_matrix(3, 9)
    s = torch.tensor([1e-3, 1.0, 1e3], dtype=torch.float64)
    a = mol.NashMTL(max_norm=0.0).weights(J @ J.T)
    b = mol.NashMTL(max_norm=0.0).weights((s[:, None] * J) @ (s[:, None] * J).T)
    assert rel_err(b * s, a, 1e-12) < 1e-8


def test_moco_matches_moco_step_and_modo_matches_modo_step():
    K = 3
    params = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    state = mk.MoCoState(params, K, dtype=torch.float64)
    moco = mol.MoCo(beta=0.5, gamma=0.2, rho=0.1)
    mstate = mk.MoDoState(params, K)
    modo = mol.MoDo(gamma=0.2, rho=0.1)
    for _ in range(3):
        blocks = [torch.randn(K, *s, dtype=torch.float64) for s in SHAPES]
        lam = mk.moco_step(params, blocks, state, beta=0.5, gamma=0.2, rho=0.1)
        out = moco.aggregate(blocks)
        assert all(torch.equal(o, p.grad) for o, p in zip(out, params))
        assert torch.equal(moco.lam, lam)
        g1, g2, g3 = ([torch.randn(K, *s, dtype=torch.float64) for s in SHAPES] for _ in range(3))
        lam = mk.modo_step(params, g1, g2, g3, mstate, gamma=0.2, rho=0.1)
        out = modo.aggregate(g1, g2, g3)
        # modo_step keeps λ in float32, MoDo in float64
        assert rel_err(modo.lam, lam, 1e-12) < 1e-6
        assert rel_err(flatten(out), flatten([p.grad for p in params]), 1e-9) < 1e-6


def test_famo_state_roundtrip():
    famo = mol.FAMO(3, w_lr=0.1)
    for _ in range(3):
        famo.weighted_loss(list(torch.rand(3).add(0.5).requires_grad_()))
        famo.update(torch.rand(3).add(0.5))
    other = mol.FAMO(3, w_lr=0.1)
    other.load_state_dict(copy.deepcopy(famo.state_dict()))
    losses, new = torch.rand(3) + 0.5, torch.rand(3) + 0.5
    for agg in (famo, other):
        agg.weighted_loss(list(losses.clone().requires_grad_()))
        agg.update(new)
    assert torch.equal(famo.logits, other.logits)


# --------------------------------------------------------------------------------------------------
# Bad input


def test_bad_gram_and_stack_raise_naming_the_argument():
    with pytest.raises(ValueError, match="gram"):
        mol.MGDA().weights(torch.zeros(2, 3))
    with pytest.raises(TypeError, match="gram"):
        mol.UPGrad().weights(torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="grads"):
        mol.UPGrad().aggregate([])
    with pytest.raises(ValueError, match="grads"):
        mol.MGDA().aggregate([torch.randn(2, 3), torch.randn(3, 3)])   # K mismatch between blocks


def test_k_mismatch_raises_naming_the_argument():
    J = random_matrix(3, 5)
    with pytest.raises(ValueError, match="grads"):
        mol.Linear([0.5, 0.5]).aggregate(J)
    with pytest.raises(ValueError, match="gram"):
        mol.Linear([0.5, 0.5]).weights(J @ J.T)
    with pytest.raises(ValueError, match="pref_vector"):
        mol.UPGrad([0.5, 0.5]).weights(J @ J.T)
    with pytest.raises(ValueError, match="pref_vector"):
        mol.AlignedMTL([0.5, 0.5]).weights(J @ J.T)
    nash = mol.NashMTL()
    nash.weights(J @ J.T)
    with pytest.raises(ValueError, match="gram"):
        nash.weights(J[:2] @ J[:2].T)
    modo = mol.MoDo()
    modo.weights(J @ J.T)
    with pytest.raises(ValueError, match="matrix"):
        modo.weights(J[:2] @ J[:2].T)
    with pytest.raises(ValueError, match="grads2"):
        mol.MoDo().aggregate(J)
    with pytest.raises(ValueError, match="grads3"):
        mol.MoDo().aggregate(J, J, J[:, :4])
    moco = mol.MoCo()
    moco.aggregate(J)
    with pytest.raises(ValueError, match="grads"):
        moco.aggregate(J[:2])
    famo = mol.FAMO(3)
    with pytest.raises(ValueError, match="losses"):
        famo.weighted_loss([])
    with pytest.raises(ValueError, match="losses"):
        famo.weighted_loss(list(torch.ones(2, requires_grad=True)))
    with pytest.raises(ValueError, match="grads"):
        famo.aggregate(J[:2], losses=torch.ones(3))


def test_bad_hyperparameters_raise():
    for make, name in ((lambda: mol.UPGrad(reg_eps=0), "reg_eps"), (lambda: mol.DualProj(reg_eps=-1), "reg_eps"),
                       (lambda: mol.CAGrad(-0.1), "c"), (lambda: mol.NashMTL(max_norm=-1), "max_norm"),
                       (lambda: mol.NashMTL(update_weights_every=0), "update_weights_every"),
                       (lambda: mol.MoCo(beta=1.5), "beta"), (lambda: mol.MoCo(normalize="x"), "normalize"),
                       (lambda: mol.MoDo(gamma=float("nan")), "gamma"), (lambda: mol.FAMO(0), "num_objectives"),
                       (lambda: mol.PCGrad(seed=1.5), "seed"), (lambda: mol.AlignedMTL(scale_mode="max"), "scale_mode"),
                       (lambda: mol.Linear([]), "weights")):
        with pytest.raises(ValueError, match=name):
            make()
    with pytest.raises(RuntimeError, match="backward"):
        mol.FAMO(2).update(torch.ones(2))


def test_nan_propagates():
    J = random_matrix(3, 5)
    J[1, 2] = float("nan")
    for name in ("MGDA", "UPGrad", "Mean", "IMTLG"):
        d = GRAM_FACTORIES[name](3).aggregate(J)
        assert torch.isnan(d).any(), name


@pytest.mark.parametrize("name", sorted(GRAM_FACTORIES))
def test_weights_never_read_values_on_the_host(name):
    """A CPU proxy for "no host synchronisation on CUDA" (no GPU here): no tensor value is read
    by Python while the weights are computed. (IMTL-G and Aligned-MTL additionally synchronise
    inside torch.linalg.eigh on CUDA, as their docstrings say.) Nash-MTL's CPU-only early stop
    is turned off with tol=0."""
    K = 4
    J = random_matrix(K, 9)
    J[1] = -J[0] + 0.1 * J[1]
    G = J @ J.T
    agg = mol.NashMTL(tol=0.0) if name == "NashMTL" else GRAM_FACTORIES[name](K)
    with NoScalarReads() as mode:
        w = agg.weights(G)
        agg.weights(G)
    assert torch.isfinite(w).all()
    assert not mode.reads, f"{name}: {len(mode.reads)} host reads of tensor values"


def test_the_host_read_detector_detects():
    with NoScalarReads() as mode:
        bool(torch.ones(2).sum() > 0)
    assert mode.reads
