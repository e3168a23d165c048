"""State loaders of OpenFLSimulator (and the Population and Problem states it restores) and of
JointTrainer: a valid state round-trips bitwise; every corrupted state (a wrong shape, dtype, value
range, counter, generator state, a missing or unknown key, a state of another configuration or
class) raises TypeError/ValueError whose message starts with the entry's key, and leaves the
object bitwise unchanged (state_dict() before and after compared entry by entry, tensors with
torch.equal-like exactness)."""

import copy
import math
import re

import pytest
import torch

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # the property test skips, the table-driven tests run
    given = None

from molkernels.federated import FLConfig, OpenFLSimulator
from molkernels.federated.baseline import PerClientLoopSimulator
from molkernels.federated.population import Population
from molkernels.federated.problems import make_problem
from molkernels.posttrain import JointTrainer
from molkernels.posttrain.synthetic import make_data

SMALL = FLConfig(clients=6, dim=3, rounds=4, local_steps=2, join_rate=0.4, leave_rate=0.4, sigma=0.5)


def assert_same_state(a, b, where="state"):
    """a and b equal entry by entry: tensors of one dtype and shape with bitwise-equal values
    (NaN equal to NaN), floats equal or both NaN, everything else ==."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=where)
    elif isinstance(a, float):
        assert a == b or (math.isnan(a) and math.isnan(b)), where
    else:
        assert a == b, where


def assert_refused(target, state, key, error=(TypeError, ValueError)):
    """target.load_state_dict(state) raises `error` with a message starting with `key`, and
    target's state is bitwise what it was."""
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(error, match="^" + re.escape(key)):
        target.load_state_dict(state)
    assert_same_state(target.state_dict(), before)


def assert_corruption_refused(target, good_state, corrupt, key):
    """corrupt(a copy of good_state) is refused as assert_refused says (good_state untouched)."""
    state = copy.deepcopy(good_state)
    corrupt(state)
    assert_refused(target, state, key)


# ----------------------------------------------------------------------------------------------
# OpenFLSimulator


def _simulator(config=SMALL, rounds=3, **overrides):
    sim = OpenFLSimulator(config, **overrides)
    sim.run(rounds)
    return sim


@pytest.fixture(scope="module")
def fl_state():
    return _simulator().state_dict()


@pytest.fixture(scope="module")
def fl_target():
    """The simulator that every corrupted state is loaded into (a refused load leaves it as it was,
    which each test checks, so the tests can share it)."""
    return _simulator(rounds=2)


def _set(path, value):
    """A corruption: state[path[0]][path[1]]... = value (value(old) when callable)."""
    def corrupt(state):
        node = state
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value(node[path[-1]]) if callable(value) else value
    return corrupt


def _delete(path):
    def corrupt(state):
        node = state
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]
    return corrupt


def _first_active_slot_id(value):
    def corrupt(state):
        population = state["population"]
        population["client_id"][torch.nonzero(population["active"])[0, 0]] = value
    return corrupt


