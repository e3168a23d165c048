"""The open-system simulator: one kernel call per local step for all clients, equality with a
per-client torch.optim loop, reset/inherit on join, determinism, bitwise resume, bad input."""

import dataclasses
import io
import json
import math

import pytest
import torch

import molkernels.federated.kernels as fl_kernels
from molkernels.federated import FLConfig, OpenFLSimulator
from molkernels.federated.baseline import PerClientLoopSimulator

def _same(history_a, history_b):
    """Equal histories, NaN (rounds without an optimum) equal to NaN; floats compared exactly."""
    return json.dumps(history_a) == json.dumps(history_b)


SMALL = FLConfig(clients=16, dim=6, rounds=12, local_steps=3, join_rate=0.3, leave_rate=0.3, sigma=0.5, kappa=20.0)


def _counting(monkeypatch, name):
    calls = []
    original = getattr(fl_kernels, name)

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(fl_kernels, name, counted)
    return calls


@pytest.mark.parametrize("algorithm, kernel", [("local_adam", "batched_adam_step"), ("local_sgd", "batched_sgd_step")])
@pytest.mark.parametrize("clients", [5, 64])
def test_one_kernel_call_per_local_step_whatever_the_number_of_clients(monkeypatch, algorithm, kernel, clients):
    steps = _counting(monkeypatch, kernel)
    means = _counting(monkeypatch, "masked_weighted_mean")
    sim = OpenFLSimulator(SMALL, algorithm=algorithm, clients=clients, join_rate=0.0, leave_rate=0.0)
    grads = []
    original_grad = sim.problem.grad
    sim.problem.grad = lambda X, g: grads.append(X.shape) or original_grad(X, g)
    sim.run(4)
    assert len(steps) == 4 * SMALL.local_steps and len(grads) == 4 * SMALL.local_steps and len(means) == 4
    assert all(shape == (clients, SMALL.dim) for shape in steps + grads + means)


@pytest.mark.parametrize("problem", ["quadratic", "logreg"])
@pytest.mark.parametrize("algorithm, extra", [("local_adam", {}), ("local_sgd", {}), ("local_sgd", {"momentum": 0.9}),
                                               ("local_adam", {"state_on_join": "inherit", "weight_decay": 0.01})])
def test_batched_run_equals_a_loop_of_torch_optimizers(problem, algorithm, extra):
    config = dataclasses.replace(SMALL, problem=problem, algorithm=algorithm, rounds=6, **extra)
    batched, looped = OpenFLSimulator(config), PerClientLoopSimulator(config)
    batched.run(), looped.run()
    assert sum(r["joined"] for r in batched.history) > 0 and sum(r["left"] for r in batched.history) > 0
    assert torch.allclose(batched.x, looped.x, rtol=1e-5, atol=1e-6)
    for a, b in zip(batched.history, looped.history):
        assert a["active"] == b["active"] and a["distance"] == pytest.approx(b["distance"], rel=1e-4, abs=1e-6)


def test_adam_state_lives_on_clients_and_resets_on_join():
    sim = OpenFLSimulator(SMALL, algorithm="local_adam", join_rate=0.4, leave_rate=0.4)
    sim.run(3)
    seen_steps = sim.step.clone()
    active_before = sim.population.active.clone()
    ids_before = sim.population.client_id.clone()
    sim.round()
    active, ids = sim.population.active, sim.population.client_id
    stayed = active_before & active & (ids == ids_before)
    joined = active & ~(active_before & (ids == ids_before))
    E = SMALL.local_steps
    assert stayed.any() and joined.any()
    # a client that stayed continues its step count (bias correction goes on across rounds)
    assert torch.equal(sim.step[stayed], seen_steps[stayed] + E)
    # a new client starts from step 0: exactly E steps after its first round
    assert bool((sim.step[joined] == E).all())
    # empty slots are untouched
    gone = ~active
    assert torch.equal(sim.step[gone], seen_steps[gone])


def test_inherit_keeps_the_slots_state():
    config = dataclasses.replace(SMALL, algorithm="local_adam", churn="replacement", leave_rate=0.5, join_rate=0.0,
                                 state_on_join="inherit")
    sim = OpenFLSimulator(config)
    sim.run(2)
    before_steps = sim.step.clone()
    record = sim.round()
    assert record["joined"] > 0
    # every slot is active under replacement; with inherit every slot continues its count, newcomers too
    assert torch.equal(sim.step, before_steps + SMALL.local_steps)
    reset = OpenFLSimulator(dataclasses.replace(config, state_on_join="reset"))
    reset.run(3)
    assert bool((reset.step < sim.step).any())


def test_replacement_keeps_every_slot_active():
    sim = OpenFLSimulator(SMALL, churn="replacement", leave_rate=0.3)
    history = sim.run(5)
    assert all(r["active"] == SMALL.clients and r["joined"] == r["left"] for r in history)


def test_rounds_without_clients_leave_the_model_unchanged():
    sim = OpenFLSimulator(SMALL, join_rate=0.0, leave_rate=1.0)
    x0 = sim.x.clone()
    history = sim.run(3)
    assert [r["active"] for r in history] == [0, 0, 0]
    assert all(math.isnan(r["distance"]) for r in history)
    assert torch.equal(sim.x, x0)


