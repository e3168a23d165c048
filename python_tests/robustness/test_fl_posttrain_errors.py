"""Bad arguments of the federated simulator (FLConfig, the problems, the population, the Flower
client) and of post-training (the losses, the datasets, JointTrainer) raise TypeError/ValueError
whose message starts with the argument's name, never a raw IndexError, RuntimeError, KeyError or
AttributeError from inside; and a federated run that diverges stops with FloatingPointError naming
the round instead of going on with NaN."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # the property test skips, the table-driven tests run
    given = None

from molkernels.federated import FLConfig, OpenFLSimulator
from molkernels.federated.population import Population
from molkernels.federated.problems import LogRegProblem, QuadraticProblem, make_problem
from molkernels.posttrain import JointTrainer, PreferenceDataset, SFTDataset, precompute_reference_logps
from molkernels.posttrain.data import BatchStream, ByteTokenizer
from molkernels.posttrain.losses import dpo_loss, sequence_logps, sft_loss
from molkernels.posttrain.synthetic import make_data

TINY = dict(clients=4, dim=3, rounds=3, local_steps=2)


def raises(error, name):
    """pytest.raises for an error whose message starts with `name`."""
    return pytest.raises(error, match="^" + re.escape(name))


# ----------------------------------------------------------------------------------------------
# FLConfig: every field


BAD_FIELDS = [
    ("seed", 1.5), ("seed", -1), ("seed", 2 ** 64), ("seed", True), ("seed", "0"),
    ("clients", 2.5), ("clients", 0), ("dim", True), ("local_steps", "5"), ("rounds", -1), ("rounds", 3.0),
    ("kappa", "10"), ("kappa", math.nan), ("kappa", 0.5), ("kappa", math.inf),
    ("sigma", math.inf), ("sigma", -0.1), ("sigma", None),
    ("join_rate", "0.5"), ("join_rate", True), ("leave_rate", math.nan), ("initial_active", 1.5),
    ("lr", "0.1"), ("lr", math.nan), ("lr", -1.0), ("server_lr", 0.0), ("server_lr", math.inf),
    ("beta1", 1.0), ("beta1", -0.1), ("beta2", math.nan), ("eps", -1e-8), ("eps", "1e-8"),
    ("momentum", math.inf), ("momentum", -0.5), ("weight_decay", -0.1), ("weight_decay", math.nan),
    ("track_optimum", 1), ("device", "gpu"), ("device", 3.5), ("backend", "nope"), ("backend", None),
    ("algorithm", None), ("algorithm", "fedprox"), ("problem", ["quadratic"]), ("churn", "markov"),
    ("state_on_join", None), ("weighting", "loss"), ("init", 0), ("dtype", "float16"), ("dtype", torch.float32),
    ("problem_options", {"foo": 1}), ("problem_options", {"kappa": 3.0}), ("problem_options", [("basis", "identity")]),
]


@pytest.mark.parametrize("field, value", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v in BAD_FIELDS])
def test_every_flconfig_field_is_checked(field, value):
    with raises(ValueError, field):
        OpenFLSimulator(FLConfig(**{**TINY, field: value}))
    with raises(ValueError, field):  # validate() alone, as the CLI calls it for every sweep setting
        FLConfig(**{**TINY, field: value}).validate()


def test_logreg_kappa_is_checked_by_validate():
    """validate() alone (the CLI's check of every sweep setting) refuses κ = 1 for logreg, whose
    μ = 1/(κ − 1) needs κ > 1, and keeps κ = 1 for the quadratic."""
    with raises(ValueError, "kappa"):
        FLConfig(problem="logreg", kappa=1.0).validate()
    FLConfig(problem="quadratic", kappa=1.0).validate()


def test_cuda_device_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with raises(ValueError, "device: 'cuda', but no CUDA device is visible"):
        FLConfig(device="cuda").validate()


def test_simulator_arguments_are_checked():
    with raises(TypeError, "config: expected an FLConfig"):
        OpenFLSimulator({"clients": 4})
    with raises(TypeError, "clinets: not an FLConfig field"):
        OpenFLSimulator(FLConfig(**TINY), clinets=5)
    with raises(TypeError, "problem_instance: expected a Problem"):
        OpenFLSimulator(FLConfig(**TINY), problem_instance="quadratic")
    sim = OpenFLSimulator(FLConfig(**TINY))
    with raises(ValueError, "rounds: expected an integer >= 0"):
        sim.run("5")
    with raises(TypeError, "callback: expected callback(record)"):
        sim.run(1, callback=3)
    assert sim.round_index == 0 and sim.history == []


# ----------------------------------------------------------------------------------------------
# Divergence


@pytest.mark.parametrize("algorithm, lr, label", [("local_sgd", 50.0, "local SGD"), ("local_adam", 1e39, "local Adam")])
def test_a_diverged_run_names_its_round(algorithm, lr, label):
    """The round whose server model becomes non-finite raises FloatingPointError naming it, the
    algorithm and the learning rate; the history ends with that round, every earlier model was
    finite."""
    sim = OpenFLSimulator(FLConfig(**dict(TINY, rounds=50), algorithm=algorithm, lr=lr, sigma=0.0, join_rate=0.0,
                                   leave_rate=0.0))
    expected = r"^round (\d+): the server model became non-finite " + re.escape(f"({label}, lr={lr:g},")
    with pytest.raises(FloatingPointError, match=expected) as caught:
        sim.run()
    diverged = int(re.match(r"round (\d+)", str(caught.value)).group(1))
    assert [r["round"] for r in sim.history] == list(range(diverged + 1))
    assert all(math.isfinite(r["norm"]) for r in sim.history[:-1])
    assert not math.isfinite(sim.history[-1]["norm"]) and not bool(torch.isfinite(sim.x).all())


def test_a_stable_run_does_not_raise():
    history = OpenFLSimulator(FLConfig(**dict(TINY, rounds=20))).run()
    assert len(history) == 20 and all(math.isfinite(r["norm"]) for r in history)


# ----------------------------------------------------------------------------------------------
# Problems, population, Flower


@pytest.mark.parametrize("kwargs, name", [
    (dict(sigma="x"), "sigma"), (dict(heterogeneity=math.nan), "heterogeneity"), (dict(heterogeneity=-1.0), "heterogeneity"),
    (dict(curvature_spread="0.5"), "curvature_spread"), (dict(min_size=2.5), "min_size"), (dict(max_size="10"), "max_size"),
    (dict(min_size=20, max_size=10), "min_size"), (dict(dim=2.0), "dim"), (dict(kappa=None), "kappa"),
    (dict(dtype=torch.int64), "dtype"), (dict(dtype="float32"), "dtype"), (dict(device="gpu"), "device"),
    (dict(basis=None), "basis"), (dict(clients="4"), "clients"),
], ids=repr)
def test_quadratic_problem_arguments(kwargs, name):
    args = dict(clients=4, dim=3)
    args.update(kwargs)
    with pytest.raises((TypeError, ValueError), match="^" + name):
        QuadraticProblem(**args)


@pytest.mark.parametrize("kwargs, name", [
    (dict(batch_size=2.5), "batch_size"), (dict(batch_size=0), "batch_size"), (dict(label_skew=math.inf), "label_skew"),
    (dict(label_skew=0.0), "label_skew"), (dict(dataset=None), "dataset"), (dict(kappa="10"), "kappa"),
    (dict(sigma=math.nan), "sigma"), (dict(min_size=0), "min_size"),
], ids=repr)
def test_logreg_problem_arguments(kwargs, name):
    with pytest.raises((TypeError, ValueError), match="^" + name):
        LogRegProblem(4, **kwargs)


def test_make_problem_names_the_bad_option():
    with raises(TypeError, "foo: not an option of the quadratic problem"):
        make_problem("quadratic", 4, foo=1)
    with raises(TypeError, "dataset: not an option of the quadratic problem"):
        make_problem("quadratic", 4, dataset="digits")
    with raises(ValueError, "problem: unknown None"):
        make_problem(None, 4)


@pytest.mark.parametrize("kwargs, name", [
    (dict(join_rate="0.1"), "join_rate"), (dict(leave_rate=True), "leave_rate"), (dict(model=None), "model"),
    (dict(device="gpu"), "device"), (dict(initial_active=math.nan), "initial_active"),
], ids=repr)
def test_population_arguments(kwargs, name):
    with raises(ValueError, name):
        Population(4, **kwargs)


def _linear(context=None):
    return torch.nn.Linear(2, 1)


def _loss(model, context, step):
    return model(torch.ones(3, 2)).sum()


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1.0), "lr"), (dict(lr="0.1"), "lr"), (dict(local_steps=0), "local_steps"), (dict(beta1=1.0), "beta1"),
    (dict(beta2=math.nan), "beta2"), (dict(eps=-1.0), "eps"), (dict(weight_decay=math.inf), "weight_decay"),
    (dict(num_examples=-1), "num_examples"), (dict(num_examples=2.5), "num_examples"), (dict(state_key=""), "state_key"),
    (dict(model_fn=None), "model_fn"), (dict(loss_fn=3), "loss_fn"), (dict(backend=None), "backend"),
], ids=repr)
def test_flower_client_arguments(kwargs, name):
    from molkernels.federated.flower import LocalAdamClient

    args = dict(model_fn=_linear, loss_fn=_loss)
    args.update(kwargs)
    with pytest.raises((TypeError, ValueError), match="^" + name):
        LocalAdamClient(**args)


def test_flower_local_training_checks_its_state_and_loss():
    flwr_app = pytest.importorskip("flwr.app")
    from molkernels.federated.flower import STATE_KEY, local_adam_train, save_adam_state

    model = _linear()
    state = flwr_app.RecordDict()
    save_adam_state(state, torch.zeros(1, 3), torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64))
    with raises(ValueError, f"state[{STATE_KEY!r}]: exp_avg_sq (1, 2) and step (1,), expected (1, 3)"):
        local_adam_train(model, lambda m, s: m(torch.ones(3, 2)).sum(), state, local_steps=1, lr=0.1)
    save_adam_state(state, torch.zeros(1, 3), torch.zeros(1, 3), torch.full((1,), -2, dtype=torch.int64))
    with raises(ValueError, f"state[{STATE_KEY!r}]['step']"):
        local_adam_train(model, lambda m, s: m(torch.ones(3, 2)).sum(), state, local_steps=1, lr=0.1)
    with raises(ValueError, "loss_fn: must return a scalar loss tensor"):
        local_adam_train(model, lambda m, s: m(torch.ones(3, 2)), flwr_app.RecordDict(), local_steps=1, lr=0.1)
    with raises(TypeError, "model: expected a torch.nn.Module"):
        local_adam_train(None, _loss, flwr_app.RecordDict(), local_steps=1, lr=0.1)


# ----------------------------------------------------------------------------------------------
# Post-training losses


def _logits_labels(V=7):
    return torch.randn(2, 5, V), torch.randint(0, V, (2, 5))


@pytest.mark.parametrize("loss", [sft_loss, sequence_logps], ids=lambda f: f.__name__)
def test_labels_out_of_range_are_named(loss):
    logits, labels = _logits_labels()
    labels[1, 3] = 7
    with raises(ValueError, "labels: [1, 3] is 7, not a token id in [0, 7)"):
        loss(logits, labels)
    labels[1, 3] = -5
    with raises(ValueError, "labels: [1, 3] is -5"):
        loss(logits, labels)
    labels[1, 3] = -1  # ignore_index may be any int: then -1 is ignored and -100 is out of range
    loss(logits, labels, ignore_index=-1)
    with raises(ValueError, "labels: [1, 3] is -1"):
        loss(logits, labels)


@pytest.mark.parametrize("loss", [sft_loss, sequence_logps], ids=lambda f: f.__name__)
def test_logits_and_labels_of_the_wrong_kind(loss):
    logits, labels = _logits_labels()
    with raises(TypeError, "labels: expected an integer tensor"):
        loss(logits, labels.to(torch.uint8))
    with raises(TypeError, "labels: expected a torch.Tensor"):
        loss(logits, labels.tolist())
    with raises(ValueError, "labels: expected shape (2, 5)"):
        loss(logits, labels[:, :4])
    with raises(ValueError, "logits: the vocabulary dimension V is empty"):
        loss(torch.randn(2, 5, 0), labels)
    with raises(ValueError, "logits: expected a floating [B, T, V] tensor"):
        loss(logits.long(), labels)
    with raises(TypeError, "logits: expected a dense"):
        loss(logits.to_sparse(), labels)
    with raises(TypeError, "ignore_index: expected an int"):
        loss(logits, labels, ignore_index=-100.0)


def test_property_sft_loss_is_cross_entropy_or_names_the_bad_label():
    """Hypothesis: labels drawn from [-110, V + 5]: either every label is a token id or -100 and
    sft_loss is torch's shifted cross entropy, or the error names `labels` and the first bad one."""
    if given is None:
        pytest.skip("hypothesis is not installed")
    V = 6

    @settings(max_examples=40, deadline=None, derandomize=True, database=None)
    @given(values=st.lists(st.sampled_from([-110, -100, -1, 0, 1, V - 1, V, V + 5]), min_size=8, max_size=8))
    def run(values):
        labels = torch.tensor(values).view(2, 4)
        logits = torch.linspace(-2, 2, 2 * 4 * V).view(2, 4, V)
        bad = (labels != -100) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            b, t = torch.nonzero(bad)[0].tolist()
            with raises(ValueError, f"labels: [{b}, {t}] is {values[4 * b + t]},"):
                sft_loss(logits, labels)
            return
        expected = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
        got = sft_loss(logits, labels)
        assert torch.allclose(got, expected, equal_nan=True, rtol=1e-6, atol=1e-6), (got, expected)

    run()


@pytest.mark.parametrize("change, name", [
    (dict(label_smoothing="a"), "label_smoothing"), (dict(label_smoothing=True), "label_smoothing"),
    (dict(beta=math.nan), "beta"), (dict(beta=math.inf), "beta"), (dict(loss_type=None), "loss_type"),
    (dict(loss_type=["ipo"]), "loss_type"),
], ids=repr)
def test_dpo_loss_options(change, name):
    logps = [torch.zeros(3) for _ in range(4)]
    with raises(ValueError, name):
        dpo_loss(*logps, **change)


def test_dpo_loss_inputs():
    good = torch.zeros(3)
    with raises(ValueError, "ref_chosen_logps: expected a floating [B] tensor"):
        dpo_loss(good, good, torch.zeros(3, 1), good)
    with raises(ValueError, "policy_rejected_logps: expected a floating [B] tensor"):
        dpo_loss(good, torch.zeros(3, dtype=torch.long), good, good)
    with raises(TypeError, "ref_rejected_logps: expected a torch.Tensor"):
        dpo_loss(good, good, good, [0.0, 0.0, 0.0])
    with raises(ValueError, "ref_rejected_logps: has batch size 2"):
        dpo_loss(good, good, good, torch.zeros(2))


# ----------------------------------------------------------------------------------------------
# Post-training data and JointTrainer

SFT, PREF = make_data(6, 6, seed=5)


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(258, 4)
        self.out = torch.nn.Linear(4, 258)

    def forward(self, input_ids, attention_mask):
        return self.out(self.embed(input_ids))


def _trainer_args(**changes):
    model = TinyLM()
    args = dict(policy=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), sft_data=SFT, pref_data=PREF,
                method="mix", batch_size=2, progress=False)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes, error, name", [
    (dict(method="dpo"), ValueError, "method"), (dict(method=None), ValueError, "method"),
    (dict(lam=1.5), ValueError, "lam"), (dict(lam=-0.1), ValueError, "lam"), (dict(lam=math.nan), ValueError, "lam"),
    (dict(lam="0.5"), ValueError, "lam"), (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=2.0), ValueError, "batch_size"), (dict(seed=1.5), ValueError, "seed"),
    (dict(seed=-1), ValueError, "seed"), (dict(seed=2 ** 32), ValueError, "seed"), (dict(seed=True), ValueError, "seed"),
    (dict(grad_accum=0), ValueError, "grad_accum"), (dict(beta=0.0), ValueError, "beta"),
    (dict(max_length=1), ValueError, "max_length"), (dict(loss_type=None), ValueError, "loss_type"),
    (dict(normalize=None), ValueError, "normalize"), (dict(progress="yes"), ValueError, "progress"),
    (dict(backend="nope"), ValueError, "backend"), (dict(method="moco", backend="nope"), ValueError, "backend"),
    (dict(backend=None), ValueError, "backend"), (dict(moco_beta=2.0), ValueError, "moco_beta"),
    (dict(policy=None), TypeError, "policy"), (dict(optimizer=None), TypeError, "optimizer"),
    (dict(optimizer=torch.optim.SGD(TinyLM().parameters(), lr=0.1)), ValueError, "optimizer: does not hold"),
    (dict(sft_data=3), TypeError, "sft_data: expected a list of records"),
    (dict(pref_data={"prompt": "p"}), TypeError, "pref_data: expected a list of records"),
    (dict(sft_data="/nonexistent/sft.jsonl"), FileNotFoundError, "sft_data: no such file"),
    (dict(tokenizer=3), TypeError, "tokenizer: expected a callable"),
], ids=repr)
def test_joint_trainer_arguments(changes, error, name):
    with raises(error, name):
        JointTrainer(**_trainer_args(**changes))