FL_CORRUPTIONS = [
    # (id, corruption, the key the error names)
    ("x broadcast from one entry", _set(("tensors", "x"), torch.tensor([7.0])),
     "state['tensors']['x']: shape (1,), expected (3,)"),
    ("x cast from float64", _set(("tensors", "x"), lambda x: x.double()), "state['tensors']['x']: dtype"),
    ("x a list", _set(("tensors", "x"), [0.0, 0.0, 0.0]), "state['tensors']['x']: expected a torch.Tensor"),
    ("x NaN", _set(("tensors", "x"), lambda x: torch.full_like(x, math.nan)), "state['tensors']['x']: has non-finite"),
    ("client_params transposed", _set(("tensors", "client_params"), lambda x: x.T.contiguous()),
     "state['tensors']['client_params']: shape (3, 6)"),
    ("exp_avg_sq negative", _set(("tensors", "exp_avg_sq"), lambda v: v - 1.0), "state['tensors']['exp_avg_sq']"),
    ("step negative", _set(("tensors", "step"), lambda t: t - 100), "state['tensors']['step']"),
    ("step beyond rounds x local steps", _set(("tensors", "step"), lambda t: t + 1000), "state['tensors']['step']"),
    ("step as float", _set(("tensors", "step"), lambda t: t.double()), "state['tensors']['step']: dtype"),
    ("momentum buffer for Adam", _set(("tensors", "momentum_buffer"), torch.zeros(6, 3)),
     "state['tensors']['momentum_buffer']"),
    ("no exp_avg", _set(("tensors", "exp_avg"), None), "state['tensors']['exp_avg']: missing"),
    ("tensors missing step", _delete(("tensors", "step")), "state['tensors']['step']: missing"),
    ("round negative", _set(("round",), -1), "state['round']"),
    ("round fractional", _set(("round",), 2.5), "state['round']"),
    ("round a bool", _set(("round",), True), "state['round']"),
    ("round off the history", _set(("round",), 7), "state['history']"),
    ("history record lost", _set(("history",), lambda h: h[:-1]), "state['history']"),
    ("history record renumbered", _set(("history", 1, "round"), 5), "state['history'][1]['round']"),
    ("history record without distance", _delete(("history", 0, "distance")), "state['history'][0]['distance']"),
    ("x_star float32", _set(("x_star",), lambda x: x.float()), "state['x_star']: dtype"),
    ("x_star wrong shape", _set(("x_star",), torch.zeros(4, dtype=torch.float64)), "state['x_star']: shape"),
    ("generator missing", _delete(("generator",)), "state['generator']: missing"),
    ("generator truncated", _set(("generator",), lambda g: g[:100]), "state['generator']: shape (100,)"),
    ("generator garbage", _set(("generator",), lambda g: torch.zeros_like(g)), "state['generator']: not a valid"),
    ("generator as int64", _set(("generator",), lambda g: g.long()), "state['generator']"),
    ("unknown key", _set(("extra",), 1), "state['extra']: unknown key"),
    ("config of another clients count", _set(("config", "clients"), 7), "state['config']: saved with a different config (clients)"),
    ("config of another dimension", _set(("config", "dim"), 4), "state['config']: saved with a different config (dim)"),
    ("config of another method", _set(("config", "algorithm"), "local_sgd"), "state['config']: saved with a different config (algorithm)"),
    ("config with an unknown field", _set(("config", "fedprox_mu"), 0.1), "state['config']: saved with a different config (fedprox_mu)"),
    ("config missing", _delete(("config",)), "state['config']: missing"),
    ("population active as float", _set(("population", "active"), lambda a: a.float()),
     "state['population']['active']: dtype"),
    ("population active of 5 slots", _set(("population", "active"), lambda a: a[:5]),
     "state['population']['active']: shape (5,), expected (6,)"),
    ("population of another join rate", _set(("population", "join_rate"), 0.9), "state['population']['join_rate']"),
    ("population of another churn model", _set(("population", "model"), "replacement"), "state['population']['model']"),
    ("population without age", _delete(("population", "age")), "state['population']['age']: missing"),
    ("population age negative", _set(("population", "age"), lambda a: a - 50), "state['population']['age']"),
    ("an active slot without a client", _first_active_slot_id(-1), "state['population']['client_id']"),
    ("a client id at next_id", _first_active_slot_id(10 ** 6), "state['population']['client_id']"),
    ("problem lam of one slot", _set(("problem", "lam"), lambda v: v[:1]), "state['problem']['lam']: shape (1, 3)"),
    ("problem curvature above 1", _set(("problem", "lam"), lambda v: v * 2), "state['problem']['lam']"),
    ("problem fractional sizes", _set(("problem", "n"), lambda n: n + 0.5), "state['problem']['n']"),
    ("problem basis not orthogonal", _set(("problem", "Q64"), lambda q: q * 2), "state['problem']['Q64']"),
    ("problem Q not Q64", _set(("problem", "Q"), lambda q: q.flip(0)), "state['problem']['Q']"),
    ("problem unknown entry", _set(("problem", "A"), torch.eye(3)), "state['problem']['A']: unknown key"),
    ("a Population state", lambda state: (state.clear(), state.update(Population(6).state_dict())),
     "state['config']: missing"),
]