def test_init_and_metrics():
    sim = OpenFLSimulator(SMALL, init="optimum")
    x_star0 = sim.problem.optimum(sim.population.active, sim.weights())
    assert torch.allclose(sim.x.double(), x_star0, atol=1e-6)
    assert float(OpenFLSimulator(SMALL, init="zero").x.abs().max()) == 0.0
    r = sim.round()
    x_star = sim.problem.optimum(sim.population.active, sim.weights())
    assert r["distance"] == pytest.approx(float(torch.linalg.vector_norm(sim.x.double() - x_star)), rel=1e-9)
    assert r["norm"] == pytest.approx(float(torch.linalg.vector_norm(sim.x.double())), rel=1e-9)
    assert r["gap"] >= -1e-9 and r["active"] == int(sim.population.active.sum())


@pytest.mark.parametrize("problem", ["quadratic", "logreg"])
def test_deterministic_given_the_seed(problem):
    a = OpenFLSimulator(SMALL, problem=problem, seed=7)
    b = OpenFLSimulator(SMALL, problem=problem, seed=7)
    c = OpenFLSimulator(SMALL, problem=problem, seed=8)
    a.run(), b.run(), c.run()
    assert torch.equal(a.x, b.x) and _same(a.history, b.history)
    assert not torch.equal(a.x, c.x)


@pytest.mark.parametrize("problem, algorithm", [("quadratic", "local_adam"), ("quadratic", "local_sgd"),
                                                ("logreg", "local_adam")])
def test_resume_is_bitwise_identical(problem, algorithm):
    config = dataclasses.replace(SMALL, problem=problem, algorithm=algorithm, momentum=0.5, problem_options=(
        {"batch_size": 4} if problem == "logreg" else {}))
    straight = OpenFLSimulator(config)
    straight.run(10)
    first = OpenFLSimulator(config)
    first.run(4)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    first.run(3)  # the saved state must not alias the live tensors
    buffer.seek(0)
    resumed = OpenFLSimulator(config, seed=config.seed)
    resumed.run(2)  # whatever it did before loading is overwritten
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    resumed.run(6)
    assert resumed.round_index == 10
    assert torch.equal(resumed.x, straight.x) and torch.equal(resumed.client_params, straight.client_params)
    for name in ("exp_avg", "exp_avg_sq", "step", "momentum_buffer"):
        a, b = getattr(resumed, name), getattr(straight, name)
        assert (a is None and b is None) or torch.equal(a, b)
    assert _same(resumed.history, straight.history)


def test_load_state_dict_rejects_another_config():
    state = OpenFLSimulator(SMALL).state_dict()
    with pytest.raises(ValueError, match="kappa"):
        OpenFLSimulator(SMALL, kappa=3.0).load_state_dict(state)
    OpenFLSimulator(SMALL, rounds=99).load_state_dict(state)  # the number of rounds may differ


@pytest.mark.parametrize("override, name", [
    (dict(algorithm="fedprox"), "fedprox"), (dict(problem="svm"), "svm"), (dict(join_rate=1.2), "join_rate"),
    (dict(leave_rate=-0.5), "leave_rate"), (dict(clients=0), "clients"), (dict(local_steps=0), "local_steps"),
    (dict(churn="markov"), "markov"), (dict(state_on_join="keep"), "keep"), (dict(weighting="loss"), "loss"),
    (dict(lr=-1.0), "lr"), (dict(server_lr=0.0), "server_lr"), (dict(sigma=float("nan")), "sigma"),
    (dict(kappa=0.5), "kappa"), (dict(dtype="float16"), "float16"), (dict(init="random"), "random"),
])
def test_bad_config(override, name):
    with pytest.raises(ValueError, match=name):
        OpenFLSimulator(SMALL, **override)


def test_uniform_weighting_and_server_lr():
    sim = OpenFLSimulator(SMALL, weighting="uniform", server_lr=0.5)
    x_prev = sim.x.clone()
    r = sim.round()
    assert r["active"] > 0
    assert torch.allclose(sim.weights(), torch.ones(SMALL.clients))
    mean = sim.client_params[sim.population.active].mean(0)
    assert torch.allclose(sim.x, x_prev + 0.5 * (mean - x_prev), atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("problem", ["quadratic", "logreg"])
@pytest.mark.parametrize("algorithm", ["local_adam", "local_sgd"])
def test_cuda_simulator_equals_a_loop_of_torch_optimizers(problem, algorithm):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device is visible (torch.cuda.is_available() is False)")
    config = dataclasses.replace(SMALL, problem=problem, algorithm=algorithm, rounds=6, device="cuda")
    batched, looped = OpenFLSimulator(config), PerClientLoopSimulator(config)
    batched.run(), looped.run()
    assert batched.x.device.type == "cuda"
    assert torch.allclose(batched.x, looped.x, rtol=1e-5, atol=1e-6)
    for a, b in zip(batched.history, looped.history):
        assert a["active"] == b["active"] and a["distance"] == pytest.approx(b["distance"], rel=1e-4, abs=1e-6)
    resumed = OpenFLSimulator(config)
    resumed.load_state_dict(OpenFLSimulator(config).state_dict())
    resumed.run()
    assert _same(resumed.history, batched.history)
