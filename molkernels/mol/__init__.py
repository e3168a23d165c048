"""molkernels.mol: multi-objective aggregators and mol.backward.

Every aggregator has ``aggregate(grads) -> direction`` (a gradient stack in, the direction in the
stack's structure out); the Gram-based ones (GramWeighting) also have ``weights(gram) -> w`` and
compute w on the device from the fused Gram, so aggregation is two passes over memory whatever the
method. ``mol.backward(losses, params, aggregator)`` computes the K per-objective gradients into one
flat [K, D] buffer, aggregates, and writes p.grad, so it fits any loop and any torch optimizer:

    import torch, molkernels.mol as mol

    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-3)
    aggregator = mol.UPGrad()                     # or MGDA(), CAGrad(0.4), NashMTL(), MoCo(), ...
    for x, y in loader:                           # y: [batch, 3], one regression target per task
        losses = ((model(x) - y) ** 2).mean(0)    # K = 3 losses
        mol.backward(losses, params, aggregator)  # p.grad = aggregated direction
        optimizer.step()

Aggregators (paper formulas in each class's docstring):

    Linear(w), Mean()         fixed weights
    MGDA()                    min-norm point of the convex hull (exact, molkernels.min_norm)
    MoCo(...), MoDo(...)      stochastic, stateful (molkernels.moco_step; MoDo takes 3 samples)
    UPGrad(), DualProj()      projections onto the dual cone (exact QP via min_norm)
    PCGrad(seed)              gradient surgery, seeded random order, from the Gram
    CAGrad(c=0.4)             conflict-averse (exact bracketing over min_norm problems)
    IMTLG()                   impartial: equal projections onto the unit gradients
    AlignedMTL()              aligned principal components
    NashMTL()                 Nash bargaining solution (Newton on the device, warm-started)
    FAMO(K)                   loss-based, no per-objective gradients (backward / update)
"""

from .aligned import AlignedMTL
from .backward import backward, objective_gradients
from .base import Aggregator, GramWeighting
from .cagrad import CAGrad
from .dualproj import DualProj
from .famo import FAMO
from .imtl import IMTLG
from .linear import Linear, Mean
from .mgda import MGDA
from .nash import NashMTL
from .pcgrad import PCGrad
from .stochastic import MoCo, MoDo
from .upgrad import UPGrad

__all__ = [
    "Aggregator",
    "AlignedMTL",
    "CAGrad",
    "DualProj",
    "FAMO",
    "GramWeighting",
    "IMTLG",
    "Linear",
    "MGDA",
    "Mean",
    "MoCo",
    "MoDo",
    "NashMTL",
    "PCGrad",
    "UPGrad",
    "backward",
    "objective_gradients",
]