class WordTokenizer(ByteTokenizer):
    """Returns words instead of token ids: a tokenizer bug the datasets must name."""

    def __call__(self, text):
        return text.split()


def test_datasets_check_tokens_records_and_streams():
    with raises(ValueError, "tokenizer: returned 'translate:' for sft_data record 0 field 'prompt'"):
        SFTDataset(SFT, WordTokenizer())
    bad_reference = [dict(r, ref_chosen_logps=-1.0, ref_rejected_logps=-2.0) for r in PREF]
    bad_reference[2]["ref_chosen_logps"] = math.nan
    with raises(ValueError, "pref_data: record 2 field 'ref_chosen_logps' is nan"):
        PreferenceDataset(bad_reference, ByteTokenizer())
    with raises(ValueError, "size: expected an integer >= 1"):
        BatchStream(0, 2, 0)
    with raises(ValueError, "seed: expected an integer >= 0"):
        BatchStream(4, 2, 0.5)


def test_trainer_methods_check_their_arguments():
    trainer = JointTrainer(**_trainer_args())
    with raises(ValueError, "batch_size: expected an integer >= 1"):
        trainer.evaluate(trainer.sft_data, trainer.pref_data, batch_size=0)
    with raises(TypeError, "sft_data: expected an SFTDataset"):
        trainer.evaluate(SFT, trainer.pref_data)
    with raises(TypeError, "callback: expected callback(trainer, record)"):
        trainer.train(1, callback=3)
    with raises(ValueError, "name: expected one of ('sft', 'dpo')"):
        trainer.objective("kto", trainer.sft_data.batch([0]))
    with raises(ValueError, "batch_size: expected an integer >= 1"):
        precompute_reference_logps(TinyLM(), trainer.pref_data, batch_size=0)
    with raises(TypeError, "data: expected a PreferenceDataset"):
        precompute_reference_logps(TinyLM(), PREF)
    assert trainer.step_count == 0 and trainer.history == []


class DictLM(TinyLM):
    """Returns its logits in a dict: not a form the trainer knows."""

    def forward(self, input_ids, attention_mask):
        return {"scores": super().forward(input_ids, attention_mask)}


def test_a_policy_output_without_logits_is_named():
    model = DictLM()
    trainer = JointTrainer(**_trainer_args(policy=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)))
    with raises(TypeError, "policy: returned a dict; expected logits"):
        trainer.step()
    assert trainer.step_count == 0
