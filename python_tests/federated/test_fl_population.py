"""The churn models of molkernels.federated.population: counts follow the model, ids, determinism."""

import pytest
import torch

from molkernels.federated.population import Population, stationary_fraction


def _run(pop, rounds, seed=0):
    g = torch.Generator().manual_seed(seed)
    pop.start(g)
    out = []
    for _ in range(rounds):
        before = pop.active.clone()
        joined, left = pop.step(g)
        out.append((before, joined.clone(), left.clone(), pop.active.clone(), pop.client_id.clone()))
    return out


def test_bernoulli_counts_follow_the_model():
    C, join, leave = 400, 0.2, 0.1
    pop = Population(C, model="bernoulli", join_rate=join, leave_rate=leave)
    rounds = _run(pop, 300)
    departures = arrivals = exposed_active = exposed_empty = 0
    counts = []
    for before, joined, left, after, _ in rounds:
        # departures only from active slots, arrivals only into empty ones, and the masks explain the change
        assert not (left & ~before).any() and not (joined & before).any()
        assert torch.equal(after, (before & ~left) | joined)
        departures += int(left.sum()); exposed_active += int(before.sum())
        arrivals += int(joined.sum()); exposed_empty += int((~before).sum())
        counts.append(int(after.sum()))
    assert departures / exposed_active == pytest.approx(leave, abs=0.01)
    assert arrivals / exposed_empty == pytest.approx(join, abs=0.01)
    stationary = stationary_fraction("bernoulli", join, leave) * C
    assert sum(counts[50:]) / len(counts[50:]) == pytest.approx(stationary, rel=0.03)


def test_replacement_keeps_the_count_and_renews_ids():
    C = 200
    pop = Population(C, model="replacement", leave_rate=0.25)
    rounds = _run(pop, 50)
    assert pop.initial_active == 1.0
    seen = set(range(C))
    for before, joined, left, after, ids in rounds:
        assert torch.equal(joined, left) and bool(after.all()) and int(after.sum()) == C
        new = set(ids[joined].tolist())
        assert not (new & seen) and len(new) == int(joined.sum())  # every newcomer is a new client
        seen |= new
        assert int(left.sum()) > 0
    assert int(pop.next_id) == len(seen)


def test_no_churn_and_full_churn():
    pop = Population(10, join_rate=0.0, leave_rate=0.0)
    for before, joined, left, after, _ in _run(pop, 5):
        assert bool(after.all()) and not joined.any() and not left.any()
    pop = Population(10, join_rate=1.0, leave_rate=1.0, initial_active=1.0)
    for before, joined, left, after, _ in _run(pop, 4):
        assert torch.equal(after, ~before)  # everyone leaves, every empty slot fills


def test_ages_and_ids():
    pop = Population(30, join_rate=0.3, leave_rate=0.3)
    g = torch.Generator().manual_seed(1)
    pop.start(g)
    for _ in range(10):
        age_before, id_before, active_before = pop.age.clone(), pop.client_id.clone(), pop.active.clone()
        joined, left = pop.step(g)
        stay = active_before & ~left
        assert torch.equal(pop.age[stay], age_before[stay] + 1) and torch.equal(pop.client_id[stay], id_before[stay])
        assert bool((pop.age[joined] == 0).all())
        assert bool((pop.client_id[~pop.active] == -1).all())


def test_deterministic_and_resumable():
    a, b = Population(50, join_rate=0.2, leave_rate=0.3), Population(50, join_rate=0.2, leave_rate=0.3)
    ra, rb = _run(a, 20, seed=3), _run(b, 20, seed=3)
    assert all(torch.equal(x, y) for u, v in zip(ra, rb) for x, y in zip(u, v))
    c = Population(50, join_rate=0.2, leave_rate=0.3)
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.active, a.active) and torch.equal(c.client_id, a.client_id) and int(c.next_id) == int(a.next_id)


@pytest.mark.parametrize("kwargs, name", [
    (dict(join_rate=1.5), "join_rate"), (dict(leave_rate=-0.1), "leave_rate"), (dict(join_rate=float("nan")), "join_rate"),
    (dict(initial_active=2.0), "initial_active"), (dict(model="poisson"), "poisson"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Population(10, **kwargs)


@pytest.mark.parametrize("clients", [0, -3, 2.5, True])
def test_bad_clients(clients):
    with pytest.raises(ValueError, match="clients"):
        Population(clients)