@pytest.mark.parametrize("corrupt, key", [pytest.param(c, k, id=i) for i, c, k in FL_CORRUPTIONS])
def test_simulator_refuses_a_corrupted_state_and_stays_unchanged(fl_state, fl_target, corrupt, key):
    assert_corruption_refused(fl_target, fl_state, corrupt, key)


def test_simulator_refuses_what_is_not_a_state():
    assert_refused(_simulator(rounds=1), [1, 2], "state: expected a dict", TypeError)


def test_simulator_refuses_another_algorithms_tensors():
    """local_sgd with momentum has a momentum buffer and no Adam state: the config differs, and
    the tensors would too."""
    sgd = _simulator(algorithm="local_sgd", momentum=0.5).state_dict()
    assert_refused(_simulator(rounds=1), sgd, "state['config']: saved with a different config (algorithm, momentum)")
    sgd["config"] = _simulator(rounds=1).config.to_dict()
    assert_refused(_simulator(rounds=1), sgd, "state['tensors']['exp_avg']: missing")


@pytest.mark.parametrize("problem, options", [("quadratic", {}), ("logreg", {"batch_size": 4})])
def test_simulator_round_trip_is_bitwise(problem, options):
    """A loaded state is the saved one, bit for bit, and both continue identically."""
    sim = _simulator(problem=problem, problem_options=options)
    saved = copy.deepcopy(sim.state_dict())
    target = _simulator(problem=problem, problem_options=options, rounds=1)
    target.load_state_dict(saved)
    assert_same_state(target.state_dict(), saved)
    sim.run(2), target.run(2)
    assert_same_state(target.state_dict(), sim.state_dict())


def test_logreg_problem_state_must_match_the_dataset():
    state = _simulator(problem="logreg").state_dict()
    target = _simulator(problem="logreg", rounds=1)
    for name, corrupt, key in [
        ("X", lambda p: p["X"].mul_(2), "state['problem']['X']: not the dataset's rows"),
        ("idx", lambda p: p["idx"].fill_(10 ** 6), "state['problem']['idx']"),
        ("mask", lambda p: p["mask"].fill_(1), "state['problem']['mask']"),
        ("y", lambda p: p["y"].add_(0.5), "state['problem']['y']"),
    ]:
        assert_corruption_refused(target, state, lambda s: corrupt(s["problem"]), key)


def test_population_and_problem_loaders_check_alone():
    """Population.load_state_dict and Problem.load_state_dict used on their own: the key names
    start at `state`, and a refused state changes nothing."""
    g = torch.Generator().manual_seed(1)
    population = Population(6, join_rate=0.3, leave_rate=0.3)
    population.start(g)
    state = population.state_dict()
    state["active"] = torch.ones(6)
    assert_refused(population, state, "state['active']: dtype")
    state = Population(6, join_rate=0.3, leave_rate=0.3).state_dict()
    assert_refused(Population(6, join_rate=0.3, leave_rate=0.5), state, "state['leave_rate']")
    problem = make_problem("quadratic", 6, dim=3)
    problem.reset(g)
    state = problem.state_dict()
    state["bq"] = state["bq"][:, :1]
    assert_refused(problem, state, "state['bq']: shape (6, 1), expected (6, 3)")


def test_per_client_loop_simulator_refuses_checkpoints():
    with pytest.raises(NotImplementedError, match="PerClientLoopSimulator: no checkpoints"):
        PerClientLoopSimulator(SMALL).load_state_dict(OpenFLSimulator(SMALL).state_dict())


def _tensor_leaves(state, path=()):
    """(path, tensor) for every tensor in a nested state."""
    if isinstance(state, torch.Tensor):
        yield path, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from _tensor_leaves(v, path + (k,))


