"""The open-system federated simulator: clients join and leave every round, local SGD or local Adam
on every active client, batched over all C client slots in one kernel call per local step.

One round t (`OpenFLSimulator.round`):

1. churn (population.Population.step): departures and arrivals under the churn model; every slot
   that receives a new client gets a fresh local objective (problem.renew: fresh local data) and, by
   default (state_on_join="reset"), fresh local optimiser state: Adam's m = v = 0 and step = 0, a
   zero momentum buffer (kernels.reset_client_state). With state_on_join="inherit" the newcomer
   keeps the slot's previous state (as if the device changed hands).
2. the population's optimum x*_t = argmin Σ_{c active} w_c f_c (problems.py; in float64).
3. local training: every active client starts from the server model x_{t−1} and takes
   `local_steps` (E) steps on its own stochastic gradients (problem.grad, one batched computation
   for all C rows), each step one call of kernels.batched_adam_step (local_adam) or
   kernels.batched_sgd_step (local_sgd) for all clients, masked by `active`. There is no loop over
   clients in Python; inactive slots' gradients are computed with the rest (the batch is the slot
   array) but their rows are never updated.
4. aggregation: x_t = x_{t−1} + η_s (x̄_t − x_{t−1}) with x̄_t = kernels.masked_weighted_mean of
   the active clients' models, weights w_c = local data size n_c (weighting="size") or 1
   ("uniform"); η_s = server_lr (1: plain FedAvg, x_t = x̄_t exactly).
5. metrics: ‖x_t − x*_t‖ (the distance of the round's model to the optimum of the round's
   population), ‖x_t‖, F_t(x_t) − F_t(x*_t), ‖x*_t − x*_{t−1}‖ (how far churn moved the target),
   the number of active clients, joins and departures.

A round in which no client is active (possible under bernoulli churn) leaves x unchanged and has
no optimum: its distance and gap are NaN and summaries skip it. track_optimum=False skips x*_t and
the metrics that need it (they are NaN): the benchmark's setting, which times the FL round alone.

A round whose server model x_t is not finite (the local optimiser diverged: a learning rate too
large for the curvature) is recorded in `history` like any other and then raises
FloatingPointError naming the round, the algorithm and the learning rates: a diverged run stops at
the round where it diverged instead of going on with NaN distances.

The server model starts at x_0 = x*_0, the optimum of the round-0 population (init="optimum", the
default: the run measures stability, not the approach from far away), or at 0 (init="zero").

Local Adam state lives on the clients: each slot keeps its client's m, v and step count across
rounds (the local model restarts from the server model every round, the optimiser state does not),
so a client's bias correction continues where it stopped; it is reset only when a new client takes
the slot. Momentum buffers of local SGD (momentum > 0) are kept the same way.

Determinism and checkpoints: every random draw (churn, fresh objectives, gradient noise) comes from
one torch.Generator seeded with `seed`, in a fixed order, and draws are made for all C slots whatever
their activity, so a run is a function of its config. `state_dict()` holds the whole simulator
(config, round, server model, client rows, optimiser state, population, problem data, generator
state, history); `load_state_dict` into a simulator built with the same config continues the run
bitwise identically. load_state_dict checks the whole state first (every key, shape, dtype and value
range, and the config) and raises TypeError/ValueError naming the bad entry, e.g.
`state['population']['active']: shape (3,), expected (4,)`, before it changes anything.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional

import torch

from .. import _ops
from . import kernels
from .._checks import (check_device, check_integer, check_number, check_state_generator, check_state_keys,
                       check_state_tensor, check_state_values)
from .population import CHURN_MODELS, Population, check_rate
from .problems import PROBLEMS, Problem, make_problem, problem_options

ALGORITHMS = ("local_sgd", "local_adam")
DEFAULT_LR = {"local_sgd": 0.1, "local_adam": 0.01}
STATE_ON_JOIN = ("reset", "inherit")
WEIGHTINGS = ("size", "uniform")
INITS = ("optimum", "zero")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
METRICS = ("distance", "norm", "gap", "optimum_shift", "active", "joined", "left")
LABELS = {"local_sgd": "local SGD", "local_adam": "local Adam"}
STATE_KEYS = ("config", "round", "tensors", "x_star", "population", "problem", "generator", "history")
TENSOR_NAMES = ("x", "client_params", "exp_avg", "exp_avg_sq", "step", "momentum_buffer")
SEED_LIMIT = 2 ** 64  # torch.Generator.manual_seed takes seeds in [0, 2**64)


def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: unknown {value!r}; expected one of {', '.join(choices)}")


@dataclasses.dataclass
class FLConfig:
    """Everything that defines a run (see the module doc). lr=None picks DEFAULT_LR[algorithm]; the
    problem's further options (heterogeneity, curvature_spread, dataset, label_skew, batch_size, ...)
    go in `problem_options`."""

    algorithm: str = "local_adam"
    problem: str = "quadratic"
    clients: int = 100
    dim: int = 20
    kappa: float = 10.0
    sigma: float = 1.0
    churn: str = "bernoulli"
    join_rate: float = 0.1
    leave_rate: float = 0.1
    initial_active: Optional[float] = None
    local_steps: int = 5
    rounds: int = 200
    lr: Optional[float] = None
    server_lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0
    weight_decay: float = 0.0
    state_on_join: str = "reset"
    weighting: str = "size"
    init: str = "optimum"
    track_optimum: bool = True
    seed: int = 0
    backend: str = "auto"
    device: str = "cpu"
    dtype: str = "float32"
    problem_options: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.algorithm] if self.lr is None else float(self.lr)

    def validate(self) -> "FLConfig":
        """Raises ValueError naming the first bad field: a choice not among its options, a count
        that is not an integer in range, a number that is not a finite real in range (NaN, a bool
        or a string never is), a seed outside [0, 2**64), a device that does not exist here, a
        backend that cannot run on it, or a problem option the problem does not have. The problem's
        own options are checked when the problem is built (OpenFLSimulator)."""
        _check_choice("algorithm", self.algorithm, ALGORITHMS)
        _check_choice("problem", self.problem, PROBLEMS)
        _check_choice("churn", self.churn, CHURN_MODELS)
        _check_choice("state_on_join", self.state_on_join, STATE_ON_JOIN)
        _check_choice("weighting", self.weighting, WEIGHTINGS)
        _check_choice("init", self.init, INITS)
        _check_choice("dtype", self.dtype, DTYPES)
        for name in ("clients", "dim", "local_steps"):
            check_integer(name, getattr(self, name), low=1)
        check_integer("rounds", self.rounds, low=0)
        if check_integer("seed", self.seed, low=0) >= SEED_LIMIT:
            raise ValueError(f"seed: an integer in [0, 2**64), got {self.seed!r}")
        check_number("kappa", self.kappa, 1.0, low_open=self.problem == "logreg")  # logreg: μ = 1/(κ − 1)
        check_number("sigma", self.sigma, 0.0)
        check_rate("join_rate", self.join_rate)
        check_rate("leave_rate", self.leave_rate)
        if self.initial_active is not None:
            check_rate("initial_active", self.initial_active)
        if self.lr is not None:
            check_number("lr", self.lr, 0.0)
        check_number("server_lr", self.server_lr, 0.0, low_open=True)
        check_number("beta1", self.beta1, 0.0, 1.0, high_open=True)
        check_number("beta2", self.beta2, 0.0, 1.0, high_open=True)
        for name in ("eps", "momentum", "weight_decay"):
            check_number(name, getattr(self, name), 0.0)
        if not isinstance(self.track_optimum, bool):
            raise ValueError(f"track_optimum: True or False, got {self.track_optimum!r}")
        device = check_device("device", self.device)
        if not isinstance(self.backend, str):
            raise ValueError(f"backend: a backend name, got {self.backend!r}")
        if self.backend != "auto":
            reason = _ops.unavailable_reason(self.backend)
            if reason is not None:
                raise ValueError(f"backend: {self.backend!r} cannot run here: {reason}")
            _ops.resolve_backend(self.backend, device)  # ValueError when the backend cannot take this device
        if not isinstance(self.problem_options, dict):
            raise ValueError(f"problem_options: a dict of the problem's options, got {self.problem_options!r}")
        for option in self.problem_options:
            if option not in problem_options(self.problem):
                raise ValueError(f"problem_options: {option!r} is not an option of the {self.problem} problem; "
                                 f"expected one of {', '.join(problem_options(self.problem))}")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


class OpenFLSimulator:
    """`OpenFLSimulator(FLConfig(...))` or `OpenFLSimulator(algorithm=..., kappa=..., ...)`;
    `problem_instance=` replaces the problem that the config would build (same number of slots)."""

    def __init__(self, config: Optional[FLConfig] = None, *, problem_instance: Optional[Problem] = None,
                 **overrides):
        if config is not None and not isinstance(config, FLConfig):
            raise TypeError(f"config: expected an FLConfig, got {type(config).__name__}")
        fields = {f.name for f in dataclasses.fields(FLConfig)}
        for name in overrides:
            if name not in fields:
                raise TypeError(f"{name}: not an FLConfig field")
        config = dataclasses.replace(config or FLConfig(), **overrides)
        self.config = config.validate()
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        problem = problem_instance
        if problem is not None and not isinstance(problem, Problem):
            raise TypeError(f"problem_instance: expected a Problem, got {type(problem).__name__}")
        if problem is None:
            problem = make_problem(config.problem, config.clients, dim=config.dim, kappa=config.kappa,
                                   sigma=config.sigma, device=self.device, dtype=self.dtype, **config.problem_options)
        elif problem.clients != config.clients:
            raise ValueError(f"problem_instance: has {problem.clients} client slots, config.clients is {config.clients}")
        self.problem = problem
        C, D = config.clients, problem.dim
        self.dim = D
        self.population = Population(C, model=config.churn, join_rate=config.join_rate, leave_rate=config.leave_rate,
                                     initial_active=config.initial_active, device=self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        state_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.x = torch.zeros(D, device=self.device, dtype=self.dtype)            # the server model
        self.client_params = torch.zeros(C, D, device=self.device, dtype=self.dtype)
        self.exp_avg = self.exp_avg_sq = self.step = self.momentum_buffer = None
        if config.algorithm == "local_adam":
            self.exp_avg = torch.zeros(C, D, device=self.device, dtype=state_dtype)
            self.exp_avg_sq = torch.zeros(C, D, device=self.device, dtype=state_dtype)
            self.step = torch.zeros(C, device=self.device, dtype=torch.int64)
        elif config.momentum > 0:
            self.momentum_buffer = torch.zeros(C, D, device=self.device, dtype=state_dtype)
        self.round_index = 0
        self.history: List[Dict[str, float]] = []
        self.x_star: Optional[torch.Tensor] = None  # the last round's optimum (float64)
        self.problem.reset(self.generator)
        self.population.start(self.generator)
        if config.init == "optimum":
            x0 = self.problem.optimum(self.population.active, self.weights())
            if x0 is not None:
                self.x.copy_(x0)

    # ------------------------------------------------------------------------------------------

    def optimizer_state(self) -> List[torch.Tensor]:
        """The per-client optimiser tensors (rows = slots)."""
        return [t for t in (self.exp_avg, self.exp_avg_sq, self.step, self.momentum_buffer) if t is not None]

    def weights(self) -> torch.Tensor:
        if self.config.weighting == "uniform":
            return torch.ones(self.config.clients, device=self.device, dtype=self.dtype)
        return self.problem.sizes()

    def on_join(self, joined: torch.Tensor) -> None:
        """New clients in the slots of the bool mask `joined`: fresh optimiser state rows
        (state_on_join="reset"), or the slot's previous state ("inherit")."""
        if self.config.state_on_join == "reset":
            kernels.reset_client_state(joined, *self.optimizer_state())

    def local_step(self, grads: torch.Tensor, active: torch.Tensor) -> None:
        """One local step of every active client: one kernel call for all rows."""
        c = self.config
        if c.algorithm == "local_adam":
            kernels.batched_adam_step(self.client_params, grads, self.exp_avg, self.exp_avg_sq, self.step, active,
                                      lr=c.learning_rate, beta1=c.beta1, beta2=c.beta2, eps=c.eps,
                                      weight_decay=c.weight_decay, backend=c.backend)
        else:
            kernels.batched_sgd_step(self.client_params, grads, active, lr=c.learning_rate, momentum=c.momentum,
                                     momentum_buffer=self.momentum_buffer, weight_decay=c.weight_decay,
                                     backend=c.backend)

    def round(self) -> Dict[str, float]:
        """One round (see the module doc); appends its metrics to `history` and returns them. When
        the round leaves the server model non-finite, its metrics are appended all the same and
        FloatingPointError names the round."""
        c, g = self.config, self.generator
        joined, left = self.population.step(g)
        self.problem.renew(joined, g)
        self.on_join(joined)
        active = self.population.active
        weights = self.weights()
        n_active = int(active.sum())
        x_star = self.problem.optimum(active, weights) if n_active and c.track_optimum else None
        if n_active:
            self.client_params.copy_(self.x.expand_as(self.client_params))
            for _ in range(c.local_steps):
                self.local_step(self.problem.grad(self.client_params, g), active)
            mean = kernels.masked_weighted_mean(self.client_params, weights, active, backend=c.backend)
            if c.server_lr == 1.0:
                self.x.copy_(mean)
            else:
                self.x.add_(mean - self.x, alpha=c.server_lr)
        x64 = self.x.double()
        nan = float("nan")
        record = {
            "round": self.round_index,
            "distance": float(torch.linalg.vector_norm(x64 - x_star)) if x_star is not None else nan,
            "norm": float(torch.linalg.vector_norm(x64)),
            "gap": (self.problem.objective(x64, active, weights) - self.problem.objective(x_star, active, weights)
                    if x_star is not None else nan),
            "optimum_shift": (float(torch.linalg.vector_norm(x_star - self.x_star))
                              if x_star is not None and self.x_star is not None else nan),
            "active": n_active,
            "joined": int(joined.sum()),
            "left": int(left.sum()),
        }
        if x_star is not None:
            self.x_star = x_star
        self.history.append(record)
        self.round_index += 1
        if n_active and not bool(torch.isfinite(self.x).all()):
            raise FloatingPointError(
                f"round {record['round']}: the server model became non-finite ({LABELS[c.algorithm]}, "
                f"lr={c.learning_rate:g}, server_lr={c.server_lr:g}, {c.local_steps} local steps); the run diverged")
        return record

    def run(self, rounds: Optional[int] = None, *, progress: bool = False, description: str = "fl",
            callback: Optional[Callable[[Dict[str, float]], None]] = None) -> List[Dict[str, float]]:
        """`rounds` more rounds (default: config.rounds); returns the whole history. A round that
        diverges raises FloatingPointError (see round()); `history` then ends with that round."""
        rounds = self.config.rounds if rounds is None else check_integer("rounds", rounds, low=0)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback: expected callback(record), got {type(callback).__name__}")
        steps = range(rounds)
        if progress:
            import sys

            from tqdm import tqdm

            steps = tqdm(steps, desc=description, leave=False, file=sys.stderr, dynamic_ncols=True, disable=None)
        for _ in steps:
            record = self.round()
            if callback is not None:
                callback(record)
        return self.history

    # ------------------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "round": self.round_index,
            "tensors": {name: (getattr(self, name).clone() if getattr(self, name) is not None else None)
                        for name in TENSOR_NAMES},
            "x_star": self.x_star.clone() if self.x_star is not None else None,
            "population": self.population.state_dict(),
            "problem": self.problem.state_dict(),
            "generator": self.generator.get_state(),
            "history": [dict(r) for r in self.history],
        }

    def check_state_dict(self, state: Dict[str, Any], path: str = "state") -> None:
        """Raises TypeError/ValueError naming the first bad entry of `state`: exactly the keys of
        state_dict(); the same config but for `rounds` (a resumed run may go on for longer); a round
        count (an integer >= 0); the tensors of this algorithm in this simulator's shapes and
        dtypes, finite, with Adam's second moments >= 0 and step counts in [0, round · local_steps];
        x* None or a finite float64 [D] (None when the optimum is not tracked); a valid population,
        problem and generator state; one history record per round."""
        check_state_keys(state, path, STATE_KEYS)

        def key(*names) -> str:  # the entry's name as the caller writes it: state['tensors']['x']
            return path + "".join(f"[{n!r}]" for n in names)

        if not isinstance(state["config"], dict):
            raise TypeError(f"{key('config')}: expected a dict (FLConfig.to_dict()), got {type(state['config']).__name__}")
        mine, theirs = self.config.to_dict(), dict(state["config"])
        mine.pop("rounds"), theirs.pop("rounds", None)  # a resumed run may go on for longer
        different = sorted(k for k in set(mine) | set(theirs) if k not in mine or k not in theirs or mine[k] != theirs[k])
        if different:
            raise ValueError(f"{key('config')}: saved with a different config ({', '.join(different)})")
        rounds = check_integer(key("round"), state["round"], low=0)
        tensors = state["tensors"]
        check_state_keys(tensors, key("tensors"), TENSOR_NAMES)
        for name in TENSOR_NAMES:
            current, value = getattr(self, name), tensors[name]
            if current is None or value is None:
                if (current is None) != (value is None):
                    raise ValueError(f"{key('tensors', name)}: {'expected None' if current is None else 'missing'} "
                                     f"for {self.config.algorithm} with momentum={self.config.momentum:g}")
                continue
            check_state_tensor(value, key("tensors", name), current)
            if name == "step":
                check_state_values(value, key("tensors", name), low=0, high=rounds * self.config.local_steps)
            else:
                check_state_values(value, key("tensors", name), finite=True, low=0 if name == "exp_avg_sq" else None)
        if state["x_star"] is not None:
            if not self.config.track_optimum:
                raise ValueError(f"{key('x_star')}: expected None (track_optimum=False)")
            check_state_tensor(state["x_star"], key("x_star"), torch.empty(self.dim, dtype=torch.float64))
            check_state_values(state["x_star"], key("x_star"), finite=True)
        self.population.check_state_dict(state["population"], key("population"))
        self.problem.check_state_dict(state["problem"], key("problem"))
        check_state_generator(state["generator"], key("generator"), self.generator)
        history = state["history"]
        if not isinstance(history, list) or len(history) != rounds:
            raise ValueError(f"{key('history')}: expected a list of {rounds} records (one per round), got "
                             f"{len(history) if isinstance(history, list) else type(history).__name__}")
        for i, record in enumerate(history):
            check_state_keys(record, key("history", i), ("round",) + METRICS)
            if record["round"] != i:
                raise ValueError(f"{key('history', i, 'round')}: {record['round']!r}, expected {i}")

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores a state_dict() of a simulator with the same config (`rounds` may differ), all
        of it or nothing: the whole state is checked first (check_state_dict)."""
        self.check_state_dict(state)
        self.problem.load_state_dict(state["problem"])  # first: a custom Problem's loader may still refuse
        for name in TENSOR_NAMES:
            if getattr(self, name) is not None:
                getattr(self, name).copy_(state["tensors"][name])
        self.round_index = int(state["round"])
        self.x_star = state["x_star"].to(self.device, copy=True) if state["x_star"] is not None else None
        self.population.load_state_dict(state["population"])
        self.generator.set_state(state["generator"])
        self.history = [dict(r) for r in state["history"]]
