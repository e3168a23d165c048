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
bitwise identically.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional

import torch

from . import kernels
from .population import CHURN_MODELS, Population, check_rate
from .problems import PROBLEMS, Problem, make_problem

ALGORITHMS = ("local_sgd", "local_adam")
DEFAULT_LR = {"local_sgd": 0.1, "local_adam": 0.01}
STATE_ON_JOIN = ("reset", "inherit")
WEIGHTINGS = ("size", "uniform")
INITS = ("optimum", "zero")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
METRICS = ("distance", "norm", "gap", "optimum_shift", "active", "joined", "left")


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
        """Raises ValueError naming the first bad field."""
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm: unknown {self.algorithm!r}; expected one of {', '.join(ALGORITHMS)}")
        if self.problem not in PROBLEMS:
            raise ValueError(f"problem: unknown {self.problem!r}; expected one of {', '.join(PROBLEMS)}")
        if self.churn not in CHURN_MODELS:
            raise ValueError(f"churn: unknown {self.churn!r}; expected one of {', '.join(CHURN_MODELS)}")
        if self.state_on_join not in STATE_ON_JOIN:
            raise ValueError(f"state_on_join: unknown {self.state_on_join!r}; expected one of {', '.join(STATE_ON_JOIN)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting: unknown {self.weighting!r}; expected one of {', '.join(WEIGHTINGS)}")
        if self.init not in INITS:
            raise ValueError(f"init: unknown {self.init!r}; expected one of {', '.join(INITS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: unknown {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        for name in ("clients", "dim", "local_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: an integer >= 1, got {value!r}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"rounds: an integer >= 0, got {self.rounds!r}")
        check_rate("join_rate", self.join_rate)
        check_rate("leave_rate", self.leave_rate)
        if self.initial_active is not None:
            check_rate("initial_active", self.initial_active)
        lr = self.learning_rate
        if not (lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"lr: finite and >= 0, got {self.lr!r}")
        if not (self.server_lr > 0 and math.isfinite(self.server_lr)):
            raise ValueError(f"server_lr: finite and > 0, got {self.server_lr!r}")
        if not (self.sigma >= 0 and math.isfinite(self.sigma)):
            raise ValueError(f"sigma: finite and >= 0, got {self.sigma!r}")
        if not (self.kappa >= 1 and math.isfinite(self.kappa)):
            raise ValueError(f"kappa: finite and >= 1, got {self.kappa!r}")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


class OpenFLSimulator:
    """`OpenFLSimulator(FLConfig(...))` or `OpenFLSimulator(algorithm=..., kappa=..., ...)`;
    `problem_instance=` replaces the problem that the config would build (same number of slots)."""

    def __init__(self, config: Optional[FLConfig] = None, *, problem_instance: Optional[Problem] = None,
                 **overrides):
        config = dataclasses.replace(config or FLConfig(), **overrides)
        self.config = config.validate()
        self.device = torch.device(config.device)
        self.dtype = DTYPES[config.dtype]
        problem = problem_instance
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
        """One round (see the module doc); appends its metrics to `history` and returns them."""
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
        return record

    def run(self, rounds: Optional[int] = None, *, progress: bool = False, description: str = "fl",
            callback: Optional[Callable[[Dict[str, float]], None]] = None) -> List[Dict[str, float]]:
        """`rounds` more rounds (default: config.rounds); returns the whole history."""
        rounds = self.config.rounds if rounds is None else rounds
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
        tensors = {name: getattr(self, name) for name in ("x", "client_params", "exp_avg", "exp_avg_sq", "step",
                                                          "momentum_buffer")}
        return {
            "config": self.config.to_dict(),
            "round": self.round_index,
            "tensors": {k: (v.clone() if v is not None else None) for k, v in tensors.items()},
            "x_star": self.x_star.clone() if self.x_star is not None else None,
            "population": self.population.state_dict(),
            "problem": self.problem.state_dict(),
            "generator": self.generator.get_state(),
            "history": [dict(r) for r in self.history],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        mine, theirs = self.config.to_dict(), dict(state["config"])
        mine.pop("rounds"), theirs.pop("rounds", None)  # a resumed run may go on for longer
        different = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if different:
            raise ValueError(f"state_dict: saved with a different config ({', '.join(different)})")
        for name, value in state["tensors"].items():
            current = getattr(self, name)
            if (current is None) != (value is None):
                raise ValueError(f"state_dict: {name} does not match this simulator's algorithm")
            if current is not None:
                current.copy_(value)
        self.round_index = int(state["round"])
        self.x_star = state["x_star"].clone() if state["x_star"] is not None else None
        self.population.load_state_dict(state["population"])
        self.problem.load_state_dict(state["problem"])
        self.generator.set_state(state["generator"])
        self.history = [dict(r) for r in state["history"]]