def test_property_every_tensor_entry_is_checked(fl_state, fl_target):
    """Hypothesis: any tensor of the simulator's state with one entry more or fewer, or another
    dtype, is refused with its own key named, and the simulator stays unchanged."""
    if given is None:
        pytest.skip("hypothesis is not installed")
    leaves = list(_tensor_leaves(fl_state))
    other_dtype = {torch.float32: torch.float64, torch.float64: torch.float32, torch.bool: torch.uint8,
                   torch.int64: torch.int32, torch.uint8: torch.int16}

    @settings(max_examples=40, deadline=None, derandomize=True, database=None)
    @given(leaf=st.sampled_from(leaves), kind=st.sampled_from(["longer", "shorter", "dtype"]))
    def run(leaf, kind):
        path, value = leaf
        key = "state" + "".join(f"[{k!r}]" for k in path)
        flat = value.reshape(-1)
        corrupted = {"longer": lambda: torch.cat([flat, flat[:1]]),
                     "shorter": lambda: flat[1:],
                     "dtype": lambda: value.to(other_dtype[value.dtype])}[kind]()
        if kind != "dtype" and value.dim() != 1:
            corrupted = corrupted.reshape(-1)
        assert_corruption_refused(fl_target, fl_state, _set(path, corrupted), key)

    run()


# ----------------------------------------------------------------------------------------------
# JointTrainer

SFT, PREF = make_data(8, 8, seed=3)


