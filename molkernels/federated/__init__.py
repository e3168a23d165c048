"""Open federated learning: client-stacked [C, D] local optimisers in one fused call per local step
for all clients, and the open-system simulator (clients joining and leaving).

    from molkernels.federated import OpenFLSimulator, FLConfig
    sim = OpenFLSimulator(FLConfig(algorithm="local_adam", problem="quadratic", kappa=10, sigma=1))
    history = sim.run(200)              # per-round ‖x_t − x*_t‖, ‖x_t‖, active clients, joins, departures

The command line: `python -m molkernels fl` (molkernels/federated/cli.py); the Flower adapter:
molkernels/federated/flower.py (imports flwr only when used).
"""

from .kernels import batched_adam_step, batched_sgd_step, masked_weighted_mean, reset_client_state
from .population import CHURN_MODELS, Population
from .problems import PROBLEMS, LogRegProblem, Problem, QuadraticProblem, make_problem
from .simulator import ALGORITHMS, FLConfig, OpenFLSimulator

__all__ = ["batched_adam_step", "batched_sgd_step", "masked_weighted_mean", "reset_client_state",
           "ALGORITHMS", "CHURN_MODELS", "PROBLEMS", "FLConfig", "OpenFLSimulator", "Population", "Problem",
           "QuadraticProblem", "LogRegProblem", "make_problem"]