class TinyLM(torch.nn.Module):
    """Embedding and read-out over ByteTokenizer's 258 ids: every parameter gets gradients."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(258, 4)
        self.out = torch.nn.Linear(4, 258)

    def forward(self, input_ids, attention_mask):
        return self.out(torch.tanh(self.embed(input_ids).cumsum(1)))


def _trainer(method="moco", steps=0, seed=0, reference=None, **kwargs):
    model = TinyLM(seed)
    trainer = JointTrainer(model, torch.optim.Adam(model.parameters(), lr=1e-2), SFT, PREF, method=method,
                           reference=reference, batch_size=2, total_steps=4, progress=False, **kwargs)
    if steps:
        trainer.train(steps)
    return trainer


@pytest.fixture(scope="module")
def trainer_state():
    return copy.deepcopy(_trainer(steps=2).state_dict())


@pytest.fixture(scope="module")
def trainer_target():
    """The trainer that every corrupted state is loaded into (shared, as fl_target)."""
    return _trainer(steps=1, seed=4)


def _optimizer_entry(name, value):
    return _set(("optimizer", "state", 0, name), value)


TRAINER_CORRUPTIONS = [
    ("policy entry broadcast", _set(("policy", "out.bias"), torch.zeros(1)),
     "state['policy']['out.bias']: shape (1,), expected (258,)"),
    ("policy entry cast", _set(("policy", "out.bias"), lambda t: t.double()), "state['policy']['out.bias']: dtype"),
    ("policy entry missing", _delete(("policy", "embed.weight")), "state['policy']['embed.weight']: missing"),
    ("policy entry unknown", _set(("policy", "head.weight"), torch.zeros(2)), "state['policy']['head.weight']: unknown"),
    ("policy not a dict", _set(("policy",), [1]), "state['policy']: expected a dict"),
    ("exp_avg of another shape", _optimizer_entry("exp_avg", torch.zeros(2)), "state['optimizer']['state'][0]['exp_avg']"),
    ("exp_avg cast", _optimizer_entry("exp_avg", lambda t: t.double()), "state['optimizer']['state'][0]['exp_avg']: dtype"),
    ("exp_avg NaN", _optimizer_entry("exp_avg", lambda t: torch.full_like(t, math.nan)),
     "state['optimizer']['state'][0]['exp_avg']: has non-finite"),
    ("optimizer step negative", _optimizer_entry("step", torch.tensor(-1.0)), "state['optimizer']['state'][0]['step']"),
    ("optimizer step fractional", _optimizer_entry("step", torch.tensor(1.5)), "state['optimizer']['state'][0]['step']"),
    ("optimizer state of parameter 9", _set(("optimizer", "state", 9), {}), "state['optimizer']['state'][9]"),
    ("optimizer group lost", _set(("optimizer", "param_groups"), lambda g: []), "state['optimizer']['param_groups']"),
    ("optimizer group of other parameters", _set(("optimizer", "param_groups", 0, "params"), [0]),
     "state['optimizer']['param_groups'][0]['params']"),
    ("optimizer group without lr", _delete(("optimizer", "param_groups", 0, "lr")),
     "state['optimizer']['param_groups'][0]['lr']: missing"),
    ("step negative", _set(("step",), -1), "state['step']"),
    ("step fractional", _set(("step",), 1.5), "state['step']"),
    ("step a bool", _set(("step",), True), "state['step']"),
    ("history record lost", _set(("history",), lambda h: h[:1]), "state['history']"),
    ("gap NaN", _set(("gaps", "sft"), math.nan), "state['gaps']['sft']"),
    ("gap missing", _delete(("gaps", "dpo")), "state['gaps']['dpo']: missing"),
    ("stream position negative", _set(("streams", "sft"), -1), "state['streams']['sft']"),
    ("stream position fractional", _set(("streams", "dpo"), 2.5), "state['streams']['dpo']"),
    ("choice generator garbage", _set(("choice_generator",), lambda g: torch.zeros_like(g)),
     "state['choice_generator']: not a valid"),
    ("torch RNG truncated", _set(("torch_rng",), lambda g: g[:8]), "state['torch_rng']: shape (8,)"),
    ("torch RNG missing", _delete(("torch_rng",)), "state['torch_rng']: missing"),
    ("unknown key", _set(("extra",), 1), "state['extra']: unknown key"),
    ("another lam", _set(("config", "lam"), 0.25), "state['config']: saved with a different configuration (lam)"),
    ("another seed", _set(("config", "seed"), 1), "state['config']: saved with a different configuration (seed)"),
    ("another batch size", _set(("config", "batch_size"), 4), "state['config']: saved with a different configuration (batch_size)"),
    ("another data set", _set(("config", "sft_records"), 9), "state['config']: saved with a different configuration (sft_records)"),
    ("another method", _set(("method",), "mix"), "state['method']: saved by method 'mix'"),
    ("MoCo's lambda broadcast", _set(("moco", "lam"), torch.tensor([0.5])), "state['moco']['lam']"),
    ("MoCo's state missing", _delete(("moco",)), "state['moco']: missing"),
]


@pytest.mark.parametrize("corrupt, key", [pytest.param(c, k, id=i) for i, c, k in TRAINER_CORRUPTIONS])
def test_trainer_refuses_a_corrupted_state_and_stays_unchanged(trainer_state, trainer_target, corrupt, key):
    assert_corruption_refused(trainer_target, trainer_state, corrupt, key)


def test_trainer_refuses_what_is_not_its_state():
    assert_refused(_trainer(), [1], "state: expected a dict", TypeError)
    assert_refused(_trainer(), _simulator(rounds=1).state_dict(), "state['method']: missing")


def test_trainer_refuses_a_state_without_its_reference_model():
    """A trainer with its own reference module (here the frozen copy of the policy it makes
    without one) needs that module's state, and refuses a reference state of another shape."""
    state = _trainer("mix", steps=1).state_dict()
    del state["reference"]
    target = _trainer("mix", reference=TinyLM(7))
    assert_refused(target, state, "state['reference']: missing")
    state["reference"] = {k: v[:1] for k, v in target.reference.state_dict().items()}
    assert_refused(target, state, "state['reference']['embed.weight']: shape (1, 4), expected (258, 4)")


@pytest.mark.parametrize("method", ["moco", "maxright"])
def test_trainer_round_trip_is_bitwise(method):
    """A loaded state is the saved one, bit for bit, and both trainers continue identically."""
    trainer = _trainer(method, steps=2)
    saved = copy.deepcopy(trainer.state_dict())
    target = _trainer(method, steps=1, seed=9)
    target.load_state_dict(copy.deepcopy(saved))
    assert_same_state(target.state_dict(), saved)
    trainer.train(2), target.train(2)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "peak_mem_bytes")} for r in h]  # noqa: E731
    assert strip(target.history) == strip(trainer.history)
    for a, b in zip(trainer.policy.parameters(), target.policy.parameters()):
        assert torch.equal(a, b)
